"""Datasets as ready-to-use tensors: `load_dataset` finds the files, reads them, holds out a validation split
and applies the preprocessing once, so every method, expert and evaluation sees the same model-space images.

Files are searched in this order: the `data_dir` argument (itself or a dataset folder inside it), $DISTILLERY_DATA,
`./data`, and for Fashion-MNIST the Debian package's /usr/share/datasets/fashion-mnist/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor

from ..device import resolve_device
from ..errors import UserError, first_line
from ..io import atomic_write_bytes
from . import folders, formats, imagenet
from .cache import cache_dir
from .digits import read_sklearn_digits
from .download import SOURCES, fetch_dataset
from .formats import RawSplit, to_float01
from .imagenet import SUBSETS
from .preprocess import Preprocess, check_fitted, images_digest, make_preprocess
from .registry import (
    IMAGEFOLDER_PREFIX,
    DatasetSpec,
    check_resolution,
    get_spec,
    imagefolder_root,
    imagefolder_spec,
    list_datasets,
)

DATA_ENV = "DISTILLERY_DATA"

# Per dataset: folders (relative to each search root) that may hold it, and the layouts accepted there.
_CANDIDATES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "mnist": (["mnist/MNIST/raw", "MNIST/raw", "mnist", "mnist-idx"], ("idx", "imagefolder")),
    "fashion-mnist": (["fashion-mnist/FashionMNIST/raw", "FashionMNIST/raw", "fashion-mnist", "fashion-mnist-idx"],
                      ("idx", "imagefolder")),
    "cifar10": (["cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10", "cifar10-jpeg"],
                ("cifar10-pickle", "imagefolder")),
    "cifar100": (["cifar-100-python", "cifar100/cifar-100-python", "cifar100"], ("cifar100-pickle", "imagefolder")),
    "tiny-imagenet": (["tiny-imagenet-200", "tiny-imagenet"], ("tiny-imagenet",)),
    "svhn": (["svhn", "SVHN"], ("svhn-mat",)),
    "imagenet-1k": (["imagenet-1k", "imagenet64", "Imagenet64", "imagenet"], ("imagenet-npz", "imagenet-folder")),
    **{name: ([name, "imagenet", "ILSVRC2012", "ILSVRC/Data/CLS-LOC"], ("imagenet-folder",)) for name in SUBSETS},
}
_SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}


@dataclass
class Split:
    """Images in model space (N,C,H,W) float32 and int64 labels (N,), on the dataset's device."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


