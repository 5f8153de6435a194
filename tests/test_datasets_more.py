"""SVHN, ImageNet-1K@64 (npz batches and image folders), MTT's ImageNet subsets and the SVHN / Tiny-ImageNet
downloads: each read from small files written here in its published format; downloads only from 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distillery.cli import main
from distillery.data import folders, formats, get_spec, imagenet, load_dataset
from distillery.data import download as download_module
from distillery.data.download import fetch_dataset
from distillery.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real data roots or caches: cwd is a scratch folder and the cache lives under tmp_path."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    for var in ("DISTILLERY_DATA", "DISTILLERY_MIRROR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")




def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- SVHN


def write_svhn_mat(path: Path, labels: list[int]) -> np.ndarray:
    """An SVHN-format .mat file: X (32, 32, 3, N) uint8 and y (N, 1) in 1..10; returns the images as (N, H, W, C)."""
    from scipy.io import savemat

    n = len(labels)
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    savemat(path, {"X": images.transpose(1, 2, 3, 0), "y": np.array(labels, dtype=np.uint8)[:, None]})
    return images


def write_svhn(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    train = write_svhn_mat(folder / "train_32x32.mat", [1 + i % 10 for i in range(40)])  # 10 = digit 0
    test = write_svhn_mat(folder / "test_32x32.mat", [10, 3, 7, 1, 2, 4, 5, 6, 8, 9, 10])
    return train, test


def test_svhn_mat_files(tmp_path):
    pytest.importorskip("scipy")
    train_images, test_images = write_svhn(tmp_path / "svhn")
    train, test = formats.read_svhn(tmp_path / "svhn")
    assert train.images.shape == (40, 32, 32, 3) and np.array_equal(train.images, train_images)  # X[h, w, c, n]
    assert train.labels.tolist()[:11] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert test.labels.tolist()[:3] == [0, 3, 7] and np.array_equal(test.images, test_images)

    ds = load_dataset("svhn", data_dir=str(tmp_path), val_fraction=0)
    spec = get_spec("svhn")
    assert ds.spec == spec and spec.mean == (0.4377, 0.4438, 0.4728) and "flip" not in spec.dsa_strategy
    assert ds.train.x.shape == (40, 3, 32, 32) and ds.location == str(tmp_path / "svhn")
    raw = torch.from_numpy(train_images).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(ds.preprocess.inverse(ds.train.x), raw, atol=1e-5)

    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"MATLAB 5.0 garbage")
    with pytest.raises(UserError, match="cannot read SVHN file .*test_32x32.mat"):
        load_dataset("svhn", data_dir=str(tmp_path))


def test_svhn_download_from_local_server(server, tmp_path, monkeypatch):
    pytest.importorskip("scipy")
    root, url = server
    write_svhn(root)
    data = tmp_path / "data"
    monkeypatch.setenv("DISTILLERY_MIRROR", url)
    with pytest.raises(UserError, match="checksum mismatch for .*_32x32.mat: expected md5 e26dedcc|eb5a983b"):
        fetch_dataset("svhn", data, progress=False)  # the canonical md5s refuse these fake files
    assert [p for p in data.rglob("*") if p.is_file()] == []
    fake = dataclasses.replace(download_module.SOURCES["svhn"],
                               md5={name: md5_of(root / name) for name in ("train_32x32.mat", "test_32x32.mat")})
    monkeypatch.setitem(download_module.SOURCES, "svhn", fake)
    ds = load_dataset("svhn", data_dir=str(data), download=True, val_fraction=0)
    assert ds.location == str(data / "svhn") and len(ds.test) == 11
    assert sorted(p.name for p in (data / "svhn").iterdir()) == ["test_32x32.mat", "train_32x32.mat"]


# ---------------------------------------------------------------- Tiny-ImageNet download


def test_tiny_imagenet_download_from_local_server(server, tmp_path, monkeypatch):
    root, url = server
    source = download_module.SOURCES["tiny-imagenet"]
    assert source.base_url == "http://cs231n.stanford.edu/"
    assert source.md5 == {"tiny-imagenet-200.zip": "90528d7ca1a48142e341f4ef8d21d0de"}
    tree = tmp_path / "src" / "tiny-imagenet-200"
    (tree / "train" / "n01" / "images").mkdir(parents=True)
    (tree / "val" / "images").mkdir(parents=True)
    (tree / "wnids.txt").write_text("n01\n")
    Image.new("RGB", (64, 64), (9, 8, 7)).save(tree / "train" / "n01" / "images" / "n01_0.JPEG", quality=100)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tree / "val" / "images" / "val_0.JPEG", quality=100)
    (tree / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t1\t1\n")
    with zipfile.ZipFile(root / "tiny-imagenet-200.zip", "w") as zf:
        for path in sorted(tree.rglob("*")):
            zf.write(path, path.relative_to(tree.parent).as_posix())

    data = tmp_path / "data"
    with pytest.raises(UserError, match="checksum mismatch for .*tiny-imagenet-200.zip: expected md5 90528d7c"):
        fetch_dataset("tiny-imagenet", data, base_url=url, progress=False)
    assert [p for p in data.rglob("*") if p.is_file()] == []
    monkeypatch.setitem(download_module.SOURCES, "tiny-imagenet", dataclasses.replace(
        source, md5={"tiny-imagenet-200.zip": md5_of(root / "tiny-imagenet-200.zip")}))
    folder = fetch_dataset("tiny-imagenet", data, base_url=url, progress=False)
    assert folder == data / "tiny-imagenet-200" and sorted(p.name for p in data.iterdir()) == ["tiny-imagenet-200"]
    assert formats.folder_layout(folder) == "tiny-imagenet"
    train, test = folders.read_tiny_imagenet(folder)
    assert train.classes == ["n01"] and test.labels.tolist() == [0]
    assert np.abs(train.images[0, 0, 0].astype(int) - [9, 8, 7]).max() <= 2  # JPEG rounding
    assert fetch_dataset("tiny-imagenet", data, base_url="http://127.0.0.1:9/", progress=False) == folder  # no-op


# ---------------------------------------------------------------- ImageNet-1K at 64 px


def write_npz_batch(path: Path, labels: list[int], seed: int) -> np.ndarray:
    """A downsampled-ImageNet batch: data (N, 12288) uint8 rows R plane | G plane | B plane, labels 1..1000, mean."""
    images = np.random.default_rng(seed).integers(0, 256, (len(labels), 64, 64, 3), dtype=np.uint8)
    rows = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)
    np.savez(path, data=rows, labels=np.array(labels), mean=rows.mean(0))
    return images


def test_imagenet_npz_batches(tmp_path):
    root = tmp_path / "imagenet-1k"
    (root / "Imagenet64_train_npz").mkdir(parents=True)  # the two zips unpack into their own folders
    (root / "Imagenet64_val_npz").mkdir()
    first = write_npz_batch(root / "Imagenet64_train_npz" / "train_data_batch_1.npz", [1, 2, 1000, 1, 2], 1)
    tenth = write_npz_batch(root / "Imagenet64_train_npz" / "train_data_batch_10.npz", [3, 1000, 3], 10)
    second = write_npz_batch(root / "Imagenet64_train_npz" / "train_data_batch_2.npz", [2, 1, 3, 1000], 2)
    val = write_npz_batch(root / "Imagenet64_val_npz" / "val_data.npz", [1000, 1, 2, 3], 0)
    assert formats.folder_layout(root) == "imagenet-npz"

    train, test = imagenet.read_imagenet_npz(root)
    assert np.array_equal(train.images, np.concatenate([first, second, tenth]))  # batch order, not name order
    assert train.labels.tolist() == [0, 1, 999, 0, 1, 1, 0, 2, 999, 2, 999, 2]  # 1-based -> 0-based
    assert np.array_equal(test.images, val) and test.labels.tolist() == [999, 0, 1, 2]

    ds = load_dataset("imagenet-1k", data_dir=str(tmp_path), val_fraction=0)
    assert ds.spec.mean == IMAGENET_MEAN and ds.spec.std == IMAGENET_STD  # the constants, not measured
    assert ds.spec.num_classes == 1000 and len(ds.spec.class_names) == 1000 and ds.spec.default_model == "ConvNetD4"
    assert ds.spec.rat_noise_init and not get_spec("cifar10").rat_noise_init
    assert ds.train.x.shape == (12, 3, 64, 64) and ds.location == str(root)
    expected = (torch.from_numpy(first[0]).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]
                ) / torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(ds.train.x[0], expected, atol=1e-5)

    write_npz_batch(root / "Imagenet64_train_npz" / "train_data_batch_3.npz", [0, 5], 3)  # labels are 1..1000
    with pytest.raises(UserError, match="train_data_batch_3.npz has labels outside 1..1000"):
        imagenet.read_imagenet_npz(root)
    (root / "Imagenet64_val_npz" / "val_data.npz").unlink()
    with pytest.raises(UserError, match="no val_data.npz under"):
        imagenet.read_imagenet_npz(root)


def write_jpeg_tree(split: Path, classes: dict[str, int], per_class: int, size: tuple[int, int]) -> None:
    """split/<wnid>/<i>.JPEG with a constant colour per class."""
    for wnid, value in classes.items():
        (split / wnid).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, (value, value, value)).save(split / wnid / f"{wnid}_{i}.JPEG", quality=100)


def test_imagenet_folder_at_64(tmp_path, monkeypatch):
    root = tmp_path / "imagenet-1k"
    classes = {"n03": 30, "n01": 10, "n02": 20}
    write_jpeg_tree(root / "train", classes, 2, (80, 50))
    write_jpeg_tree(root / "val", classes, 1, (50, 80))
    margin = np.full((50, 80, 3), 200, np.uint8)
    margin[:, :15] = 0  # a dark left margin: kept by RaT's Resize((64, 64)), cut by a centre crop
    Image.fromarray(margin).save(root / "train" / "n02" / "n02_0.JPEG", quality=100)
    assert formats.folder_layout(root) == "imagenet-folder"
    with pytest.raises(UserError, match="train holds 3 class folders, but ImageNet-1K has 1000"):
        imagenet.read_imagenet_folder(root, 64)  # refused before any image is decoded
    with pytest.raises(UserError, match="holds 3 class folders, but ImageNet-1K has 1000"):
        load_dataset("imagenet-1k", data_dir=str(tmp_path))

    monkeypatch.setattr(imagenet, "IMAGENET_CLASSES", 3)  # the reading itself, on 3 classes
    train, test = imagenet.read_imagenet_folder(root, 64)
    assert train.classes == ["n01", "n02", "n03"] and train.images.shape == (6, 64, 64, 3)
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and test.labels.tolist() == [0, 1, 2]
    assert np.abs(train.images[5].astype(int) - 30).max() <= 1 and np.abs(test.images[1].astype(int) - 20).max() <= 1
    squashed = train.images[2].astype(int)
    assert squashed[:, 0].max() < 40 and squashed[:, -1].min() > 190  # the whole width survives

    flat = tmp_path / "flat"
    write_jpeg_tree(flat / "train", {"n01": 1}, 1, (8, 8))
    (flat / "val").mkdir()
    Image.new("RGB", (8, 8)).save(flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(UserError, match="holds no class folders; sort ImageNet's validation images into val/<wnid>/"):
        imagenet.read_imagenet_folder(flat, 64)


def test_missing_imagenet_says_where_to_put_it(tmp_path, capsys):
    """The acceptance row: the ImageNet-1K presets name the dataset, and without data they say where it goes."""
    for method in ("tesla", "ratbptt"):
        code = main(["distill", "--method", method, "--preset", f"{method}/imagenet1k-ipc1",
                     "--out", str(tmp_path / f"R-{method}"), "--threads", "1", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "unknown dataset" not in err, err
        assert "imagenet-1k not found: looked in" in err and "for imagenet-1k, imagenet64" in err, err
        assert "train_data_batch_*.npz and val_data.npz into DIR/imagenet-1k" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------- MTT's ImageNet subsets at 128 px


def test_subset_class_tables_agree():
    """Each MTT index names the wnid at that rank of ImageNet's sorted wnids: across all six lists, ordering the
    (index, wnid) pairs by index must order the wnids too, and one index always maps to one wnid."""
    pairs = {}
    for name, (indices, wnids, names) in imagenet.SUBSETS.items():
        assert len(indices) == len(set(indices)) == len(wnids) == len(names) == 10, name
        for i, w in zip(indices, wnids):
            assert pairs.setdefault(i, w) == w, (name, i)
        assert get_spec(name).class_names == names and get_spec(name).im_size == (128, 128)
        assert get_spec(name).mean == IMAGENET_MEAN and get_spec(name).default_model == "ConvNetD5"
    by_index = [pairs[i] for i in sorted(pairs)]
    assert by_index == sorted(by_index) and len(set(by_index)) == len(by_index)
    assert imagenet.SUBSETS["imagenette"][0] == (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)  # MTT utils.py
    assert imagenet.SUBSETS["imagewoof"][0] == (193, 182, 258, 162, 155, 167, 159, 273, 207, 229)


def test_imagenet_subset_from_full_tree(tmp_path):
    _, wnids, _ = imagenet.SUBSETS["imagenette"]
    root = tmp_path / "imagenet"
    values = {w: 20 + 20 * k for k, w in enumerate(wnids)}
    write_jpeg_tree(root / "train", {**values, "n09999999": 255}, 2, (60, 40))  # a class imagenette does not use
    write_jpeg_tree(root / "val", {**values, "n09999999": 255}, 1, (40, 60))
    # one wide train image: a 40x40 centre of 200 between 10-px margins of 0 (what the centre crop keeps)
    wide = np.zeros((40, 60, 3), np.uint8)
    wide[:, 10:50] = 200
    Image.fromarray(wide).save(root / "train" / wnids[3] / f"{wnids[3]}_0.JPEG", quality=100)

    train, test = imagenet.read_imagenet_subset(root, "imagenette")
    assert train.images.shape == (20, 128, 128, 3) and test.images.shape == (10, 128, 128, 3)
    assert train.labels.tolist() == [k for k in range(10) for _ in range(2)] and test.labels.tolist() == list(range(10))
    assert train.classes[0] == "tench" and train.classes[9] == "parachute"
    for k in range(10):  # label k is MTT's k-th class: its folder's colour
        assert np.abs(test.images[k].astype(int) - values[wnids[k]]).max() <= 2, k
    cropped = train.images[6].astype(int)  # label 3, first file: shorter side 40 -> 128, width 192, centre 128 kept
    assert cropped[:, 4:-4].min() >= 190 and cropped[:, 0].mean() > 100  # a squash would show the black margins

    ds = load_dataset("imagenette", data_dir=str(tmp_path), val_fraction=0)
    assert ds.train.x.shape == (20, 3, 128, 128) and ds.spec.num_classes == 10 and ds.location == str(root)
    assert ds.spec.mean == IMAGENET_MEAN and ds.spec.std == IMAGENET_STD

    import shutil

    shutil.rmtree(root / "val" / wnids[9])
    with pytest.raises(UserError, match=f"lacks the imagenette class folders {wnids[9]}"):
        load_dataset("imagenette", data_dir=str(tmp_path))
    with pytest.raises(UserError, match="imagewoof not found: looked in .* for imagewoof, imagenet"):
        load_dataset("imagewoof", data_dir=str(tmp_path / "nothing"))


def test_ratbptt_auto_init_follows_the_dataset(tmp_path):
    """pix_init='auto' starts from unit-norm noise where the published RaT-BPTT runs do without ZCA (ImageNet-1K's
    spec says so), from real images otherwise; checked on digits with the flag switched on and off."""
    import copy

    from distillery.methods.ratbptt import RaTBPTT, RaTBPTTConfig

    cfg = RaTBPTTConfig(ipc=1, model="ConvNetD2", horizon=4, window=2, real_batch=16, seed=0)
    ds = load_dataset("digits")
    real = RaTBPTT(ds, cfg).images.detach()
    noisy_ds = copy.copy(ds)
    noisy_ds.spec = dataclasses.replace(ds.spec, rat_noise_init=True)
    noise = RaTBPTT(noisy_ds, cfg).images.detach()
    assert torch.allclose(noise.flatten(1).norm(dim=1), torch.ones(10))
    assert (real.flatten(1).norm(dim=1) > 2).all()  # standardized real 8x8 digits have norms near 8
    assert get_spec("imagenet-1k").rat_noise_init and not any(
        get_spec(n).rat_noise_init for n in ("cifar10", "cifar100", "tiny-imagenet", "svhn", "imagenette"))
