"""ImageNet readers: ImageNet-1K at 64 px (downsampled-ImageNet npz batches, or an image folder) and MTT's
10-class ImageNet subsets at 128 px (ImageNette, ImageWoof, ImageFruit, ImageMeow, ImageSquawk, ImageYellow).

The subsets are MTT's `utils.py` `Config` lists: ImageNet class indices, i.e. positions in the sorted list of the
1,000 wnids (the label order of torchvision's `ImageNet`), relabelled 0..9 in list order. We store the wnid of each
index so that only those ten class folders are read. Train images come from `train/<wnid>/`, test images from
`val/<wnid>/` (ImageNet's validation set sorted into class folders), as in MTT. Each image is resized so that its
shorter side is 128 and centre-cropped to 128x128 (MTT's `Resize(128)` + `CenterCrop(128)`; we resize with PIL's
antialiased bilinear filter, MTT resized the normalized tensor).

Downsampled ImageNet (Chrabaszcz et al. 2017, image-net.org) ships `train_data_batch_1..10.npz` and `val_data.npz`:
`data` (N, 3·64·64) uint8 rows holding the R plane, then G, then B; `labels` 1..1000; `mean` (unused: the library
normalizes with ImageNet's constants). Its label order is that of the files (not sorted wnids), so its class names
are the label numbers 0..999.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from .folders import class_folders, read_selected_folders
from .formats import RawSplit

NPZ_TRAIN_PATTERN = re.compile(r"train_data_batch_(\d+)\.npz$")
NPZ_VAL = "val_data.npz"
IMAGENET_CLASSES = 1000

# name -> (MTT's class indices, their wnids, readable names), all in label order. The wnid of index i is the i-th
# of ImageNet's 1,000 sorted wnids (tests check the two columns agree in order).
SUBSETS: dict[str, tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]] = {
    "imagenette": (
        (0, 217, 482, 491, 497, 566, 569, 571, 574, 701),
        ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042", "n03425413",
         "n03445777", "n03888257"),
        ("tench", "English springer", "cassette player", "chain saw", "church", "French horn", "garbage truck",
         "gas pump", "golf ball", "parachute"),
    ),
    "imagewoof": (
        (193, 182, 258, 162, 155, 167, 159, 273, 207, 229),
        ("n02096294", "n02093754", "n02111889", "n02088364", "n02086240", "n02089973", "n02087394", "n02115641",
         "n02099601", "n02105641"),
        ("Australian terrier", "Border terrier", "Samoyed", "beagle", "Shih-Tzu", "English foxhound",
         "Rhodesian ridgeback", "dingo", "golden retriever", "Old English sheepdog"),
    ),
    "imagefruit": (
        (953, 954, 949, 950, 951, 957, 952, 945, 943, 948),
        ("n07753275", "n07753592", "n07745940", "n07747607", "n07749582", "n07768694", "n07753113", "n07720875",
         "n07718472", "n07742313"),
        ("pineapple", "banana", "strawberry", "orange", "lemon", "pomegranate", "fig", "bell pepper", "cucumber",
         "Granny Smith"),
    ),
    "imagemeow": (
        (281, 282, 283, 284, 285, 291, 292, 290, 289, 287),
        ("n02123045", "n02123159", "n02123394", "n02123597", "n02124075", "n02129165", "n02129604", "n02128925",
         "n02128757", "n02127052"),
        ("tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat", "lion", "tiger", "jaguar",
         "snow leopard", "lynx"),
    ),
    "imagesquawk": (
        (84, 130, 88, 144, 145, 22, 96, 9, 100, 89),
        ("n01806143", "n02007558", "n01818515", "n02051845", "n02056570", "n01614925", "n01843383", "n01518878",
         "n01860187", "n01819313"),
        ("peacock", "flamingo", "macaw", "pelican", "king penguin", "bald eagle", "toucan", "ostrich", "black swan",
         "sulphur-crested cockatoo"),
    ),
    "imageyellow": (
        (309, 986, 954, 951, 987, 779, 599, 291, 72, 11),
        ("n02206856", "n12057211", "n07753592", "n07749582", "n12144580", "n04146614", "n03530642", "n02129165",
         "n01773157", "n01531178"),
        ("bee", "yellow lady's slipper", "banana", "lemon", "corn", "school bus", "honeycomb", "lion",
         "black and gold garden spider", "goldfinch"),
    ),
}


# ---------------------------------------------------------------- downsampled ImageNet (npz batches)


def _npz_files(folder: Path) -> tuple[list[Path], Path | None]:
    """The train batch files (in batch order) and val_data.npz, in `folder` or one of its subfolders."""
    places = [folder] + sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    train: dict[int, Path] = {}
    val = None
    for place in places:
        for path in place.glob("*.npz"):
            match = NPZ_TRAIN_PATTERN.match(path.name)
            if match:
                train.setdefault(int(match.group(1)), path)
            elif path.name == NPZ_VAL and val is None:
                val = path
    return [train[k] for k in sorted(train)], val


def _npz_labels(path: Path) -> np.ndarray:
    """The 0-based labels of one npz batch (the file stores 1..1000)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            labels = np.asarray(f["labels"]).reshape(-1).astype(np.int64) - 1
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path} ({e}); expected a downsampled-ImageNet npz file with 'data' and "
                        f"'labels'; download it again") from e
    if len(labels) and (labels.min() < 0 or labels.max() >= IMAGENET_CLASSES):
        raise UserError(f"{path} has labels outside 1..{IMAGENET_CLASSES} (min {labels.min() + 1}, "
                        f"max {labels.max() + 1}); is it a downsampled-ImageNet batch?")
    return labels


