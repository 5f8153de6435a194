"""Dataset registry: the fixed facts about each dataset (shape, classes, normalization, DSA strategy, model).

Constants follow SPEC §2.1; DSA strategies follow SPEC §3.3. `imagefolder:<path>` datasets get a spec built from
the folder itself (classes = sorted subfolders of `train/`, mean/std measured on the train split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import folders
from .formats import RawSplit
from .imagenet import SUBSETS

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
DIGIT_STRATEGY = "color_crop_cutout_scale_rotate"  # no flip for digits (SPEC §3.3)
IMAGEFOLDER_PREFIX = "imagefolder:"
DEFAULT_IMAGEFOLDER_RESOLUTION = 32
# ImageNet's per-channel constants, used (not measured) for Tiny-ImageNet, ImageNet-1K and MTT's subsets (SPEC §2.1)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the library needs to know about a dataset before reading a single image."""

    name: str
    channels: int
    im_size: tuple[int, int]  # (h, w)
    num_classes: int
    mean: tuple[float, ...]  # per channel, on the [0,1] scale
    std: tuple[float, ...]
    dsa_strategy: str
    class_names: tuple[str, ...]  # label order; empty for tiny-imagenet / imagenet-1k until the data is read
    default_model: str
    source: str  # where the data comes from, for humans
    how_to_get: str  # one line telling a user how to obtain the files
    # RaT-BPTT's published runs of this dataset start from unit-norm noise without ZCA (ImageNet-1K); its
    # pix_init="auto" then starts from noise too (with ZCA it always does)
    rat_noise_init: bool = False


_SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            # Pixels are 0..16; we store round(v * 255 / 16) as uint8 (16 -> 255 exactly). Mean/std below were
            # measured once on the 1,198-image train part of the fixed split (see digits.read_sklearn_digits):
            # x = round(images * 255 / 16) / 255 -> mean 0.305439, std 0.375786.
            "digits", 1, (8, 8), 10, (0.3054,), (0.3758,), DIGIT_STRATEGY, DIGIT_CLASSES, "ConvNetD2",
            "scikit-learn load_digits (1,797 8x8 images, bundled with scikit-learn; fixed 2/3 train, 1/3 test split)",
            "nothing to do: it ships with scikit-learn",
        ),
        DatasetSpec(
            "mnist", 1, (28, 28), 10, (0.1307,), (0.3081,), DIGIT_STRATEGY, DIGIT_CLASSES, "ConvNet",
            "MNIST IDX files (LeCun, Cortes, Burges), 60k train / 10k test",
            "distillery download mnist, or put the four IDX files in DIR/mnist and set DISTILLERY_DATA=DIR",
        ),
        DatasetSpec(
            "fashion-mnist", 1, (28, 28), 10, (0.2861,), (0.3530,), DEFAULT_STRATEGY, FASHION_CLASSES, "ConvNet",
            "Fashion-MNIST IDX files (Zalando Research, MIT), 60k train / 10k test",
            "apt-get install dataset-fashion-mnist, or distillery download fashion-mnist",
        ),
        DatasetSpec(
            "cifar10", 3, (32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), DEFAULT_STRATEGY,
            CIFAR10_CLASSES, "ConvNet",
            "CIFAR-10 python batches (cifar-10-batches-py) or an image-folder tree such as the JPEG pack",
            "distillery download cifar10, or put cifar-10-batches-py/ into DIR (or image folders "
            "DIR/cifar10/train/<class>/ and DIR/cifar10/test/<class>/) and set DISTILLERY_DATA=DIR",
        ),
        DatasetSpec(
            # DC-code constants; MTT/TESLA reuse the CIFAR-10 ones instead (SPEC §2.1, P7): only matters without ZCA.
            "cifar100", 3, (32, 32), 100, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), DEFAULT_STRATEGY,
            CIFAR100_CLASSES, "ConvNet",
            "CIFAR-100 python files (cifar-100-python, fine labels)",
            "distillery download cifar100",
        ),
        DatasetSpec(
            "tiny-imagenet", 3, (64, 64), 200, IMAGENET_MEAN, IMAGENET_STD, DEFAULT_STRATEGY,
            (), "ConvNetD4",
            "Tiny-ImageNet-200 standard layout (wnids.txt, train/<wnid>/images, val/ as the test split)",
            "distillery download tiny-imagenet, or unzip tiny-imagenet-200.zip (cs231n.stanford.edu) into DIR "
            "and set DISTILLERY_DATA=DIR",
        ),
        DatasetSpec(
            "svhn", 3, (32, 32), 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), DIGIT_STRATEGY,
            DIGIT_CLASSES, "ConvNet",
            "SVHN cropped digits (train_32x32.mat, test_32x32.mat; label 10 is digit 0), 73,257 train / 26,032 test",
            "distillery download svhn",
        ),
        DatasetSpec(
            "imagenet-1k", 3, (64, 64), 1000, IMAGENET_MEAN, IMAGENET_STD, DEFAULT_STRATEGY, (), "ConvNetD4",
            "ImageNet-1K at 64x64: the downsampled-ImageNet npz files (train_data_batch_1..10.npz, val_data.npz as the "
            "test split), or an ImageNet folder train/<wnid>/*, val/<wnid>/* resized to 64x64 (~16 GB uint8 in memory)",
            "register at image-net.org, download the 64x64 downsampled ImageNet in npz format, unpack "
            "train_data_batch_*.npz and val_data.npz into DIR/imagenet-1k (or put ImageNet's train/<wnid>/ and "
            "val/<wnid>/ folders there) and set DISTILLERY_DATA=DIR",
            rat_noise_init=True,
        ),
        *(DatasetSpec(
            name, 3, (128, 128), 10, IMAGENET_MEAN, IMAGENET_STD, DEFAULT_STRATEGY, names, "ConvNetD5",
            f"MTT's {name} subset of ImageNet at 128x128 (wnids {', '.join(wnids)}; train/ for training, "
            f"val/ as the test split; shorter side resized to 128, centre crop)",
            f"put ImageNet's train/<wnid>/ and val/<wnid>/ folders (validation images sorted into class folders) "
            f"into DIR/imagenet and set DISTILLERY_DATA=DIR; only the 10 {name} classes are read",
        ) for name, (_, wnids, names) in SUBSETS.items()),
    ]
}


