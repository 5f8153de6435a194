"""On-disk readers: IDX, CIFAR pickles, SVHN .mat files, image-folder trees, Tiny-ImageNet and scikit-learn digits
(ImageNet's readers are in `imagenet.py`).

Every reader returns `RawSplit`s of uint8 `(N, H, W, C)` images and int64 labels. Readers check what they read and
raise `UserError` naming the file at fault. Decoding image files is slow, so decoded arrays are cached as `.npz`
under `cache_dir()` (keyed by the file list, sizes and mtimes, so edited folders are decoded again).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import struct
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import UserError
from ..io import atomic_write_bytes

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049
_CACHE_VERSION = 1  # bump when the decoding changes, so old cache files are not used
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
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


def cache_dir() -> Path:
    """Where decoded image arrays are cached: $DISTILLERY_CACHE, else ~/.cache/distillery."""
    return Path(os.environ.get("DISTILLERY_CACHE") or Path.home() / ".cache" / "distillery")


def layout_of(folder: Path) -> str | None:
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


# ---------------------------------------------------------------- image files (image folders, Tiny-ImageNet)


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
    return _decode_cached(tag, files, np.array(labels, dtype=np.int64), list(classes), resolution, channels, crop)


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
    train = _decode_cached("tiny-imagenet-train", files, np.array(labels, dtype=np.int64), wnids, resolution, 3)

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
    test = _decode_cached("tiny-imagenet-test", files, np.array(labels, dtype=np.int64), wnids, resolution, 3)
    return train, test


def _resize_and_crop(im: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to `resolution` (the longer one to int(res * long / short)), then the centred square: the
    sizes and offsets of torchvision's Resize(res) and CenterCrop(res)."""
    w, h = im.size
    if min(w, h) != resolution:
        scale = resolution / min(w, h)
        w, h = (resolution, int(h * scale)) if w <= h else (int(w * scale), resolution)
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    left, top = int(round((w - resolution) / 2)), int(round((h - resolution) / 2))
    return im.crop((left, top, left + resolution, top + resolution))


def _decode_one(path: str, resolution: int, mode: str, crop: bool = False) -> np.ndarray:
    """Decode one image file to a (res, res, C) uint8 array (squashed to a square, or resized and centre-cropped)."""
    try:
        with Image.open(path) as im:
            if im.mode != mode:
                im = im.convert(mode)
            if crop:
                im = _resize_and_crop(im, resolution)
            elif im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.Resampling.BILINEAR)
            array = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}; remove or replace the file") from e
    return array.reshape(resolution, resolution, -1)


def _decode_all(tag: str, files: list[str], resolution: int, channels: int, crop: bool = False) -> np.ndarray:
    """Decode many image files with a thread pool and a progress bar (PIL releases the GIL only inside the
    decoder, so the gain over one thread is modest; the npz cache makes it a one-time cost)."""
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), resolution, resolution, channels), dtype=np.uint8)
    chunk = 512

    def work(start: int) -> int:
        for i in range(start, min(start + chunk, len(files))):
            out[i] = _decode_one(files[i], resolution, mode, crop)
        return min(chunk, len(files) - start)

    workers = min(32, (os.cpu_count() or 1) + 4)
    with ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(files), desc=f"decoding {tag}", unit="img",
                 disable=None, leave=False) as bar:
        for done in pool.map(work, range(0, len(files), chunk)):
            bar.update(done)
    return out


