"""On-disk readers of the small formats: IDX, CIFAR pickles and SVHN .mat files, and which layout a folder holds
(image-folder trees and Tiny-ImageNet are read in `folders.py`, ImageNet in `imagenet.py`, scikit-learn's digits in
`digits.py`).

Every reader returns `RawSplit`s of uint8 `(N, H, W, C)` images and int64 labels. Readers check what they read and
raise `UserError` naming the file at fault.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


@dataclass
class RawSplit:
    """One split as read from disk: uint8 images (N,H,W,C), int64 labels (N,), class names in label order."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def to_float01(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N,H,W,C) -> float32 (N,C,H,W) in [0,1] on `device` (moved as uint8 first: 4x less copying)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(255)


def folder_layout(folder: Path) -> str | None:
    """Which on-disk layout a folder holds: 'idx', 'cifar10-pickle', 'cifar100-pickle', 'svhn-mat', 'tiny-imagenet',
    'imagenet-npz', 'imagefolder', 'imagenet-folder' (train/ and val/), or None."""
    if all(_find_idx(folder, name) for pair in IDX_FILES.values() for name in pair):
        return "idx"
    if (folder / "data_batch_1").is_file():
        return "cifar10-pickle"
    if (folder / "train").is_file() and (folder / "meta").is_file():
        return "cifar100-pickle"
    if all((folder / name).is_file() for name in SVHN_FILES.values()):
        return "svhn-mat"
    if (folder / "wnids.txt").is_file():
        return "tiny-imagenet"
    if any(any(place.glob("train_data_batch_*.npz")) for place in (folder, *_subfolders(folder))):
        return "imagenet-npz"
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return "imagefolder"
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        return "imagenet-folder"
    return None


def _subfolders(folder: Path) -> list[Path]:
    """The non-hidden subfolders of a folder, sorted (none if it cannot be listed)."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def _find_idx(folder: Path, name: str) -> Path | None:
    """`folder/name`, or `folder/name.gz`, whichever exists (uncompressed first)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx_file(path: Path) -> np.ndarray:
    """Parse one uint8 IDX file (optionally gzipped), checking magic number, shape and length."""
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read IDX file {path}: {e}; download it again") from e
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic not in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC):
        raise UserError(f"{path} is not a uint8 IDX file (magic {magic}, expected {_IDX_IMAGES_MAGIC} for images "
                        f"or {_IDX_LABELS_MAGIC} for labels); download it again")
    ndim = 3 if magic == _IDX_IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else ()
    expected = header + int(np.prod(dims)) if dims else None
    if len(data) != expected:
        raise UserError(f"{path} is truncated or corrupt ({len(data)} bytes; its header promises shape {dims}, "
                        f"{expected} bytes); download it again")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def read_idx_pair(images_path: Path, labels_path: Path, classes: Sequence[str]) -> RawSplit:
    """An images file and a labels file -> RawSplit with a channel axis added (N,H,W,1)."""
    images, labels = read_idx_file(images_path), read_idx_file(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise UserError(f"{images_path} / {labels_path}: expected an images file (magic 2051) and a labels file "
                        f"(magic 2049); are the two swapped?")
    if len(images) != len(labels):
        raise UserError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                        f"download both again")
    return RawSplit(images[..., None], _checked_labels(labels, len(classes), labels_path), list(classes))


def read_idx_dir(folder: Path, classes: Sequence[str]) -> tuple[RawSplit, RawSplit]:
    """Train and test splits from a folder holding the four MNIST-style IDX files (plain or .gz)."""
    splits = []
    for split, (images_name, labels_name) in IDX_FILES.items():
        paths = [_find_idx(folder, images_name), _find_idx(folder, labels_name)]
        if None in paths:
            raise UserError(f"{folder} lacks {images_name} or {labels_name} (plain or .gz) for the {split} split")
        splits.append(read_idx_pair(paths[0], paths[1], classes))
    return splits[0], splits[1]