def list_datasets() -> list[str]:
    """Names of the built-in datasets (`imagefolder:<path>` is accepted on top of these)."""
    return list(_SPECS)


def canonical_name(name: str) -> str:
    """Normalize a user-typed built-in name ('CIFAR10', 'fashion_mnist') or raise a UserError listing valid names."""
    key = name.strip().lower().replace("_", "-")
    if key not in _SPECS:
        valid = ", ".join([*_SPECS, IMAGEFOLDER_PREFIX + "<path>"])
        raise UserError(f"unknown dataset '{name}'; choose one of: {valid}")
    return key


def get_spec(name: str, resolution: int | None = None) -> DatasetSpec:
    """The spec of a built-in dataset, or of `imagefolder:<path>` (reads the folder to measure mean/std)."""
    if name.startswith(IMAGEFOLDER_PREFIX):
        root = imagefolder_root(name)
        resolution = check_resolution(resolution)
        train = folders.read_image_folder(root / "train", resolution, folders.detect_channels(root / "train"))
        return imagefolder_spec(root, resolution, train)
    if resolution is not None:
        raise UserError(f"resolution applies only to {IMAGEFOLDER_PREFIX}<path> datasets, not to '{name}'")
    return _SPECS[canonical_name(name)]


def imagefolder_root(name: str) -> Path:
    """The folder of an `imagefolder:<path>` name, checked to hold a `train/` subfolder."""
    root = Path(name[len(IMAGEFOLDER_PREFIX):]).expanduser()
    if not (root / "train").is_dir():
        raise UserError(f"{name}: expected class folders under '{root / 'train'}' (and '{root / 'test'}'); "
                        f"lay the images out as train/<class>/* and test/<class>/*")
    return root.resolve()


def check_resolution(resolution: int | None) -> int:
    """The image-folder resolution to use: default 32, must be a positive int."""
    if resolution is None:
        return DEFAULT_IMAGEFOLDER_RESOLUTION
    if int(resolution) != resolution or resolution < 1:
        raise UserError(f"resolution must be a positive integer, got {resolution!r}")
    return int(resolution)


def imagefolder_spec(root: Path, resolution: int, train: RawSplit) -> DatasetSpec:
    """Spec of a user image folder from its decoded train split (per-channel mean/std on the [0,1] scale)."""
    channels = train.images.shape[-1]
    total, total_sq = np.zeros(channels), np.zeros(channels)
    for i in range(0, len(train.images), 4096):  # in blocks: a float64 copy of a large folder would not fit
        block = train.images[i:i + 4096].reshape(-1, channels).astype(np.float64) / 255
        total += block.sum(0)
        total_sq += (block ** 2).sum(0)
    count = train.images.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0))
    return DatasetSpec(
        name=f"{IMAGEFOLDER_PREFIX}{root}",
        channels=channels,
        im_size=(resolution, resolution),
        num_classes=len(train.classes),
        mean=tuple(round(float(m), 6) for m in mean),
        std=tuple(round(float(s), 6) for s in std),
        dsa_strategy=DEFAULT_STRATEGY,
        class_names=tuple(train.classes),
        default_model=_convnet_for(resolution),
        source=f"image folder {root} (train/<class>/*, test/<class>/*) resized to {resolution}x{resolution}",
        how_to_get=f"put images under {root}/train/<class>/ and {root}/test/<class>/",
    )


def held_out(n: int, fraction: float) -> int:
    """Images of a class of n that the validation split holds out (`data.dataset.stratified_split`): round(fraction
    * n), at most n - 1 so that no class loses all its train images."""
    return min(int(round(fraction * n)), max(n - 1, 0))


def _convnet_for(resolution: int) -> str:
    """ConvNet depth that leaves a 4x4 map at 32 (D3), 64 (D4), 128 (D5); at least depth 1."""
    depth = max(1, round(math.log2(resolution)) - 2)
    return "ConvNet" if depth == 3 else f"ConvNetD{depth}"
