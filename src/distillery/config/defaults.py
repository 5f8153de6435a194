"""Defaults derived from the data when no preset fits (the rule is documented in docs/DEFAULTS.md).

`data_facts` reads only what the rule needs, cheaply and before any image is decoded: the registry for named
datasets (train sizes are fixed facts of the standard files), folder listings and a few image headers for
`imagefolder:` sets. Each method's `derive_defaults` (methods/) turns those facts into its option values.

The rule has two regimes. Small data (under `SMALL_TRAIN` training images, e.g. digits or a few thousand images of
your own) gets the CPU-sized settings of our digits presets, whose values were chosen on the validation split;
large data gets the published CIFAR rows (SPEC §4.6, §6.9), scaled by classes, resolution and IPC as those rows are.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

SMALL_TRAIN = 10_000        # training images below which a run uses the small-data (CPU) settings
MAX_RESOLUTION = 64         # image folders: native resolution, capped here (larger images are downscaled)
MIN_RESOLUTION = 8
HEADER_SAMPLE = 64          # image-folder files whose headers are read to find the native resolution

# What the methods' small CPU presets for scikit-learn's 8x8 digits share (tuned on the validation split, not on test).
DIGITS_PRESET = {"dataset": "digits", "ipc": 1, "model": "ConvNetD2", "zca": None, "iterations": 200,
                 "eval_every": 50, "eval_runs": 3, "eval_epochs": 300, "final_eval_runs": 5}

# Train-split sizes (all images, before the validation hold-out) and the smallest class, of the standard files.
_KNOWN_SIZES = {"digits": (1198, 116), "mnist": (60000, 5421), "fashion-mnist": (60000, 6000),
                "cifar10": (50000, 5000), "cifar100": (50000, 500), "tiny-imagenet": (100000, 500),
                "svhn": (73257, 4659), "imagenet-1k": (1281167, 732),  # SVHN's smallest: digit 9; ImageNet: 732..1300
                # MTT's 10-class subsets: bounds, not counts (ImageNet classes hold 732 to 1300 train images)
                **dict.fromkeys(("imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk", "imageyellow"),
                                (13000, 732))}


@dataclass(frozen=True)
class DataFacts:
    """What the rule and the up-front checks know about a dataset before it is read."""

    name: str
    channels: int
    im_size: tuple[int, int]
    num_classes: int
    n_train: int                 # training images left after the validation hold-out
    min_class: int               # training images of the smallest class after the hold-out
    dsa_strategy: str
    resolution: int | None       # image folders: the resolution to load at; None for named datasets


def native_resolution(train_dir: Path) -> int:
    """Median shorter side over a sample of image headers (no pixels are decoded), clamped to [8, 64]."""
    from PIL import Image

    from ..data import folders

    files: list[str] = []
    classes = folders.class_folders(train_dir)
    per_class = max(1, HEADER_SAMPLE // len(classes))
    for name in classes:
        files += folders.image_files(train_dir / name)[:per_class]
    sides = []
    for path in files[:HEADER_SAMPLE]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except OSError as e:  # PIL's UnidentifiedImageError included: name the file, as data/cache.py does
            from ..errors import UserError

            raise UserError(f"cannot read image {path}: {e}; remove or replace the file") from None
    side = int(statistics.median(sides)) if sides else MAX_RESOLUTION
    return max(MIN_RESOLUTION, min(MAX_RESOLUTION, side))


def data_facts(name: str, val_fraction: float = 0.1, resolution: int | None = None) -> DataFacts:
    """Channels, size, classes and train sizes of a dataset, from the registry or folder listings (cheap)."""
    from ..data import folders
    from ..data.registry import IMAGEFOLDER_PREFIX, DEFAULT_STRATEGY, canonical_name, check_resolution, get_spec, \
        held_out, imagefolder_root

    if name.startswith(IMAGEFOLDER_PREFIX):
        root = imagefolder_root(name)
        train_dir = root / "train"
        classes = folders.class_folders(train_dir)
        counts = [len(folders.image_files(train_dir / c)) for c in classes]
        res = check_resolution(resolution) if resolution is not None else native_resolution(train_dir)
        kept = [n - held_out(n, val_fraction) for n in counts]
        return DataFacts(f"{IMAGEFOLDER_PREFIX}{root}", folders.detect_channels(train_dir), (res, res), len(classes),
                         sum(kept), min(kept), DEFAULT_STRATEGY, res)
    spec = get_spec(canonical_name(name), resolution)
    total, smallest = _KNOWN_SIZES[spec.name]
    per_class = total / spec.num_classes
    n_train = total - spec.num_classes * (int(round(val_fraction * per_class)))
    return DataFacts(spec.name, spec.channels, spec.im_size, spec.num_classes, n_train,
                     smallest - held_out(smallest, val_fraction), spec.dsa_strategy, None)


def is_small(facts: DataFacts) -> bool:
    """Whether the data gets the small-data (CPU) settings rather than the published large-data rows."""
    return facts.n_train < SMALL_TRAIN


def whitening_pays_off(facts: DataFacts) -> bool:
    """ZCA pays off on large colour sets up to 32x32 (the MTT/RaT CIFAR rows); above, the covariance is too big
    (64x64x3: 12288^2 floats) and the published Tiny/ImageNet rows do without it."""
    return facts.channels == 3 and not is_small(facts) and facts.im_size[0] * facts.im_size[1] <= 32 * 32