class Dataset:
    """Train / val / test splits in model space, the fitted preprocessing, and per-class real-image sampling."""

    def __init__(self, spec: DatasetSpec, preprocess: Preprocess, train: Split, val: Split, test: Split,
                 location: str, val_fraction: float = 0.1) -> None:
        self.spec = spec
        self.val_fraction = val_fraction  # share of the training files held out as `val` (sets record it)
        self.preprocess = preprocess
        self.train, self.val, self.test = train, val, test
        self.location = location  # where the files were read from, for logs and run metadata
        self.class_indices: list[Tensor] = [torch.nonzero(train.y == c).flatten() for c in range(spec.num_classes)]

    def sample_real(self, c: int, k: int, generator: torch.Generator) -> Tensor:
        """k distinct train images of class c (random permutation, first k), as used for real initialization."""
        idx = self.class_indices[c]
        if k > len(idx):
            raise UserError(f"class {c} ('{self.spec.class_names[c]}') of {self.spec.name} has only {len(idx)} "
                            f"training images, cannot draw {k}; lower ipc or val_fraction")
        perm = torch.randperm(len(idx), generator=generator, device=generator.device)[:k]
        return self.train.x[idx[perm.to(idx.device)]]

    def random_set(self, ipc: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A class-blocked set of ipc real train images per class (the Random baseline / real init)."""
        x = torch.cat([self.sample_real(c, ipc, generator) for c in range(self.spec.num_classes)])
        y = torch.arange(self.spec.num_classes, device=x.device).repeat_interleave(ipc)
        return x, y

    def __repr__(self) -> str:
        return (f"Dataset({self.spec.name}: train {len(self.train)}, val {len(self.val)}, test {len(self.test)}, "
                f"{self.preprocess.kind}, {self.train.x.device}, from {self.location})")


@dataclass(frozen=True)
class DatasetStatus:
    """One line of `distillery datasets`: is it here, where, and how to get it."""

    name: str
    available: bool
    location: str | None
    how_to_get: str


def load_dataset(name: str, data_dir: str | None = None, device: str | torch.device = "cpu", zca: str | None = None,
                 val_fraction: float = 0.1, seed: int = 0, download: bool = False,
                 resolution: int | None = None) -> Dataset:
    """Read a dataset, hold out a stratified validation split of train, and preprocess every split once.

    `zca`: None (per-channel standardization), "kornia" (MTT/TESLA) or "kip" (RaT-BPTT); fitted on the remaining
    train split only. `resolution` applies to `imagefolder:<path>` only (default 32). `download=True` fetches a
    missing dataset into `data_dir` (else $DISTILLERY_DATA, else ./data)."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    device = resolve_device(device)
    spec, raw_train, raw_test, location = _read(name, data_dir, download, resolution)
    train_idx, val_idx = stratified_split(raw_train.labels, spec.num_classes, val_fraction, seed)

    x_train01 = to_float01(raw_train.images[train_idx], device)
    preprocess = fit_preprocess(spec, zca, x_train01)
    train = Split(preprocess.transform(x_train01), torch.from_numpy(raw_train.labels[train_idx]).to(device))
    del x_train01  # free the [0,1] copy before the other splits are built

    def split(images: np.ndarray, labels: np.ndarray) -> Split:
        """Preprocess one more split with the preprocessing fitted on train."""
        return Split(preprocess.transform(to_float01(images, device)), torch.from_numpy(labels).to(device))

    val = split(raw_train.images[val_idx], raw_train.labels[val_idx])
    test = split(raw_test.images, raw_test.labels)
    return Dataset(spec, preprocess, train, val, test, location, val_fraction)


def fit_preprocess(spec: DatasetSpec, zca: str | None, x_train01: Tensor) -> Preprocess:
    """Fit the preprocessing on the train images; a fitted ZCA is cached under $DISTILLERY_CACHE/zca, keyed by its
    kind and the digest of the exact fit images, because the fit costs ~25 s on CIFAR and minutes at 64x64."""
    pre = make_preprocess(spec.mean, spec.std, zca)
    if zca is None:
        return pre.fit(x_train01)
    digest = images_digest(x_train01)
    path = cache_dir() / "zca" / f"{pre.kind}-{digest[:32]}.safetensors"
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["preprocess"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            cached = Preprocess.from_state_dict({**meta, **tensors})
            check_fitted(cached, pre, x_train01.shape[1:], digest)
            return cached.to(x_train01.device)
        except (OSError, KeyError, ValueError, TypeError, AttributeError, SafetensorError) as err:
            warnings.warn(f"the ZCA cache {path} is damaged ({first_line(err)}); fitting the whitening again",
                          stacklevel=3)
    pre.fit(x_train01)
    try:  # a private temp file, renamed: another process reads the old file or the whole new one
        atomic_write_bytes(path, st_save(pre.tensors(), metadata={"preprocess": json.dumps(pre.meta())}))
    except UserError as err:
        warnings.warn(f"could not cache the ZCA fit ({err}); it will be fitted again next time", stacklevel=3)
    return pre


def stratified_split(labels: np.ndarray, num_classes: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) sorted index arrays: round(fraction * n_c) random images of each class are held out
    (at most n_c - 1, so no class loses all its images)."""
    rng = np.random.default_rng(seed)
    held_out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        n = min(int(round(fraction * len(idx))), max(len(idx) - 1, 0))
        held_out.append(rng.permutation(idx)[:n])
    held = np.sort(np.concatenate(held_out))
    return np.setdiff1d(np.arange(len(labels)), held), held


def dataset_status(data_dir: str | None = None) -> list[DatasetStatus]:
    """For each built-in dataset: whether its files are found, where, and how to get them."""
    rows = []
    for name in list_datasets():
        if name == "digits":
            rows.append(DatasetStatus(name, True, "bundled with scikit-learn", get_spec(name).how_to_get))
            continue
        found = _locate(name, data_dir)
        rows.append(DatasetStatus(name, found is not None, str(found[0]) if found else None,
                                  get_spec(name).how_to_get))
    return rows


def data_root(data_dir: str | None = None) -> Path:
    """Where downloads go (`distillery download`, download=True): data_dir, else $DISTILLERY_DATA, else ./data."""
    return _search_roots(data_dir)[0]


def _search_roots(data_dir: str | None) -> list[Path]:
    """The data roots in search order: data_dir, $DISTILLERY_DATA, ./data."""
    roots = [data_dir, os.environ.get(DATA_ENV), "data"]
    return list(dict.fromkeys(Path(r).expanduser().absolute() for r in roots if r))


def _locate(name: str, data_dir: str | None) -> tuple[Path, str] | None:
    """The first (folder, layout) holding the dataset, or None."""
    subdirs, layouts = _CANDIDATES[name]
    places = [root / sub for root in _search_roots(data_dir) for sub in subdirs]
    if data_dir:  # data_dir may also point straight at the dataset's own folder
        places.insert(0, Path(data_dir).expanduser())
    for folder in places + _SYSTEM_DIRS.get(name, []):
        layout = formats.folder_layout(folder) if folder.is_dir() else None
        if layout in layouts:
            return folder, layout
    return None


def _read(name: str, data_dir: str | None, download: bool,
          resolution: int | None) -> tuple[DatasetSpec, RawSplit, RawSplit, str]:
    """Find and read a dataset: (spec, raw train, raw test, where it was read from)."""
    if name.startswith(IMAGEFOLDER_PREFIX):
        root, resolution = imagefolder_root(name), check_resolution(resolution)
        channels = folders.detect_channels(root / "train")
        train = folders.read_image_folder(root / "train", resolution, channels)
        test = folders.read_image_folder(root / "test", resolution, channels, train.classes)
        return imagefolder_spec(root, resolution, train), train, test, str(root)
    spec = get_spec(name, resolution)
    if spec.name == "digits":
        return (spec, *read_sklearn_digits(), "scikit-learn")

    found = _locate(spec.name, data_dir)
    if found is None and download and spec.name in SOURCES:
        fetch_dataset(spec.name, data_root(data_dir))
        found = _locate(spec.name, data_dir)
    if found is None:
        roots = ", ".join(str(r) for r in _search_roots(data_dir) + _SYSTEM_DIRS.get(spec.name, []))
        subdirs = ", ".join(_CANDIDATES[spec.name][0])
        raise UserError(f"{spec.name} not found: looked in {roots} (data_dir, ${DATA_ENV}, ./data) for {subdirs}; "
                        f"get it with: {spec.how_to_get}")
    folder, layout = found
    train, test = _read_layout(spec, folder, layout)
    if len(train.classes) != spec.num_classes:
        raise UserError(f"{folder} holds {len(train.classes)} classes, but {spec.name} has {spec.num_classes}")
    if not spec.class_names:  # tiny-imagenet, imagenet-1k: class names (wnids, npz label numbers) come from the data
        spec = dataclasses.replace(spec, class_names=tuple(train.classes))
    return spec, train, test, str(folder)


def _read_layout(spec: DatasetSpec, folder: Path, layout: str) -> tuple[RawSplit, RawSplit]:
    """Read a built-in dataset's train and test splits from a folder of the given layout."""
    if layout == "idx":
        return formats.read_idx_dir(folder, spec.class_names)
    if layout == "cifar10-pickle":
        return formats.read_cifar10(folder)
    if layout == "cifar100-pickle":
        return formats.read_cifar100(folder)
    if layout == "tiny-imagenet":
        return folders.read_tiny_imagenet(folder, spec.im_size[0])
    if layout == "svhn-mat":
        return formats.read_svhn(folder)
    if layout == "imagenet-npz":
        return imagenet.read_imagenet_npz(folder, spec.im_size[0])
    if layout == "imagenet-folder" and spec.name in SUBSETS:
        return imagenet.read_imagenet_subset(folder, spec.name, spec.im_size[0])
    if layout == "imagenet-folder":
        return imagenet.read_imagenet_folder(folder, spec.im_size[0])
    order = _folder_order(folder / "train", spec)
    return tuple(folders.read_image_folder(folder / split, spec.im_size[0], spec.channels, order)
                 for split in ("train", "test"))


def _folder_order(train_dir: Path, spec: DatasetSpec) -> list[str]:
    """Class folder names in the dataset's label order: a folder matches a class by name ('airplane', 'T-shirt_top')
    or by a leading label number ('0', '0_T-shirt_top')."""
    def key(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    by_name = {key(c): i for i, c in enumerate(spec.class_names)}
    label_of = {}
    for folder in folders.class_folders(train_dir):
        number = re.match(r"\d+", folder)
        label = by_name.get(key(folder), int(number.group()) if number else None)
        if label is not None and label < spec.num_classes:
            label_of[label] = folder
    if len(label_of) != spec.num_classes:
        raise UserError(f"cannot match the class folders of {train_dir} to the {spec.num_classes} classes of "
                        f"{spec.name} ({', '.join(spec.class_names)}); name each folder after its class")
    return [label_of[i] for i in range(spec.num_classes)]
