"""Data layer: readers on small files written here in each format, dataset assembly, sampling, downloads, errors."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distillery.data import (
    dataset_status,
    digits,
    folders,
    formats,
    get_spec,
    list_datasets,
    load_dataset,
    to_float01,
)
from distillery.data import download as download_module
from distillery.data.download import download, fetch_dataset
from distillery.errors import UserError

FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real data roots or caches: cwd is a scratch folder and the cache lives under tmp_path."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("DISTILLERY_DATA", raising=False)
    monkeypatch.delenv("DISTILLERY_MIRROR", raising=False)
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


# ---------------------------------------------------------------- helpers that write each format


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (magic 2051 for 3-d images, 2049 for 1-d labels), gzipped when the name ends in .gz."""
    magic = 2051 if array.ndim == 3 else 2049
    data = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_mnist_like(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = False) -> None:
    """The four MNIST IDX files with random 28x28 images and labels cycling 0..9."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10)


def write_cifar_pickle(path: Path, obj: dict) -> None:
    """Pickle with byte-string keys and protocol 2, like the original Python 2 CIFAR files."""
    path.write_bytes(pickle.dumps({k.encode(): v for k, v in obj.items()}, protocol=2))


def cifar_batch(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Random CIFAR rows (N, 3072) and labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, num_classes, n)]


def write_png_tree(root: Path, classes: dict[str, int], per_class: int, size: int, mode: str = "RGB") -> None:
    """root/<class>/<i>.png filled with the constant value given per class."""
    for name, value in classes.items():
        (root / name).mkdir(parents=True)
        color = value if mode == "L" else (value, value, value)
        for i in range(per_class):
            Image.new(mode, (size, size), color).save(root / name / f"{i}.png")


# ---------------------------------------------------------------- registry


def test_registry_specs_and_unknown_name():
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "tiny-imagenet"} <= set(list_datasets())
    assert get_spec("mnist").dsa_strategy == "color_crop_cutout_scale_rotate"
    assert get_spec("fashion-mnist").dsa_strategy == "color_crop_cutout_flip_scale_rotate"
    assert get_spec("CIFAR10").mean == (0.4914, 0.4822, 0.4465)
    assert len(get_spec("cifar100").class_names) == 100
    assert get_spec("tiny-imagenet").default_model == "ConvNetD4"
    assert get_spec("digits").default_model == "ConvNetD2" and get_spec("digits").im_size == (8, 8)
    with pytest.raises(UserError, match="unknown dataset 'cifar11'; choose one of: digits, mnist") as e:
        get_spec("cifar11")
    assert "\n" not in str(e.value) and "imagefolder:<path>" in str(e.value)
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("stl10")


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader(tmp_path, gz):
    write_mnist_like(tmp_path, gz=gz)
    train, test = formats.read_idx_dir(tmp_path, get_spec("mnist").class_names)
    assert train.images.shape == (30, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.labels.dtype == np.int64 and test.labels.tolist() == list(range(10))
    assert train.classes == [str(d) for d in range(10)]


def test_idx_corrupt_files_name_the_file(tmp_path):
    write_mnist_like(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])  # truncated
    with pytest.raises(UserError, match="train-images-idx3-ubyte is truncated or corrupt"):
        formats.read_idx_dir(tmp_path, get_spec("mnist").class_names)
    images.write_bytes(b"\x00\x00\x01\x00" + bytes(100))  # wrong magic
    with pytest.raises(UserError, match="is not a uint8 IDX file"):
        formats.read_idx_file(images)
    bad_gz = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad_gz.write_bytes(gzip.compress(np.random.default_rng(0).bytes(1000))[:500])  # cut-off gzip stream
    with pytest.raises(UserError, match="cannot read IDX file .*t10k-labels-idx1-ubyte.gz"):
        formats.read_idx_file(bad_gz)
    # the same error reaches load_dataset users, naming the file
    data = tmp_path / "root"
    write_mnist_like(data / "mnist" / "MNIST" / "raw")
    labels = data / "mnist" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:12])
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte is truncated"):
        load_dataset("mnist", data_dir=str(data))


def test_load_mnist_from_torchvision_layout(tmp_path):
    write_mnist_like(tmp_path / "MNIST" / "raw", n_train=100, gz=True)
    ds = load_dataset("mnist", data_dir=str(tmp_path), val_fraction=0.2)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (80, 20, 10)
    assert ds.location.endswith("MNIST/raw") and ds.train.x.shape[1:] == (1, 28, 28)


# ---------------------------------------------------------------- CIFAR pickles


def write_cifar10(folder: Path) -> list[tuple[np.ndarray, list[int]]]:
    """A cifar-10-batches-py folder with 4 random images per batch; returns the six (data, labels) batches."""
    folder.mkdir(parents=True)
    write_cifar_pickle(folder / "batches.meta", {"label_names": [n.encode() for n in get_spec("cifar10").class_names]})
    batches = [cifar_batch(4, 10, seed) for seed in range(6)]
    for i, (data, labels) in enumerate(batches[:5], 1):
        write_cifar_pickle(folder / f"data_batch_{i}", {"data": data, "labels": labels})
    write_cifar_pickle(folder / "test_batch", {"data": batches[5][0], "labels": batches[5][1]})
    return batches


def test_cifar10_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_cifar10(folder)
    names = list(get_spec("cifar10").class_names)

    train, test = formats.read_cifar10(folder)
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (4, 32, 32, 3)
    assert train.classes == names and train.labels.tolist() == sum((b[1] for b in batches[:5]), [])
    row = batches[0][0][0]  # 1024 red, then 1024 green, then 1024 blue values in row-major order
    assert train.images[0, 0, 1].tolist() == [row[1], row[1024 + 1], row[2048 + 1]]
    x = to_float01(train.images)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert x[0, 2, 0, 1].item() == pytest.approx(row[2048 + 1] / 255)

    ds = load_dataset("cifar10", data_dir=str(tmp_path), val_fraction=0)
    assert ds.location == str(folder) and (len(ds.train), len(ds.val), len(ds.test)) == (20, 0, 4)


def test_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = list(get_spec("cifar100").class_names)
    write_cifar_pickle(folder / "meta", {"fine_label_names": [n.encode() for n in names],
                                         "coarse_label_names": [b"x"] * 20})
    for split, seed in (("train", 0), ("test", 1)):
        data, labels = cifar_batch(6, 100, seed)
        write_cifar_pickle(folder / split, {"data": data, "fine_labels": labels, "coarse_labels": [0] * 6})
    train, test = formats.read_cifar100(folder)
    assert train.images.shape == (6, 32, 32, 3) and train.classes == names
    assert test.labels.tolist() == cifar_batch(6, 100, 1)[1]


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "batches.meta").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="cannot read CIFAR file .*batches.meta.*refusing to load builtins.print"):
        formats.read_cifar10(tmp_path)


# ---------------------------------------------------------------- image folders and Tiny-ImageNet


def test_image_folder_reader_resizes_and_caches(tmp_path):
    root = tmp_path / "imgs" / "train"
    write_png_tree(root, {"cat": 10, "dog": 200}, per_class=3, size=40)
    split = folders.read_image_folder(root, 32, 3)
    assert split.images.shape == (6, 32, 32, 3) and split.classes == ["cat", "dog"]
    assert split.labels.tolist() == [0, 0, 0, 1, 1, 1] and split.images[3].min() == 200  # constant survives resize
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1
    again = folders.read_image_folder(root, 32, 3)
    assert np.array_equal(again.images, split.images) and len(list((tmp_path / "cache").glob("*.npz"))) == 1
    Image.new("RGB", (48, 48), (7, 7, 7)).save(root / "dog" / "0.png")  # an edited file is decoded again
    assert folders.read_image_folder(root, 32, 3).images[3].max() == 7
    with pytest.raises(UserError, match="class folders of .* are \\['cat', 'dog'\\]; expected exactly"):
        folders.read_image_folder(root, 32, 3, classes=["cat", "bird"])
    (root / "dog" / "1.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image .*1.png"):
        folders.read_image_folder(root, 32, 3)


def test_load_user_imagefolder(tmp_path):
    root = tmp_path / "mine"
    for split, n in (("train", 10), ("test", 2)):
        write_png_tree(root / split, {"b": 0, "a": 255}, per_class=n, size=16, mode="L")
    spec = get_spec(f"imagefolder:{root}", resolution=8)
    assert (spec.channels, spec.im_size, spec.class_names, spec.num_classes) == (1, (8, 8), ("a", "b"), 2)
    assert spec.mean == (0.5,) and spec.std == (0.5,)
    ds = load_dataset(f"imagefolder:{root}", resolution=8, val_fraction=0.2)
    assert ds.spec == spec and ds.train.x.shape == (16, 1, 8, 8) and len(ds.val) == 4 and len(ds.test) == 4
    assert torch.allclose(ds.train.x[ds.train.y == 0], torch.tensor(1.0))  # class 'a' = white, standardized
    with pytest.raises(UserError, match="resolution applies only to imagefolder"):
        get_spec("mnist", resolution=32)
    with pytest.raises(UserError, match="expected class folders under"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")


def test_builtin_dataset_from_image_folder_tree(tmp_path):
    """The CIFAR-10 JPEG pack layout, and folders named by label number ('0_T-shirt_top', as prepare.sh writes)."""
    names = get_spec("cifar10").class_names
    for split in ("train", "test"):
        write_png_tree(tmp_path / "cifar10-jpeg" / split, {n: 10 * i for i, n in enumerate(names)}, 2, 32)
    ds = load_dataset("cifar10", data_dir=str(tmp_path), val_fraction=0)
    raw01 = ds.preprocess.inverse(ds.train.x)
    for c in range(10):
        assert torch.allclose(raw01[ds.class_indices[c]], torch.tensor(10 * c / 255), atol=1e-5)

    by_number = {f"{i}_{n.replace('/', '_').replace(' ', '_')}": 20 * i
               for i, n in enumerate(get_spec("fashion-mnist").class_names)}
    for split in ("train", "test"):
        write_png_tree(tmp_path / "fashion-mnist" / split, by_number, 1, 28, mode="L")
    ds = load_dataset("fashion-mnist", data_dir=str(tmp_path), val_fraction=0)
    assert ds.location == str(tmp_path / "fashion-mnist")
    assert torch.allclose(ds.preprocess.inverse(ds.test.x)[ds.test.y == 9], torch.tensor(180 / 255), atol=1e-5)


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for k, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), (k, 0, 0)).save(folder / f"{wnid}_{i}.JPEG", quality=100)
        Image.new("L", (64, 64), 50).save(root / "val" / "images" / f"val_{k}.JPEG")  # grayscale files exist too
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")

    train, test = folders.read_tiny_imagenet(root)
    assert train.classes == ["n01", "n02", "n03"] and train.images.shape == (6, 64, 64, 3)
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.labels.tolist() == [1, 0, 2] and test.images.shape == (3, 64, 64, 3)
    with pytest.raises(UserError, match="holds 3 classes, but tiny-imagenet has 200"):
        load_dataset("tiny-imagenet", data_dir=str(tmp_path))


# ---------------------------------------------------------------- Dataset assembly and sampling


def test_digits_splits_and_stratification():
    ds = load_dataset("digits", val_fraction=0.1, seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1078, 120, 599)
    assert ds.train.x.shape[1:] == (1, 8, 8) and ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    val_counts = torch.bincount(ds.val.y, minlength=10)
    assert val_counts.min() >= 11 and val_counts.max() <= 13  # ~10% of each class's ~120 train images
    assert abs(ds.train.x.mean().item()) < 0.01 and abs(ds.train.x.std().item() - 1) < 0.02  # hard-coded mean/std
    assert [len(i) for i in ds.class_indices] == torch.bincount(ds.train.y).tolist()
    assert all((ds.train.y[i] == c).all() for c, i in enumerate(ds.class_indices))
    # val is disjoint from train, the same for the same seed, different for another seed
    train_rows = {tuple(r.tolist()) for r in ds.train.x.flatten(1)}
    assert sum(tuple(r.tolist()) in train_rows for r in ds.val.x.flatten(1)) < 5  # digits has a few duplicates
    assert torch.equal(load_dataset("digits", seed=0).val.x, ds.val.x)
    assert not torch.equal(load_dataset("digits", seed=1).val.x, ds.val.x)
    assert torch.equal(load_dataset("digits", val_fraction=0).test.x, ds.test.x)
    with pytest.raises(UserError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)



def test_digits_read_without_sklearn_equals_load_digits():
    """The bundled CSV read directly gives load_digits' arrays, and the split is train_test_split's, exactly."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ref = load_digits()
    images, labels = digits.sklearn_digits()
    assert images.dtype == ref.images.dtype and np.array_equal(images, ref.images)
    assert np.array_equal(labels, ref.target)
    train_idx, test_idx = train_test_split(np.arange(len(ref.target)), test_size=1 / 3, random_state=0,
                                           stratify=ref.target)
    train, test = digits.read_sklearn_digits()
    expected = np.rint(ref.images * (255 / 16)).astype(np.uint8)[..., None]
    assert np.array_equal(train.images, expected[np.sort(train_idx)])
    assert np.array_equal(test.images, expected[np.sort(test_idx)])
    assert np.array_equal(test.labels, ref.target[np.sort(test_idx)])
    for seed, n_test in ((1, 100), (7, 1001)):  # other draws too, so agreement is not a coincidence of one seed
        a, b = train_test_split(np.arange(len(ref.target)), test_size=n_test, random_state=seed, stratify=ref.target)
        mine = digits.stratified_shuffle_split(ref.target, n_test, seed)
        assert np.array_equal(mine[0], np.sort(a)) and np.array_equal(mine[1], np.sort(b))