def _checked_labels(labels: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """Labels as int64, refusing values outside 0..num_classes-1."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{path} has labels outside 0..{num_classes - 1} (min {labels.min()}, max {labels.max()})")
    return labels


# ---------------------------------------------------------------- CIFAR python pickles


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, so a tampered data file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        """Allow only the numpy reconstruction helpers."""
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    """Load one CIFAR pickle (written by Python 2: byte-string keys), with the key names decoded to str."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise UserError(f"cannot read CIFAR file {path}: {e}; download the dataset again") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR batch (expected a dict, got {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_split(path: Path, label_key: str, classes: list[str]) -> RawSplit:
    """One CIFAR batch file -> RawSplit; the rows are 3072 bytes: R plane, G plane, B plane of a 32x32 image."""
    batch = _load_pickle(path)
    if "data" not in batch or label_key not in batch:
        raise UserError(f"{path} lacks the 'data' or '{label_key}' entry; is it a CIFAR file of the right kind?")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise UserError(f"{path} holds data of shape {data.shape} with {len(labels)} labels; "
                        f"expected (N, 3072) and N labels")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return RawSplit(np.ascontiguousarray(images), _checked_labels(labels, len(classes), path), classes)


def _class_names(meta_path: Path, key: str) -> list[str]:
    """Class names from a CIFAR meta file."""
    meta = _load_pickle(meta_path)
    if key not in meta:
        raise UserError(f"{meta_path} lacks '{key}'; is it the CIFAR meta file?")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


def read_cifar10(folder: Path) -> tuple[RawSplit, RawSplit]:
    """Train (data_batch_1..5) and test (test_batch) from a `cifar-10-batches-py` folder."""
    folder = Path(folder)
    classes = _class_names(folder / "batches.meta", "label_names")
    parts = [_cifar_split(folder / f"data_batch_{i}", "labels", classes) for i in range(1, 6)]
    train = RawSplit(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]), classes)
    return train, _cifar_split(folder / "test_batch", "labels", classes)


def read_cifar100(folder: Path) -> tuple[RawSplit, RawSplit]:
    """Train and test with the 100 fine labels from a `cifar-100-python` folder."""
    folder = Path(folder)
    classes = _class_names(folder / "meta", "fine_label_names")
    return (_cifar_split(folder / "train", "fine_labels", classes),
            _cifar_split(folder / "test", "fine_labels", classes))


# ---------------------------------------------------------------- SVHN (.mat files)


def read_svhn_mat(path: Path) -> RawSplit:
    """One SVHN cropped-digits file: `X` (32, 32, 3, N) uint8 and `y` (N, 1) with 1..10, where 10 is the digit 0."""
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError as e:
        raise UserError("reading SVHN's .mat files needs scipy (it comes with scikit-learn): pip install scipy") from e
    try:
        mat = loadmat(path)
    except (OSError, ValueError, TypeError, NotImplementedError, MatReadError) as e:
        raise UserError(f"cannot read SVHN file {path}: {e}; download it again") from e
    if "X" not in mat or "y" not in mat:
        raise UserError(f"{path} lacks the 'X' or 'y' matrix; is it SVHN's train_32x32.mat or test_32x32.mat?")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y) or x.dtype != np.uint8:
        raise UserError(f"{path} holds {x.dtype} X of shape {x.shape} with {len(y)} labels; "
                        f"expected uint8 (32, 32, 3, N) and N labels")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise UserError(f"{path} has labels outside 1..10 (min {y.min()}, max {y.max()})")
    return RawSplit(np.ascontiguousarray(x.transpose(3, 0, 1, 2)), y % 10, [str(d) for d in range(10)])


def read_svhn(folder: Path) -> tuple[RawSplit, RawSplit]:
    """Train (73,257 images) and test (26,032) from a folder holding train_32x32.mat and test_32x32.mat."""
    return read_svhn_mat(Path(folder) / SVHN_FILES["train"]), read_svhn_mat(Path(folder) / SVHN_FILES["test"])