def _read_npz_split(paths: list[Path], resolution: int) -> RawSplit:
    """Concatenate npz batches into one (N, res, res, 3) split, filling a preallocated array batch by batch
    (the full 64-px train split is 15.7 GB of uint8; a list-then-concatenate would need twice that)."""
    labels = [_npz_labels(p) for p in paths]
    total = sum(len(lab) for lab in labels)
    images = np.empty((total, resolution, resolution, 3), dtype=np.uint8)
    start = 0
    for path, lab in zip(paths, labels):
        with np.load(path, allow_pickle=False) as f:
            data = np.asarray(f["data"])
        if data.shape != (len(lab), 3 * resolution * resolution) or data.dtype != np.uint8:
            raise UserError(f"{path} holds {data.dtype} data of shape {data.shape} for {len(lab)} labels; expected "
                            f"uint8 (N, {3 * resolution * resolution}) rows of {resolution}x{resolution} RGB images")
        images[start:start + len(lab)] = data.reshape(-1, 3, resolution, resolution).transpose(0, 2, 3, 1)
        start += len(lab)
        del data
    return RawSplit(images, np.concatenate(labels), [str(c) for c in range(IMAGENET_CLASSES)])


def read_imagenet_npz(folder: Path, resolution: int = 64) -> tuple[RawSplit, RawSplit]:
    """Train (train_data_batch_*.npz) and test (val_data.npz, ImageNet's validation set) of downsampled ImageNet."""
    folder = Path(folder)
    train_files, val_file = _npz_files(folder)
    if not train_files:
        raise UserError(f"no train_data_batch_*.npz under {folder}; unpack the downsampled-ImageNet train files there")
    if val_file is None:
        raise UserError(f"no {NPZ_VAL} under {folder}; unpack the downsampled-ImageNet validation file there "
                        f"(it is the test split)")
    return _read_npz_split(train_files, resolution), _read_npz_split([val_file], resolution)


# ---------------------------------------------------------------- ImageNet image folders (train/<wnid>, val/<wnid>)


def _check_val(folder: Path) -> None:
    """Refuse a val/ folder that still holds ImageNet's flat validation images instead of class folders."""
    val = folder / "val"
    if val.is_dir() and not any(p.is_dir() for p in val.iterdir()):
        raise UserError(f"{val} holds no class folders; sort ImageNet's validation images into val/<wnid>/ "
                        f"(the layout torchvision's ImageNet and ImageFolder use)")


def read_imagenet_folder(folder: Path, resolution: int) -> tuple[RawSplit, RawSplit]:
    """All classes of an ImageNet tree (train/<wnid>/*, val/<wnid>/* as the test split), each image resized to
    resolution x resolution (RaT-BPTT's `Resize((64, 64))`), classes in sorted-wnid order."""
    folder = Path(folder)
    _check_val(folder)
    wnids = class_folders(folder / "train")
    if len(wnids) != IMAGENET_CLASSES:  # before decoding 1.28 million files
        raise UserError(f"{folder / 'train'} holds {len(wnids)} class folders, but ImageNet-1K has "
                        f"{IMAGENET_CLASSES}; put all of ImageNet's train/<wnid>/ folders there")
    return tuple(read_selected_folders(folder / split, wnids, resolution, 3) for split in ("train", "val"))


def read_imagenet_subset(folder: Path, subset: str, resolution: int = 128) -> tuple[RawSplit, RawSplit]:
    """MTT's ImageNet subset `subset` from an ImageNet tree: its ten wnid folders of train/ and val/ (the test
    split), shorter side resized to `resolution`, centre-cropped; labels 0..9 in MTT's list order."""
    folder = Path(folder)
    _check_val(folder)
    _, wnids, names = SUBSETS[subset]
    for split in ("train", "val"):
        missing = [w for w in wnids if not (folder / split / w).is_dir()]
        if missing:
            raise UserError(f"{folder / split} lacks the {subset} class folders {', '.join(missing)}; "
                            f"{subset} needs ImageNet's {split}/<wnid>/ folders for {', '.join(wnids)}")
    train, test = (read_selected_folders(folder / split, list(wnids), resolution, 3, crop=True)
                   for split in ("train", "val"))
    for split in (train, test):
        split.classes = list(names)
    return train, test