def test_digits_load_imports_no_sklearn():
    code = ("import sys; from distillery.data import load_dataset; load_dataset('digits'); "
            "print(any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_digits_falls_back_to_load_digits_without_the_csv(monkeypatch):
    import sklearn.datasets

    calls = []
    real = sklearn.datasets.load_digits

    def counting_load_digits(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sklearn.datasets, "load_digits", counting_load_digits)
    direct = digits.sklearn_digits()
    assert calls == []  # the CSV is installed here: read directly
    monkeypatch.setattr(digits, "DIGITS_CSV", ("datasets", "data", "no-such-digits.csv.gz"))
    images, labels = digits.sklearn_digits()
    assert calls == [1]
    assert np.array_equal(images, direct[0]) and np.array_equal(labels, direct[1])

def test_sample_real_and_random_set():
    ds = load_dataset("digits", val_fraction=0.5)
    n3 = len(ds.class_indices[3])
    g = torch.Generator().manual_seed(0)
    every = ds.sample_real(3, n3, g)  # k = class size: a permutation of the whole class, no repeats
    assert torch.equal(every.flatten(1).sort(0).values, ds.train.x[ds.class_indices[3]].flatten(1).sort(0).values)
    a = ds.sample_real(3, 5, torch.Generator().manual_seed(1))
    assert torch.equal(a, ds.sample_real(3, 5, torch.Generator().manual_seed(1)))
    with pytest.raises(UserError, match=f"class 3 \\('3'\\) of digits has only {n3} training images, cannot draw"):
        ds.sample_real(3, n3 + 1, g)
    x, y = ds.random_set(4, g)
    assert x.shape == (40, 1, 8, 8) and y.tolist() == [c for c in range(10) for _ in range(4)]


def test_zca_is_fitted_on_train_only():
    ds = load_dataset("digits", zca="kornia")
    assert ds.preprocess.kind == "zca-kornia"
    assert torch.allclose(ds.preprocess.inverse(ds.train.x).mean(0), to_float01(
        digits.read_sklearn_digits()[0].images).mean(0), atol=0.02)


@pytest.mark.skipif(not FASHION_DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_package():
    ds = load_dataset("fashion-mnist")
    assert ds.location == str(FASHION_DEBIAN)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54000, 6000, 10000)
    assert torch.bincount(ds.test.y).tolist() == [1000] * 10
    assert abs(ds.train.x.mean().item()) < 0.01  # SPEC mean 0.2861 / std 0.3530 fit the data


def test_missing_dataset_says_where_and_how():
    with pytest.raises(UserError) as e:
        load_dataset("cifar100", data_dir="/nonexistent/dir")
    msg = str(e.value)
    assert "cifar100 not found: looked in /nonexistent/dir" in msg and "distillery download cifar100" in msg
    assert "\n" not in msg
    status = {s.name: s for s in dataset_status()}
    assert status["digits"].available and not status["cifar100"].available
    assert "distillery download cifar10" in status["cifar10"].how_to_get


# ---------------------------------------------------------------- downloads (local server only)




def test_download_verifies_checksum(server, tmp_path):
    root, url = server
    payload = bytes(range(256)) * 5000
    (root / "file.bin").write_bytes(payload)
    dest = tmp_path / "out" / "file.bin"
    assert download(url + "file.bin", dest, hashlib.sha256(payload).hexdigest(), progress=False) == dest
    assert dest.read_bytes() == payload
    dest.unlink()
    download(url + "file.bin", dest, md5=hashlib.md5(payload).hexdigest(), progress=False)
    assert dest.read_bytes() == payload

    bad = tmp_path / "out" / "bad.bin"
    with pytest.raises(UserError, match=f"checksum mismatch for .*expected sha256 {'0' * 64}, got "
                                        f"{hashlib.sha256(payload).hexdigest()}; the download was deleted, not kept"):
        download(url + "file.bin", bad, "0" * 64, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["file.bin"]  # no partial or temp file
    with pytest.raises(UserError, match="cannot download .*missing.bin.*404"):
        download(url + "missing.bin", bad, "0" * 64, progress=False)


def test_fetch_dataset_uses_mirror_and_keeps_nothing_bad(server, tmp_path, monkeypatch):
    root, url = server
    write_mnist_like(root, gz=True)  # right names, wrong contents
    monkeypatch.setenv("DISTILLERY_MIRROR", url)
    data = tmp_path / "data"
    with pytest.raises(UserError, match="checksum mismatch for .*train-images-idx3-ubyte.gz: expected md5 f68b3c2d"):
        fetch_dataset("mnist", data, progress=False)
    assert [p for p in data.rglob("*") if p.is_file()] == []
    with pytest.raises(UserError, match="imagenet-1k has no automatic download .*register at image-net.org"):
        fetch_dataset("imagenet-1k", data)


def test_fetch_dataset_success_paths(server, tmp_path, monkeypatch):
    """With checksums patched to match small fake files: .gz IDX files end up decompressed and verified in the
    torchvision layout, a tarball is extracted atomically; load_dataset(download=True) finds both."""
    root, url = server
    write_mnist_like(root, gz=True)
    idx_source = download_module.Source(
        url, {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in root.glob("*.gz")}, "mnist/MNIST/raw",
        {f.name[:-3]: hashlib.sha256(gzip.decompress(f.read_bytes())).hexdigest() for f in root.glob("*.gz")})
    write_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    tar_source = download_module.Source(
        "https://example.invalid/", {"cifar-10-python.tar.gz": hashlib.md5(
            (root / "cifar-10-python.tar.gz").read_bytes()).hexdigest()}, "cifar-10-batches-py")
    monkeypatch.setitem(download_module.SOURCES, "mnist", idx_source)
    monkeypatch.setitem(download_module.SOURCES, "cifar10", tar_source)
    monkeypatch.setenv("DISTILLERY_MIRROR", url)  # overrides the unreachable base url above

    data = tmp_path / "data"
    ds = load_dataset("mnist", data_dir=str(data), download=True)
    assert ds.location == str(data / "mnist" / "MNIST" / "raw") and len(ds.test) == 10
    assert sorted(p.name for p in (data / "mnist" / "MNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    assert fetch_dataset("cifar10", data, progress=False) == data / "cifar-10-batches-py"
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-batches-py", "mnist"]  # archive and temp dir gone
    assert len(load_dataset("cifar10", data_dir=str(data)).test) == 4


def test_zca_fit_is_cached_and_a_damaged_cache_is_refitted(tmp_path, monkeypatch):
    """The second load reads the cached ZCA (same fingerprint, same images); a corrupt cache file is refitted."""
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path))
    a = load_dataset("digits", zca="kornia")
    files = list((tmp_path / "zca").glob("*.safetensors"))
    assert len(files) == 1
    b = load_dataset("digits", zca="kornia")
    assert a.preprocess.fingerprint() == b.preprocess.fingerprint()
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.x, b.test.x)
    files[0].write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="ZCA cache .* is damaged"):
        c = load_dataset("digits", zca="kornia")
    assert torch.equal(a.test.x, c.test.x) and files[0].stat().st_size > 100