def _decode_cached(tag: str, files: list[str], labels: np.ndarray, classes: list[str], resolution: int,
                   channels: int, crop: bool = False) -> RawSplit:
    """Decode `files`, or load the arrays decoded earlier from the npz cache when no file has changed."""
    if not files:
        raise UserError(f"no images listed for {tag}")
    stats = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise UserError(f"cannot read image file {f}: {e.strerror}") from e
        stats.append((f, st.st_size, st.st_mtime_ns))
    key = json.dumps([_CACHE_VERSION, resolution, channels, classes, labels.tolist(), stats]
                     + (["center-crop"] if crop else []))  # unchanged keys for the square resize
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    path = cache_dir() / f"{tag}-{len(files)}-{digest}.npz"

    if path.is_file():
        cached = _read_decoded(path, (len(files), resolution, resolution, channels), labels, classes)
        if cached is not None:
            return cached
    images = _decode_all(tag, files, resolution, channels, crop)
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels, classes=np.array(classes))
    try:
        atomic_write_bytes(path, buffer.getvalue())  # a private temp file, renamed: readers see old or whole
    except UserError as e:
        warnings.warn(f"could not cache decoded images ({e}); they will be decoded again next time", stacklevel=3)
    return RawSplit(images, labels, list(classes))


def _read_decoded(path: Path, shape: tuple[int, ...], labels: np.ndarray, classes: list[str]) -> RawSplit | None:
    """The decoded-image cache file `path` if it holds exactly what was decoded (uint8 images of `shape`, the
    same labels and classes); otherwise a warning and None, so the images are decoded again and the file rewritten."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            images, got_labels, got_classes = cached["images"], cached["labels"], [str(c) for c in cached["classes"]]
        if images.dtype != np.uint8 or images.shape != shape:
            raise ValueError(f"images are {images.dtype} {images.shape}, expected uint8 {shape}")
        if not np.array_equal(got_labels, labels) or got_classes != list(classes):
            raise ValueError("its labels or class names differ from the files'")
    except Exception as e:  # noqa: BLE001 - the npz reader raises many kinds (even tokenize errors); rebuild
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        warnings.warn(f"the decoded-image cache {path} is damaged ({why}); decoding the images again", stacklevel=4)
        return None
    return RawSplit(images, got_labels.astype(np.int64), got_classes)


# ---------------------------------------------------------------- scikit-learn digits


DIGITS_CSV = ("datasets", "data", "digits.csv.gz")  # inside the scikit-learn package: 64 pixels 0..16, label


def read_sklearn_digits() -> tuple[RawSplit, RawSplit]:
    """scikit-learn's 1,797 8x8 digits with a fixed stratified split (1/3 test, random_state=0).

    Pixel values 0..16 become round(v * 255 / 16) so that 16 maps to exactly 255."""
    pixels, target = sklearn_digits()
    images = np.rint(pixels * (255 / 16)).astype(np.uint8)[..., None]
    labels = target.astype(np.int64)
    train_idx, test_idx = stratified_shuffle_split(labels, n_test=math.ceil(len(labels) / 3), seed=0)
    classes = [str(d) for d in range(10)]
    return (RawSplit(images[train_idx], labels[train_idx], classes),
            RawSplit(images[test_idx], labels[test_idx], classes))


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """`load_digits()`'s images (1797, 8, 8) float64 0..16 and labels, read straight from the CSV bundled with
    scikit-learn when it is found (importing scikit-learn costs seconds), else through `load_digits`."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((p for p in (Path(f).joinpath(*DIGITS_CSV) for f in folders) if p.is_file()), None)
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def stratified_shuffle_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sorted indices, the same as scikit-learn's `train_test_split(np.arange(n), test_size=n_test,
    random_state=seed, stratify=labels)` (its StratifiedShuffleSplit, re-done here to spare importing it)."""
    rng = np.random.RandomState(seed)
    _, y_indices, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _approximate_mode(class_counts, len(labels) - n_test, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train, test = [], []
    for i, count in enumerate(class_counts):
        perm = class_indices[i].take(rng.permutation(count), mode="clip")
        train.extend(perm[:n_i[i]])
        test.extend(perm[n_i[i]:n_i[i] + t_i[i]])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Draws per class for a stratified sample of n_draws: the floored proportional shares, the rest given to the
    largest remainders with ties broken at random (scikit-learn's `_approximate_mode`)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)
