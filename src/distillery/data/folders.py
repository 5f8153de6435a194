"""Image files on disk: `<split>/<class>/<image>` folder trees (image folders, ImageNet subsets) and Tiny-ImageNet,
listed here and decoded through the cache of `cache.py`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from .cache import decode_cached
from .formats import RawSplit

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the (non-hidden) class subfolders of a split folder."""
    if not split_dir.is_dir():
        raise UserError(f"missing folder {split_dir}; expected one subfolder of images per class")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise UserError(f"{split_dir} has no class subfolders; expected {split_dir}/<class>/<image files>")
    return names


def image_files(folder: Path) -> list[str]:
    """Paths of the image files directly inside a folder, sorted by name (plain strings and scandir: fast at 100k)."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_file() and not e.name.startswith(".")
                       and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
    return [os.path.join(folder, name) for name in names]


def detect_channels(split_dir: Path) -> int:
    """1 if the first image of every class folder is grayscale, else 3 (cheap: PIL reads only headers)."""
    for name in class_folders(split_dir):
        files = image_files(split_dir / name)
        if files:
            with Image.open(files[0]) as im:
                if im.mode not in _GRAY_MODES:
                    return 3
    return 1


def read_image_folder(split_dir: Path, resolution: int, channels: int,
                      classes: Sequence[str] | None = None) -> RawSplit:
    """A `<split>/<class>/<image>` tree -> RawSplit; `classes` gives the folder names in label order (default
    sorted). Images are converted to L or RGB and resized (bilinear) to resolution x resolution if needed."""
    split_dir = Path(split_dir).resolve()
    found = class_folders(split_dir)
    classes = list(classes) if classes is not None else found
    if sorted(classes) != found:
        raise UserError(f"class folders of {split_dir} are {found}; expected exactly {sorted(classes)}")
    return read_selected_folders(split_dir, classes, resolution, channels)


def read_selected_folders(split_dir: Path, classes: Sequence[str], resolution: int, channels: int,
                          crop: bool = False) -> RawSplit:
    """The images of the named class folders of `split_dir` (label = position in `classes`; other folders are
    ignored). `crop`: resize the shorter side to `resolution` and centre-crop (torchvision's Resize(int) +
    CenterCrop) instead of resizing to a square."""
    split_dir = Path(split_dir).resolve()
    files, labels = [], []
    for label, name in enumerate(classes):
        if not (split_dir / name).is_dir():
            raise UserError(f"missing class folder {split_dir / name}; every split needs one folder per class")
        class_files = image_files(split_dir / name)
        if not class_files:
            raise UserError(f"class folder {split_dir / name} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files += class_files
        labels += [label] * len(class_files)
    tag = f"{split_dir.parent.name}-{split_dir.name}"
    return decode_cached(tag, files, np.array(labels, dtype=np.int64), list(classes), resolution, channels, crop)


def read_tiny_imagenet(root: Path, resolution: int = 64) -> tuple[RawSplit, RawSplit]:
    """Tiny-ImageNet-200: train/<wnid>/images/*.JPEG and val/ (the test split). Classes are the sorted wnids,
    the label order of torchvision's ImageFolder that MTT/TESLA use."""
    root = Path(root).resolve()
    wnids = sorted(set((root / "wnids.txt").read_text().split()))
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        class_files = image_files(root / "train" / wnid / "images") if (root / "train" / wnid).is_dir() else []
        if not class_files:
            raise UserError(f"{root / 'train' / wnid / 'images'} is missing or empty; is {root} complete?")
        files += class_files
        labels += [label] * len(class_files)
    train = decode_cached("tiny-imagenet-train", files, np.array(labels, dtype=np.int64), wnids, resolution, 3)

    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise UserError(f"missing {annotations}; Tiny-ImageNet's val split (used as the test split) needs it")
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    files, labels = [], []
    for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise UserError(f"{annotations} line {line_no}: expected '<file>\\t<wnid>...' with a wnid from wnids.txt")
        files.append(str(root / "val" / "images" / fields[0]))
        labels.append(label_of[fields[1]])
    test = decode_cached("tiny-imagenet-test", files, np.array(labels, dtype=np.int64), wnids, resolution, 3)
    return train, test
