"""docs/ERRORS.md, row by row: every bad input or fault gives one `error:` line naming the cause, and leaves nothing
written or damaged. Test ids are the row ids of the table. Cheap settings only (digits, a 1-expert 2-epoch store)."""

import errno
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distillery.run.checkpoint import CHECKPOINT, read_checkpoint
from distillery.cli import build_parser, main
from distillery.data import load_dataset
from distillery.data.download import SOURCES
from distillery.errors import UserError
from distillery.experts import train_experts
from distillery.sets.imports import import_set
from distillery.sets.synset import SyntheticSet, preprocess_record


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test in its own folder, with its own data root and cache, so nothing outside is read or written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTILLERY_DATA", str(tmp_path / "data-root"))
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DISTILLERY_MIRROR", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real 1-expert, 2-epoch ConvNetD2 store on digits (tests copy it before damaging it)."""
    path = tmp_path_factory.mktemp("experts") / "store"
    train_experts(load_dataset("digits"), "ConvNetD2", 1, epochs=2, out_dir=path, progress=False)
    return path


@pytest.fixture(scope="module")
def set_file(tmp_path_factory):
    """A real digits set file (random real images, ZCA-whitened as MTT does, so the fit depends on the split)."""
    ds = load_dataset("digits", zca="kornia")
    x, y = ds.random_set(1, torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("sets") / "set.safetensors"
    SyntheticSet(x, y, preprocess=preprocess_record(ds.preprocess),
                 meta={"dataset": "digits", "num_classes": 10, "method": "random", "model": "ConvNetD2"}).save(path)
    return path


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root: what 'nothing written or damaged' compares."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(capsys, argv, needle, code=2):
    """Run the CLI; assert exit `code` and exactly one stderr line `error: ...` containing `needle`; return it."""
    got = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and "%|" not in line]  # no progress bars
    assert got == code, (got, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err and "/work/shared" not in err and "../shared" not in err
    return lines[0]


def distill_args(store, out, *extra):
    """The cheapest MTT run on digits with the test store."""
    return ["distill", "--method", "mtt", "--dataset", "digits", "--ipc", "1", "--experts", store, "--out", out,
            "--syn-steps", "2", "--max-start-epoch", "1", "--expert-epochs", "1", "--iterations", "2",
            "--eval-every", "100", "--eval-runs", "1", "--eval-epochs", "1", "--final-eval-runs", "1",
            "--checkpoint-every", "1", "--no-progress", "--threads", "1", *extra]


def copy_store(store, tmp_path) -> Path:
    dest = tmp_path / "store"
    shutil.copytree(store, dest)
    return dest


# --- options (ranges declared beside their fields; checked before any data is read) -------------------------------
OPTION_ROWS = [
    ("opt-range", ["distill", "--method", "mtt", "--ipc", "0"], "--ipc 0 is out of range"),
    ("opt-range", ["distill", "--method", "mtt", "--ipc", "-1"], "--ipc -1 is out of range"),
    ("opt-range", ["distill", "--method", "mtt", "--lr-img", "-5"], "--lr-img -5.0 is out of range"),
    ("opt-range", ["distill", "--method", "mtt", "--eval-every", "0"], "--eval-every 0 is out of range"),
    ("opt-range", ["distill", "--method", "mtt", "--checkpoint-every", "0"], "--checkpoint-every 0 is out of range"),
    ("opt-range", ["distill", "--method", "mtt", "--iterations", "0"], "--iterations 0 is out of range"),
    ("opt-range", ["baseline", "random", "--ipc", "1", "--runs", "0"], "--runs 0 is out of range"),
    ("opt-range", ["baseline", "random", "--ipc", "1", "--eval-epochs", "0"], "--eval-epochs 0 is out of range"),
    ("opt-range", ["baseline", "random", "--ipc", "1", "--threads", "0"], "--threads 0 is out of range"),
    ("opt-range", ["baseline", "random", "--ipc", "1", "--val-fraction", "1.5"], "--val-fraction 1.5 is out of range"),
    ("opt-cross", ["distill", "--method", "ratbptt", "--ipc", "1", "--window", "8", "--horizon", "4"],
     "--window 8 must be at most --horizon 4"),
    ("opt-cross", ["distill", "--method", "ratbptt", "--ipc", "1", "--horizon", "6", "--window", "2", "--min-start",
                   "5"], "--min-start 5 must be at most"),
    ("opt-cross", ["distill", "--method", "mtt", "--lr-min", "0.5", "--lr-max", "0.1"], "must be below --lr-max"),
    ("opt-cross", ["distill", "--method", "ratbptt", "--ipc", "2", "--boost-blocks", "1,2"], "adding up to --ipc 2"),
    ("opt-cross", ["distill", "--method", "mtt", "--batch-syn", "50"], "--batch-syn 50 is larger than"),
    ("opt-cross", ["distill", "--method", "mtt", "--grad", "checkpointed", "--grad-checkpoint-every", "99"],
     "--grad-checkpoint-every 99 is more than"),
    ("opt-ipc-class", ["distill", "--method", "mtt", "--ipc", "500"], "of the smallest class"),
    ("opt-expert-epochs", ["distill", "--method", "mtt", "--experts", "{store}", "--max-start-epoch", "5"],
     "has 2 epochs but --max-start-epoch 5"),
    ("opt-preset", ["distill", "--method", "mtt", "--preset", "mtt/nope"], "unknown preset"),
    ("opt-preset", ["distill", "--method", "tesla", "--preset", "mtt/digits-ipc1"], "is for --method mtt"),
    ("opt-no-dataset", ["distill", "--method", "mtt", "--out", "run"], "no dataset given"),
    ("opt-range", ["baseline", "random", "--ipc", "1", "--threads", "100000"], "--threads 100000 is out of range: it "
                                                                             "must be >= 1 and <= "),
    ("opt-range", ["distill", "--method", "mtt", "--resolution", "1"], "--resolution 1 is out of range: it must be "
                                                                       ">= 8"),
    ("opt-type", ["distill", "--method", "mtt", "--dsa", "maybe"],
     "argument --dsa: 'maybe' is not a boolean: expected true/false/on/off"),
    ("opt-type", ["distill", "--method", "mtt", "--lr-img", "inf"], "--lr-img inf is not a finite number"),
    ("opt-type", ["distill", "--method", "mtt", "--ipc", "two"], "argument --ipc: 'two' is not an int"),
    ("opt-unknown", ["evaluate", "set.safetensors", "--epochs", "3"],
     "unrecognized arguments: --epochs 3; did you mean --eval-epochs"),
    ("opt-other-method", ["distill", "--method", "mtt", "--horizon", "4"],
     "--horizon is an option of --method ratbptt; --method mtt does not use it"),
    ("opt-budget", ["distill", "--method", "ratbptt", "--ipc", "1", "--iterations", "20", "--epochs", "3"],
     "--iterations and --real-epochs (the published --epochs) both set the budget; give one"),
    ("opt-preset-zca", ["distill", "--method", "mtt", "--preset", "mtt/cifar10-ipc1", "--experts", "{store}"],
     "preset mtt/cifar10-ipc1 chose --zca kornia but the experts in"),
]


@pytest.mark.parametrize("row,argv,needle", OPTION_ROWS, ids=[f"{r[0]}-{i}" for i, r in enumerate(OPTION_ROWS)])
def test_option_rows(capsys, tmp_path, store, row, argv, needle):
    argv = [a.replace("{store}", str(store)) for a in argv]
    if row != "opt-no-dataset":
        argv += ["--dataset", "digits"] + (["--out", "run"] if argv[0] == "distill" else [])
    one_line(capsys, [*argv, "--no-progress"], needle)
    assert tree(tmp_path) == {}  # refused before anything was read or written


# --- data --------------------------------------------------------------------------------------------------------
def _png_folder(root: Path, classes=("a", "b"), per_class=2, bad: str | None = None) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    if bad:
        (root / bad).write_bytes(b"not a png")
    return root


def _idx_folder(root: Path, truncate: bool = False, magic: int = 2051) -> Path:
    folder = root / "mnist"
    folder.mkdir(parents=True)
    for split, n in (("train", 4), ("t10k", 2)):
        images = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        images += bytes(n * 28 * 28 // (2 if truncate else 1))
        (folder / f"{split}-images-idx3-ubyte").write_bytes(images)
        labels = (2049).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(n)
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(labels)
    return root


def _cifar_folder(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "batches.meta"):
        (folder / name).write_bytes(b"\x80\x04garbage, not a pickle")
    return root


DATA_ROWS = {
    "data-unknown-name": (lambda p: None, ["--dataset", "nosuchset"], "unknown dataset 'nosuchset'"),
    "data-missing": (lambda p: None, ["--dataset", "mnist"], "distillery download mnist"),
    "data-folder-no-train": (lambda p: p.mkdir(), ["--dataset", "imagefolder:{p}"], "expected class folders"),
    "data-folder-empty-class": (lambda p: (_png_folder(p), shutil.rmtree(p / "train" / "b"),
                                           (p / "train" / "b").mkdir()),
                                ["--dataset", "imagefolder:{p}"], "holds no images"),
    "data-folder-bad-image": (lambda p: _png_folder(p, bad="train/a/broken.png"), ["--dataset", "imagefolder:{p}"],
                              "cannot read image"),
    "data-folder-class-mismatch": (lambda p: (_png_folder(p), (p / "test" / "b").rename(p / "test" / "c")),
                                   ["--dataset", "imagefolder:{p}"], "class folders of"),
    "data-idx-truncated": (lambda p: _idx_folder(p, truncate=True), ["--dataset", "mnist", "--data-dir", "{p}"],
                           "truncated or corrupt"),
    "data-idx-bad-magic": (lambda p: _idx_folder(p, magic=1234), ["--dataset", "mnist", "--data-dir", "{p}"],
                           "is not a uint8 IDX file"),
    "data-cifar-bad-pickle": (lambda p: _cifar_folder(p), ["--dataset", "cifar10", "--data-dir", "{p}"],
                              "cannot read CIFAR file"),
    "data-ipc-above-class-size": (lambda p: None, ["--dataset", "digits", "--ipc", "500"], "has only"),
}


@pytest.mark.parametrize("row", list(DATA_ROWS))
def test_data_rows(capsys, tmp_path, row):
    make, argv, needle = DATA_ROWS[row]
    p = tmp_path / "given"
    make(p)
    before = tree(tmp_path)
    argv = [a.replace("{p}", str(p)) for a in argv]
    ipc = [] if "--ipc" in argv else ["--ipc", "1"]
    one_line(capsys, ["baseline", "random", *argv, *ipc, "--runs", "1", "--eval-epochs", "1", "--no-progress"], needle)
    after = {k: v for k, v in tree(tmp_path).items() if not k.startswith("cache/")}  # a decoded good split may stay
    assert after == before  # the data untouched, nothing else written


# --- expert stores -----------------------------------------------------------------------------------------------
def _edit_manifest(change):
    def edit(store: Path) -> None:
        m = json.loads((store / "manifest.json").read_text())
        change(m)
        (store / "manifest.json").write_text(json.dumps(m))
    return edit


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


EXPERT_ROWS = {
    "experts-no-manifest": (lambda s: (s / "manifest.json").unlink(), [], "no expert store"),
    "experts-manifest-unreadable": (lambda s: (s / "manifest.json").write_text("{not json"), [], "manifest.json"),
    "experts-format-version": (_edit_manifest(lambda m: m.update(format_version=99)), [], "format version 99"),
    "experts-other-dataset": (_edit_manifest(lambda m: m.update(dataset="mnist")), [], "trained on dataset 'mnist'"),
    "experts-other-model": (lambda s: None, ["--model", "ConvNetD1"], "are 'ConvNetD2' models"),
    "experts-other-preprocessing": (lambda s: None, ["--zca", "kornia"], "saw data preprocessed as"),
    "experts-none-finished": (_edit_manifest(lambda m: m.update(experts=[])), [], "no finished experts"),
    "experts-shard-missing": (lambda s: (s / "expert_0000.safetensors").unlink(), [], "is missing"),
    "experts-shard-header": (lambda s: (s / "expert_0000.safetensors").write_bytes(b"\x08" + bytes(20)), [],
                             "is corrupt"),
    "experts-shard-sha256": (lambda s: _flip_last_byte(s / "expert_0000.safetensors"), [],
                             "sha256 does not match manifest.json"),
}


@pytest.mark.parametrize("row", list(EXPERT_ROWS))
def test_expert_store_rows(capsys, tmp_path, store, row):
    damage, extra, needle = EXPERT_ROWS[row]
    s = copy_store(store, tmp_path)
    damage(s)
    before = tree(s)
    one_line(capsys, distill_args(s, tmp_path / "run", *extra), needle)
    assert tree(s) == before
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_experts_resume_with_other_settings(capsys, tmp_path, store):
    """experts-other-settings: `distillery experts` into a store trained with other settings is refused."""
    s = copy_store(store, tmp_path)
    before = tree(s)
    one_line(capsys, ["experts", "--dataset", "digits", "--model", "ConvNetD2", "--num-experts", "2",
                      "--train-epochs", "3", "--out", s, "--no-progress", "--threads", "1"],
             "already holds experts trained with epochs=2")
    assert tree(s) == before


def test_shard_is_hashed_once_per_process(tmp_path, store, monkeypatch):
    """experts-shard-sha256: the hash is checked on first use only (later reads cost nothing extra)."""
    from distillery.experts import store as experts

    s = copy_store(store, tmp_path)
    opened = experts.ExpertStore.open(s)
    calls, real = [], hashlib.sha256
    monkeypatch.setattr(experts.hashlib, "sha256", lambda data=b"": calls.append(1) or real(data))
    first = opened.pair(0, 0, 1)
    opened.checkpoint(0, 2)
    experts.ExpertStore.open(s).pair(0, 0, 1)
    assert len(calls) == 1 and torch.isfinite(first[0]).all()


# --- set files ---------------------------------------------------------------------------------------------------
def _flip_image_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header + 3] ^= 0x01  # a bit inside the tensor data: the file still parses
    path.write_bytes(bytes(raw))


def _record_protocol(path: Path, **fields) -> None:
    """Re-save the set with an evaluation protocol record (a rat one, `fields` changed)."""
    from distillery.evaluation.protocol import rat_protocol

    s = SyntheticSet.load(path)
    s.meta["eval"] = [{**rat_protocol("ConvNetD2", 1, 0).as_json(), **fields}]
    s.save(path)


SET_ROWS = {
    "set-missing": (None, [], "does not exist"),
    "set-bad-protocol": (lambda p: _record_protocol(p, runs=0), [], "field runs = 0 must be an integer >= 1"),
    "set-protocol-flag": (_record_protocol, [], "--eval-epochs does not apply to the rat protocol"),
    "set-not-a-set": (lambda p: p.write_bytes(b"garbage, not a set"), [], "not a distillery set file"),
    "set-damaged": (_flip_image_byte, [], "is damaged"),
    "set-other-dataset": (lambda p: None, ["--dataset", "mnist"], "made for dataset digits"),
    "set-other-preprocessing": (lambda p: None, ["--val-fraction", "0.2"], "preprocessed differently"),
    "set-ipc-prefix": (lambda p: None, ["--ipc", "3"], "this set has 1 images per class"),
}


@pytest.mark.parametrize("row", list(SET_ROWS))
def test_set_file_rows(capsys, tmp_path, set_file, row):
    damage, extra, needle = SET_ROWS[row]
    path = tmp_path / "set.safetensors"
    if damage is not None:
        shutil.copy(set_file, path)
        damage(path)
    before = tree(tmp_path)
    one_line(capsys, ["evaluate", path, *extra, "--runs", "1", "--eval-epochs", "1", "--no-progress"], needle)
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("cache/")} == before  # a ZCA fit may be cached


def test_show_into_a_folder(capsys, tmp_path, set_file):
    """set-show-out-folder: `show --out` naming a folder."""
    (tmp_path / "grid.png").mkdir()
    one_line(capsys, ["show", set_file, "--out", tmp_path / "grid.png"], "cannot write")
    assert tree(tmp_path) == {}


# --- imported files (import-set, import-experts): each part checked where it is read -----------------------------
class _Payload:
    """An object whose unpickling would create `ran.txt`: the proof that no imported file is unpickled."""

    def __reduce__(self):
        return (Path.touch, (Path("ran.txt"),))


def _digits_set(given: Path, images=None, labels=None, lr=None, name="best") -> Path:
    """images_NAME.pt (+ labels_NAME.pt, lr_NAME.pt when given) of a 1-per-class digits set, as MTT/DATM save."""
    given.mkdir(parents=True, exist_ok=True)
    torch.save(torch.randn(10, 1, 8, 8) if images is None else images, given / f"images_{name}.pt")
    if labels is not None:
        torch.save(labels, given / f"labels_{name}.pt")
    if lr is not None:
        torch.save(lr, given / f"lr_{name}.pt")
    return given / f"images_{name}.pt"


def _h5(given: Path, fill) -> Path:
    """A .h5 written by `fill(h5py.File)`."""
    h5py = pytest.importorskip("h5py")
    given.mkdir(parents=True, exist_ok=True)
    with h5py.File(given / "rat.h5", "w") as f:
        fill(f)
    return given / "rat.h5"


def _h5_external(given: Path) -> Path:
    _h5(given, lambda f: f.create_dataset("data", data=np.zeros((10, 64), np.float32)))
    (given / "rat.h5").rename(given / "other.h5")
    h5py = pytest.importorskip("h5py")
    with h5py.File(given / "rat.h5", "w") as f:
        f["data"] = h5py.ExternalLink(str(given / "other.h5"), "/data")
    return given / "rat.h5"


def _nan(shape, at=3):
    x = torch.randn(shape)
    x.view(-1)[at] = float("nan")
    return x


IMPORT_SET_ROWS = [
    ("import-unreadable", "zero-byte", lambda g: _digits_set(g) and (g / "images_best.pt").write_bytes(b""),
     "cannot read"),
    ("import-unreadable", "truncated", lambda g: (g / "images_best.pt").write_bytes(
        _digits_set(g).read_bytes()[:300]), "cannot read"),
    ("import-unreadable", "pickled-object", lambda g: _digits_set(g, images=[_Payload()]), "cannot read"),
    ("import-unreadable", "h5-garbage", lambda g: (g.mkdir(), (g / "rat.h5").write_bytes(b"not hdf5" * 20)),
     "cannot read"),
    ("import-not-a-tensor", "list", lambda g: _digits_set(g, images=[torch.zeros(10, 1, 8, 8)]), "holds a list"),
    ("import-not-a-tensor", "string-lr", lambda g: _digits_set(g, lr="0.01"), "holds a str"),
    ("import-not-a-tensor", "dict-labels", lambda g: _digits_set(g, labels={"y": 1}), "holds a dict"),
    ("import-not-a-tensor", "lr-vector", lambda g: _digits_set(g, lr=torch.ones(3)), "not one learning rate"),
    ("import-not-a-tensor", "dict-without-images", lambda g: _digits_set(g, images={"x": torch.zeros(1)}),
     "without 'images'"),
    ("import-not-a-tensor", "complex", lambda g: _digits_set(g, images=torch.zeros(10, 1, 8, 8, dtype=torch.cfloat)),
     "complex"),
    ("import-h5-layout", "group", lambda g: _h5(g, lambda f: f.create_group("data")), "is a Group"),
    ("import-h5-layout", "bytes", lambda g: _h5(g, lambda f: f.create_dataset("data", data=np.bytes_(b"abc"))),
     "'data' holds |S3"),
    ("import-h5-layout", "scalar", lambda g: _h5(g, lambda f: f.create_dataset("data", data=1.5)), "shape ()"),
    ("import-h5-layout", "complex", lambda g: _h5(g, lambda f: f.create_dataset(
        "data", data=np.zeros((10, 64), np.complex64))), "'data' holds complex64"),
    ("import-h5-layout", "external-link", _h5_external, "a link to another file"),
    ("import-bad-values", "nan-images", lambda g: _digits_set(g, images=_nan((10, 1, 8, 8))),
     "1 of the 640 values of the images are NaN/inf"),
    ("import-bad-values", "huge-images", lambda g: _digits_set(g, images=torch.full((10, 1, 8, 8), 1e30)),
     "beyond any model space"),
    ("import-bad-values", "negative-lr", lambda g: _digits_set(g, lr=torch.tensor(-0.01)),
     "the learning rate -0.01 cannot train"),
    ("import-bad-values", "nan-lr", lambda g: _digits_set(g, lr=torch.tensor(float("nan"))),
     "the learning rate nan cannot train"),
    ("import-bad-values", "nan-soft-labels", lambda g: _digits_set(g, labels=_nan((10, 10))), "NaN/inf"),
    ("import-bad-values", "label-minus-one", lambda g: _digits_set(g, labels=torch.tensor([-1] + list(range(1, 10)))),
     "class id -1"),
    ("import-bad-values", "label-beyond-classes", lambda g: _digits_set(g, labels=torch.arange(1, 11)),
     "class id 10"),
    ("import-bad-values", "bool-labels", lambda g: _digits_set(g, labels=torch.ones(10, dtype=torch.bool)),
     "torch.bool labels"),
    ("import-bad-values", "nan-h5", lambda g: _h5(g, lambda f: f.create_dataset("data", data=_nan((10, 64)).numpy())),
     "NaN/inf"),
]


@pytest.mark.parametrize("row,case,make,needle", IMPORT_SET_ROWS, ids=[f"{r[0]}-{r[1]}" for r in IMPORT_SET_ROWS])
def test_import_set_rows(capsys, tmp_path, row, case, make, needle):
    given = tmp_path / "given"
    make(given)
    file = given / "rat.h5" if (given / "rat.h5").exists() else given / "images_best.pt"
    before = tree(tmp_path)
    one_line(capsys, ["import-set", file, "--dataset", "digits", "--out", tmp_path / "out" / "s.safetensors"], needle)
    assert tree(tmp_path) == before and not Path("ran.txt").exists()  # nothing written, nothing unpickled


def test_import_lr_option_is_checked(capsys, tmp_path):
    """import-bad-values: `--lr` itself must be a finite number > 0 (and replaces a saved lr, which is then unread)."""
    f = _digits_set(tmp_path / "given", lr="not a number")
    one_line(capsys, ["import-set", f, "--dataset", "digits", "--lr", "-1", "--out", tmp_path / "s.safetensors"],
             "--lr -1.0 is out of range")
    with pytest.raises(UserError, match="--lr: the learning rate nan cannot train"):  # the API checks it as well
        import_set(f, "digits", lr=float("nan"))
    assert main(["import-set", str(f), "--dataset", "digits", "--lr", "0.02", "--out",
                 str(tmp_path / "s.safetensors")]) == 0
    assert "--lr 0.02 (given" in capsys.readouterr().out


def _buffer(epochs=2, experts=1, same=False):
    """An MTT buffer of ConvNetD1W8 digits experts; `same`: every snapshot the same tensors, as buffer.py on a CPU."""
    out = []
    for k in range(experts):
        net = torch.nn.ModuleList()  # parameters in ConvNetD1W8's order and shapes, from the model itself
        from distillery.models import init_seeded

        params = [p.detach().clone() for p in init_seeded("ConvNetD1W8", 1, 10, (8, 8), k).parameters()]
        out.append([params if same else [p + 0.01 * e for p in params] for e in range(epochs + 1)])
    return out


def _nan_buffer():
    b = _buffer()
    b[0][1][0][0, 0, 0, 0] = float("nan")
    return b


def _stalled_buffer():
    b = _buffer()
    b[0][2] = [p.clone() for p in b[0][1]]
    return b


IMPORT_EXPERT_ROWS = [
    ("import-degenerate-trajectory", "all-snapshots-equal", lambda: _buffer(same=True),
     "degenerate trajectory: replay_buffer_0.pt expert 0's snapshots are identical"),
    ("import-degenerate-trajectory", "one-epoch-still", _stalled_buffer, "snapshots 1 and 2 are identical"),
    ("import-bad-values", "nan-parameter", _nan_buffer, "NaN/inf"),
    ("import-not-a-tensor", "buffer-of-strings", lambda: [["a", "b", "c"]], "not a list of parameter tensors"),
    ("import-not-a-tensor", "buffer-int-params", lambda: [[[p.long() for p in s] for s in _buffer()[0]]],
     "not a float tensor"),
]


@pytest.mark.parametrize("row,case,make,needle", IMPORT_EXPERT_ROWS,
                         ids=[f"{r[0]}-{r[1]}" for r in IMPORT_EXPERT_ROWS])
def test_import_experts_rows(capsys, tmp_path, row, case, make, needle):
    given = tmp_path / "given"
    given.mkdir()
    torch.save(_buffer(), given / "replay_buffer_0.pt")  # a good first file: the bad second one still stops all
    torch.save(make(), given / "replay_buffer_1.pt")
    before = tree(tmp_path)
    line = one_line(capsys, ["import-experts", given, "--dataset", "digits", "--model", "ConvNetD1W8",
                             "--out", tmp_path / "store"], needle.replace("replay_buffer_0", "replay_buffer_1"))
    assert tree(tmp_path) == before and not (tmp_path / "store").exists()
    if "all-snapshots" in case:
        assert "MTT's buffer.py" in line and "distillery experts" in line


def test_import_pixels_are_preprocessed(capsys, tmp_path):
    """import-pixels: uint8 0..255 images are raw pixels: preprocessed on import, and the import says so."""
    x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    f = _digits_set(tmp_path / "given", images=x)
    assert main(["import-set", str(f), "--dataset", "digits", "--out", str(tmp_path / "s.safetensors")]) == 0
    assert "raw pixels 0..255, preprocessed on import (standard)" in capsys.readouterr().out
    s = SyntheticSet.load(tmp_path / "s.safetensors")
    want = load_dataset("digits").preprocess.transform(x.float() / 255)
    torch.testing.assert_close(s.images, want)


def test_import_says_what_it_assumed(capsys, tmp_path):
    """import-assumed: no labels or lr file beside the images (MTT, TESLA): the import says what it used instead."""
    f = _digits_set(tmp_path / "given")
    assert main(["import-set", str(f), "--dataset", "digits", "--out", str(tmp_path / "s.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "labels: class-blocked hard labels: no labels file beside images_best.pt" in out
    assert "lr: none: no lr file beside images_best.pt (MTT and TESLA save none); `distillery evaluate` trains it " \
           "with --lr, default 0.01" in out


# --- set files with contents distillery never writes (the digest recomputed, so only the contents check sees it) --
SET_CONTENT_ROWS = {
    "nan-images": (lambda s: s.images.view(-1).__setitem__(0, float("nan")), "NaN/inf values in 'images'"),
    "label-out-of-range": (lambda s: s.labels.__setitem__(0, 12), "outside 0..9"),
    "label-kind": (lambda s: setattr(s, "label_kind", "soft"), "soft labels of shape (10,)"),
    "negative-lr": (lambda s: setattr(s, "lr", -1.0), "the learning rate -1.0"),
    "int-images": (lambda s: setattr(s, "images", s.images.long()), "torch.int64 images"),
    "num-classes": (lambda s: s.meta.update(num_classes="ten"), "num_classes 'ten'"),
}


@pytest.mark.parametrize("case", list(SET_CONTENT_ROWS), ids=[f"set-bad-contents-{c}" for c in SET_CONTENT_ROWS])
def test_set_bad_contents(capsys, tmp_path, set_file, case):
    change, needle = SET_CONTENT_ROWS[case]
    s = SyntheticSet.load(set_file)
    s.images, s.labels, s.meta = s.images.clone(), s.labels.clone(), dict(s.meta)
    change(s)
    s.save(tmp_path / "bad.safetensors")  # save checks nothing: a hand-made file with a fresh digest
    before = tree(tmp_path)
    one_line(capsys, ["show", tmp_path / "bad.safetensors", "--out", tmp_path / "grid.png"], needle)
    assert tree(tmp_path) == before


# --- run directories ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_run(tmp_path_factory, store):
    """A finished 2-iteration run, made once per module."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main([str(a) for a in distill_args(store, out)]) == 0
    return out


@pytest.fixture()
def finished_run(tmp_path, one_run):
    """A private copy of the finished run in tmp_path/run."""
    out = tmp_path / "run"
    shutil.copytree(one_run, out)  # with its (empty, unlocked) .lock file
    return out


RUN_ROWS = {
    "run-exists": ([], "already holds a run with a checkpoint"),
    "run-resume-changes-state": (["--resume", "--ipc", "2", "--syn-steps", "3"], "--resume cannot change"),
    "run-resume-fewer-iterations": (["--resume", "--iterations", "1"], "is below iteration 2"),
}


@pytest.mark.parametrize("row", list(RUN_ROWS))
def test_run_dir_rows(capsys, store, finished_run, row):
    extra, needle = RUN_ROWS[row]
    before = tree(finished_run)
    line = one_line(capsys, distill_args(store, finished_run, *extra), needle)  # a repeated flag: the last wins
    assert tree(finished_run) == before
    if row == "run-resume-changes-state":
        assert "ipc 1 -> 2" in line and "syn_steps 2 -> 3" in line


def test_damaged_checkpoint(capsys, store, finished_run):
    """run-checkpoint-damaged: a checkpoint whose sha256 trailer does not match is refused, not loaded."""
    path = finished_run / CHECKPOINT
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    before = tree(finished_run)
    one_line(capsys, distill_args(store, finished_run, "--resume"), "is damaged")
    assert tree(finished_run) == before


def test_damaged_config(capsys, store, finished_run):
    """run-config-damaged."""
    (finished_run / "config.json").write_text("{half")
    before = tree(finished_run)
    one_line(capsys, distill_args(store, finished_run, "--resume"), "config.json in")
    assert tree(finished_run) == before


def test_locked_run_dir(capsys, tmp_path, store):
    """run-locked: a second process on the same run directory stops at once."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # another open file description = another process, for flock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_line(capsys, distill_args(store, out), "in use by another distillery process")
    assert tree(out) == {".lock": hashlib.sha256(b"").hexdigest()}


@pytest.mark.parametrize("row,out,needle", [
    ("out-is-a-file", "file.txt", "is an existing file"),
    ("out-under-proc", "/proc/distillery-run", "cannot write /proc/distillery-run"),
])
def test_out_unusable(capsys, tmp_path, store, row, out, needle):
    (tmp_path / "file.txt").write_text("precious")
    one_line(capsys, distill_args(store, out), needle)
    assert (tmp_path / "file.txt").read_text() == "precious"
    one_line(capsys, ["experts", "--dataset", "digits", "--out", out, "--no-progress"], needle)


class FullDisk:
    """A file object whose writes fail as on a full disk (ENOSPC)."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _disk_full(monkeypatch, after: int = 0):
    """Make every write through os.fdopen (io.py's temp files, downloads) fail after `after` good files."""
    real, count = os.fdopen, [0]

    def fdopen(fd, *args, **kwargs):
        count[0] += 1
        f = real(fd, *args, **kwargs)
        return f if count[0] <= after else FullDisk(f)

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_disk_full_keeps_the_old_file(capsys, tmp_path, set_file, monkeypatch):
    """disk-full: the write fails with a clear line, the old file stays whole and no temp file is left."""
    grid = tmp_path / "grid.png"
    assert main(["show", str(set_file), "--out", str(grid)]) == 0
    capsys.readouterr()
    before = tree(tmp_path)
    _disk_full(monkeypatch)
    one_line(capsys, ["show", set_file, "--out", grid], "no space left on device; free some space")
    assert tree(tmp_path) == before


def test_disk_full_in_a_run(capsys, tmp_path, store, monkeypatch):
    """disk-full: a run whose disk fills after a few writes stops with the same line; the directory can be resumed."""
    out = tmp_path / "run"
    _disk_full(monkeypatch, after=6)
    one_line(capsys, distill_args(store, out), "no space left on device")
    monkeypatch.undo()
    assert not list(out.rglob(".*.tmp"))
    assert main([str(a) for a in distill_args(store, out, "--resume")]) == 0


# --- ways out: NaN stops, restarts, resume with changes ----------------------------------------------------------
def _nan_from(monkeypatch, it_bad: int):
    """MTT images turn NaN in iteration `it_bad` (a stand-in for a too high learning rate)."""
    from distillery.methods.mtt import MTT

    real = MTT.step

    def step(self, it):
        logs = real(self, it)
        if it >= it_bad:
            with torch.no_grad():
                self.images.mul_(float("nan"))
        return logs

    monkeypatch.setattr(MTT, "step", step)


def test_explicit_budget_flags_act():
    """opt-budget: an explicit --iterations wins over a preset's --real-epochs; --epochs none (--real-epochs none)
    hands the budget to --iterations, under --estimate too (the value is applied, not dropped as unset)."""
    from distillery.distill import given_from_args, resolve_config

    def config(*argv):
        args = build_parser().parse_args(["distill", "--method", "ratbptt", "--preset", "ratbptt/digits-ipc1",
                                          "--out", "run", *argv])
        return resolve_config("ratbptt", given_from_args(args), args.preset)

    assert config()["real_epochs"] == 30
    assert (config("--iterations", "20")["real_epochs"], config("--iterations", "20")["iterations"]) == (None, 20)
    assert config("--epochs", "none", "--estimate")["real_epochs"] is None
    assert config("--real-epochs", "2")["real_epochs"] == 2


def test_distilled_set_that_diverges_names_the_distillation_lr(capsys, tmp_path, store):
    """run-diverged-set: networks trained on a set blown up by --lr-img stop the run naming the distillation's
    learning rates (--lr-img ...), not the evaluation's --lr that `distill` does not have."""
    line = one_line(capsys, distill_args(store, tmp_path / "run", "--lr-img", "1e30", "--eval-every", "1",
                                         "--health", "off"), "diverged")
    assert "--lr-img" in line and "smaller --lr;" not in line and "evaluate with" not in line, line


def test_nan_before_the_first_checkpoint(capsys, tmp_path, store, monkeypatch):
    """nan-no-checkpoint: the message says there is no checkpoint, and the same command starts the run again."""
    out = tmp_path / "run"
    _nan_from(monkeypatch, 0)
    line = one_line(capsys, distill_args(store, out, "--checkpoint-every", "5", "--iterations", "5"),
                    "no checkpoint was written yet")
    assert CHECKPOINT not in line and not (out / CHECKPOINT).exists()
    monkeypatch.undo()
    assert main([str(a) for a in distill_args(store, out, "--lr-img", "50")]) == 0
    history = json.loads((out / "config.json").read_text())["history"]
    assert [h["event"] for h in history] == ["start", "restart"]


def test_nan_names_the_real_checkpoint_and_resume_lowers_the_lr(capsys, tmp_path, store, monkeypatch):
    """nan-with-checkpoint: the named checkpoint exists and holds finite images; --resume with a lower lr works,
    the change is recorded in the history, and the new lr is the one the optimiser uses."""
    out = tmp_path / "run"
    _nan_from(monkeypatch, 2)
    line = one_line(capsys, distill_args(store, out, "--iterations", "4"), "iteration 2")
    assert str(out / CHECKPOINT) in line and "--resume" in line
    ckpt = read_checkpoint(out / CHECKPOINT)
    assert ckpt["it"] == 2 and torch.isfinite(ckpt["method"]["images"]).all()
    monkeypatch.undo()
    assert main([str(a) for a in distill_args(store, out, "--iterations", "4", "--lr-img", "25", "--resume")]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr_img"] == 25 and cfg["history"][-1]["changed"]["lr_img"][1] == 25
    assert cfg["history"][-1]["event"] == "resume" and cfg["history"][-1]["iteration"] == 2
    opt = read_checkpoint(out / CHECKPOINT)["method"]["opt_img"]
    assert opt["param_groups"][0]["lr"] == 25


def test_extend_a_finished_run(capsys, store, finished_run):
    """resume-extend: a larger --iterations continues a finished run; config.json and result.json record it."""
    argv = distill_args(store, finished_run, "--resume")
    argv[argv.index("--iterations") + 1] = "3"
    assert main([str(a) for a in argv]) == 0
    result = json.loads((finished_run / "result.json").read_text())
    cfg = json.loads((finished_run / "config.json").read_text())
    assert result["last"]["iteration"] == 3 and cfg["history"][-1]["changed"] == {"iterations": [2, 3]}
    env = result["environment"]
    assert env["threads"] == torch.get_num_threads() and env["data"] == "scikit-learn" and env["library_version"]
    assert cfg["environment"] == env and env["command"] == sys.argv  # the process's command line


def test_resume_with_other_thread_count_warns(capsys, finished_run):
    """resume-threads: a resume with another thread count says results will differ in the last bits."""
    from distillery.distill import resume_may_change
    from distillery.run.resume import prepare_run_dir, unlock_run_dir

    config = json.loads((finished_run / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("environment", "history")}
    torch.set_num_threads(2)
    try:
        prepare_run_dir(finished_run, config, resume=True, may_change=resume_may_change(config["method"]))
    finally:
        torch.set_num_threads(1)
        unlock_run_dir(finished_run)
    err = capsys.readouterr().err
    assert "ran with 1 threads and resumes with 2" in err and "last bits" in err
    assert json.loads((finished_run / "config.json").read_text())["history"][-1]["environment"]["threads"] == 2


def test_resume_may_turn_the_fast_paths_off(finished_run):
    """capture-failed: its fix, `--fast off` (or `--norm-kernel torch`) with `--resume`, is accepted and recorded."""
    from distillery.distill import resume_may_change
    from distillery.run.resume import prepare_run_dir, unlock_run_dir

    config = json.loads((finished_run / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("environment", "history")}
    assert config["fast"] == "off" and config["norm_kernel"] == "torch"
    try:
        prepare_run_dir(finished_run, {**config, "fast": "on", "norm_kernel": "triton"}, resume=True,
                        may_change=resume_may_change(config["method"]))
    finally:
        unlock_run_dir(finished_run)
    history = json.loads((finished_run / "config.json").read_text())["history"]
    assert history[-1]["changed"] == {"fast": ["off", "on"], "norm_kernel": ["torch", "triton"]}, history[-1]


def test_files_respect_the_umask(tmp_path):
    """io-umask: files are created with the mode the umask allows, not 0600."""
    from distillery.io import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    old = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "a.txt", "y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o664


# --- devices -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row,device,needle", [
    ("device-unknown", "tpu", "unknown device 'tpu'"),
    ("device-bad-index", "cuda:x", "unknown device 'cuda:x'"),
    pytest.param("device-no-cuda", "cuda", "no CUDA GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param("device-cuda-index", "cuda:99", "this machine has",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_device_rows(capsys, row, device, needle):
    one_line(capsys, ["baseline", "random", "--dataset", "digits", "--ipc", "1", "--device", device,
                      "--no-progress"], needle)


# --- signals -----------------------------------------------------------------------------------------------------
def _signal_in(monkeypatch, target: str, sig: int):
    """Replace `target` (module:attr) by a function that receives `sig`, as if the user or a scheduler sent it."""
    module, attr = target.split(":")

    def raise_signal(*args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler runs before this returns
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(f"{module}.{attr}", raise_signal)


@pytest.mark.parametrize("row,argv,target,sig,needle", [
    ("signal-baseline", ["baseline", "random", "--dataset", "digits", "--ipc", "1", "--no-progress"],
     "distillery.evaluation.dsa:random_real_baseline", signal.SIGINT, "interrupted; `distillery baseline` keeps no"),
    ("signal-experts", ["experts", "--dataset", "digits", "--out", "st", "--no-progress"],
     "distillery.experts:train_experts", signal.SIGTERM,
     "terminated; finished experts and each expert's last finished epoch are kept in st"),
    ("signal-estimate", ["distill", "--method", "mtt", "--dataset", "digits", "--out", "est", "--estimate",
                         "--no-progress"], "distillery.run.estimate:check_host_memory", signal.SIGINT,
     "interrupted; --estimate writes nothing, so there is no run in est to continue"),
    ("signal-download", ["download", "mnist"], "distillery.data.download:fetch_dataset", signal.SIGTERM,
     "run `distillery download mnist` again"),
    ("signal-evaluate", ["evaluate", "{set}", "--no-progress"], "distillery.evaluation.score:evaluate_synset",
     signal.SIGINT, "`distillery evaluate` keeps no partial results"),
])
def test_signal_rows(capsys, monkeypatch, set_file, row, argv, target, sig, needle):
    _signal_in(monkeypatch, target, sig)
    handler = signal.getsignal(signal.SIGTERM)
    # a shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    # run with the handler an interactive command has, whoever started the suite
    caller_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main([a.replace("{set}", str(set_file)) for a in argv])
    finally:
        signal.signal(signal.SIGINT, caller_sigint)
    err = capsys.readouterr().err.strip()
    assert code == 128 + sig and err.count("\n") == 0 and needle in err, err
    assert signal.getsignal(signal.SIGTERM) == handler  # main() put the caller's SIGTERM handler back


def test_host_memory_row(capsys, tmp_path, monkeypatch):
    """host-memory: a step that cannot fit is refused before any step, naming --window (RaT-BPTT)."""
    import distillery.run.estimate as estimate

    monkeypatch.setattr(estimate, "available_host_bytes", lambda: 1e3)
    one_line(capsys, ["distill", "--method", "ratbptt", "--dataset", "digits", "--out", tmp_path / "r",
                      "--no-progress"], "lower --window")
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_estimate_experts_row(capsys, tmp_path, monkeypatch):
    """estimate-experts: --estimate without --experts projects the expert training and trains none."""
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    one_line(capsys, ["distill", "--method", "mtt", "--dataset", "digits", "--out", tmp_path / "m", "--estimate",
                      "--no-progress"], "--estimate trains no experts")
    assert not (tmp_path / "cache" / "experts").exists()


def test_sigterm_stops_a_run_like_ctrl_c_and_it_resumes(capsys, tmp_path, store, monkeypatch):
    """signal-distill: SIGTERM mid-run exits 143 with the resume hint; the checkpoint is good and --resume ends it."""
    from distillery.run import loop as run

    out = tmp_path / "run"
    real, calls = run.evaluate_synset, []

    def evaluate_then_term(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "evaluate_synset", evaluate_then_term)
    argv = distill_args(store, out, "--eval-every", "1")
    assert main([str(a) for a in argv]) == 143
    err = capsys.readouterr().err
    assert "terminated; continue the run in" in err and "--resume" in err
    monkeypatch.undo()
    assert main([str(a) for a in [*argv, "--resume"]]) == 0


# --- downloads ---------------------------------------------------------------------------------------------------
@pytest.fixture()
def mirror(tmp_path):
    """A local http.server on 127.0.0.1 serving tmp_path/mirror (files with wrong contents)."""
    root = tmp_path / "mirror"
    root.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (root / name).write_bytes(b"not the real file")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _closed_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize("row,name,needle", [
    ("download-unknown", "nosuchset", "unknown dataset 'nosuchset'"),
    ("download-not-available", "digits", "has no automatic download"),
])
def test_download_name_rows(capsys, tmp_path, row, name, needle):
    one_line(capsys, ["download", name, "--data-dir", tmp_path / "d"], needle)
    assert tree(tmp_path / "d") == {}


def test_download_checksum_mismatch(capsys, tmp_path, mirror, monkeypatch):
    """download-checksum: a file that does not match its published checksum is deleted, nothing is kept."""
    monkeypatch.setenv("DISTILLERY_MIRROR", mirror)
    one_line(capsys, ["download", "mnist", "--data-dir", tmp_path / "d"], "checksum mismatch")
    assert tree(tmp_path / "d") == {}


def test_download_network_down(capsys, tmp_path, monkeypatch):
    """download-network."""
    monkeypatch.setenv("DISTILLERY_MIRROR", _closed_port())
    one_line(capsys, ["download", "mnist", "--data-dir", tmp_path / "d"], "cannot download")
    assert tree(tmp_path / "d") == {}


def test_download_disk_full(capsys, tmp_path, mirror, monkeypatch):
    """download-disk-full: a full disk is named as such, not as a network problem."""
    monkeypatch.setenv("DISTILLERY_MIRROR", mirror)
    _disk_full(monkeypatch)
    one_line(capsys, ["download", "mnist", "--data-dir", tmp_path / "d"], "no space left on device")
    assert tree(tmp_path / "d") == {}


def test_download_into_a_file(capsys, tmp_path):
    """download-data-dir-file."""
    (tmp_path / "d").write_text("precious")
    one_line(capsys, ["download", "mnist", "--data-dir", tmp_path / "d"], "is an existing file")
    assert (tmp_path / "d").read_text() == "precious"


# --- hints name real things --------------------------------------------------------------------------------------
def test_hints_name_commands_that_exist(capsys):
    """hints: `distillery datasets` and not-found errors name real commands, never a script or flag we lack."""
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    commands = build_parser()._subparsers._group_actions[0].choices
    lines = [*out.splitlines(), one_line(capsys, ["baseline", "random", "--dataset", "cifar10", "--ipc", "1"],
                                         "distillery download cifar10")]
    for line in lines:
        assert "prepare.sh" not in line and "--download" not in line and "shared/" not in line, line
        for part in line.split("distillery ")[1:]:  # every `distillery CMD` named is a real command
            assert part.split()[0].strip("`,;") in commands, line
        if "distillery download " in line:
            assert line.split("distillery download ")[1].split()[0].strip("`,;") in SOURCES, line


def test_every_row_of_the_table_has_a_test():
    """docs/ERRORS.md and the tests stay in step: each row id appears in a test file as a parameter id or a
    docstring."""
    doc = (Path(__file__).parents[1] / "docs" / "ERRORS.md").read_text()
    cells = re.findall(r"^\| ([a-z][a-z0-9-]+(?:, [a-z0-9-]+)*) \|", doc, re.M)
    ids = [i for cell in cells for i in cell.split(", ") if i != "id"]
    here = "".join(f.read_text() for f in Path(__file__).parent.glob("test_*.py"))
    assert len(ids) > 50 and not [i for i in ids if f'"{i}' not in here], ids


# --- --fast on (the CUDA-graph iterations): grad mode and device ----------------------------------------------
FAST_ROWS = [
    ("opt-fast-grad", ["--method", "mtt", "--fast", "on", "--grad", "checkpointed"], "not --grad checkpointed"),
    ("device-fast-cpu", ["--method", "tesla", "--fast", "on", "--device", "cpu"], "--fast on replays captured CUDA graphs"),
    ("device-fast-cpu", ["--method", "mtt", "--fast", "on", "--device", "cpu"], "--fast on replays captured CUDA graphs"),
    ("device-fast-cpu", ["--method", "ratbptt", "--fast", "on", "--device", "cpu"],
     "--fast on replays captured CUDA graphs"),
    ("device-eval-fast-cpu", ["--method", "ratbptt", "--eval-fast", "on", "--device", "cpu"],
     "--eval-fast on replays captured CUDA graphs but the device is cpu"),
    ("norm-kernel-cpu", ["--method", "mtt", "--norm-kernel", "triton", "--device", "cpu"],
     "--norm-kernel triton runs a CUDA kernel but the device is cpu"),
    ("norm-kernel-cpu", ["--method", "ratbptt", "--norm-kernel", "triton", "--device", "cpu"],
     "--norm-kernel triton runs a CUDA kernel but the device is cpu"),
]


@pytest.mark.parametrize("row,argv,needle", FAST_ROWS, ids=[f"{r[0]}-{i}" for i, r in enumerate(FAST_ROWS)])
def test_fast_rows(capsys, tmp_path, row, argv, needle):
    one_line(capsys, ["distill", *argv, "--dataset", "digits", "--out", "run", "--no-progress"], needle)
    assert tree(tmp_path) == {}  # refused before anything was read or written


def test_norm_kernel_without_triton(monkeypatch):
    """norm-kernel-no-triton: on CUDA, a Triton that does not import is one line naming both ways out."""
    from distillery.models import instancenorm
    from distillery.config.validate import check_fast

    monkeypatch.setattr(instancenorm, "triton_missing", lambda: "the triton package does not import (No module)")
    with pytest.raises(UserError, match=r"--norm-kernel triton needs Triton, but the triton package does not import "
                                        r"\(No module\); pip install triton or use --norm-kernel torch"):
        check_fast({"norm_kernel": "triton"}, "cuda")
    check_fast({"norm_kernel": "torch"}, "cuda")


@pytest.mark.parametrize("argv,flag", [(["baseline", "random", "--ipc", "1", "--eval-fast", "on"], "--eval-fast"),
                                       (["baseline", "full", "--eval-fast", "on"], "--eval-fast"),
                                       (["experts", "--out", "e", "--fast", "on"], "--fast")],
                         ids=["device-eval-fast-cpu-random", "device-eval-fast-cpu-full", "device-fast-cpu-experts"])
def test_fast_on_cpu_is_refused_before_data(capsys, tmp_path, argv, flag):
    """The commands that evaluate or train experts: refused before any data is read or anything is written."""
    one_line(capsys, [*argv, "--dataset", "digits", "--device", "cpu"],
             f"{flag} on replays captured CUDA graphs but the device is cpu")
    assert tree(tmp_path) == {}


@pytest.mark.parametrize("option", ["--fast", "--eval-fast"], ids=["capture-failed-mtt", "capture-failed-eval"])
def test_a_failed_capture_names_the_flag_that_turns_it_off(fake_cuda_graphs, option):
    """A capture that fails (faked on the CPU: conftest `fake_cuda_graphs`) is one UserError naming the flag."""
    from distillery.capture import Captured

    fake_cuda_graphs(True)
    with pytest.raises(UserError, match=rf"failed \(operation not permitted when stream is capturing\); rerun with "
                                        rf"{option} off"):
        Captured(lambda x: x * 2, [torch.ones(2)], warmup=1, option=option)


# --- the Python API: the same declarations as the CLI ------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_set():
    ds = load_dataset("digits")
    x, y = ds.random_set(1, torch.Generator().manual_seed(0))
    return ds, x, y


API_ROWS = [
    ("evaluate_set", {"runs": 0}, "evaluate_set(): runs=0 is out of range: it must be >= 1"),
    ("evaluate_set", {"epochs": -1}, "evaluate_set(): epochs=-1 is out of range: it must be >= 1"),
    ("evaluate_set", {"lr": "0.01"}, "evaluate_set(): lr='0.01' is of type str, not float"),
    ("evaluate_set", {"lr": float("inf")}, "lr=inf is not a finite number"),
    ("evaluate_set", {"empty": True}, "images with N >= 1"),
    ("evaluate_set", {"five_labels": True}, "5 labels for 10 images"),
    ("evaluate_set", {"epoch": 3}, "evaluate_set() has no option epoch=; did you mean epochs="),
    ("random_real_baseline", {"ipc": 0}, "random_real_baseline(): ipc=0 is out of range: it must be >= 1"),
    ("random_real_baseline", {"ipc": 1, "seed": -1}, "seed=-1 is out of range"),
    ("load_dataset", {"name": "digits", "val_fraction": 1.0}, "val_fraction=1.0 is out of range"),
    ("distill", {"out": None}, "distill(): out=None is not a path"),
    ("distill", {"lr_imgg": 1}, "distill() has no option lr_imgg=; did you mean lr_img="),
    ("distill", {"lr_img": "100"}, "lr_img='100' is of type str, not float"),
    ("distill", {"threads": 100000}, "threads=100000 is out of range"),
    ("distill", {"experts": 3}, "distill(): experts=3 is not a path"),
    # a pathlib.Path is taken as a path (its store is then looked for), not refused as "not a str"
    ("distill", {"experts": Path("/nonexistent/store")}, "no expert store at /nonexistent/store"),
]


@pytest.mark.parametrize("func,kwargs,needle", API_ROWS, ids=[f"api-args-{i}" for i in range(len(API_ROWS))])
def test_api_arguments_are_checked_like_the_cli(tmp_path, digits_set, func, kwargs, needle):
    """api-args: a bad argument to an API function is one UserError line naming the keyword; nothing is written."""
    from distillery import api

    ds, x, y = digits_set
    kwargs = dict(kwargs)
    if func == "evaluate_set":
        if kwargs.pop("empty", False):
            x, y = x[:0], y[:0]
        if kwargs.pop("five_labels", False):
            y = y[:5]
        call = lambda: api.evaluate_set(x, y, ds, progress=False, **kwargs)  # noqa: E731
    elif func == "random_real_baseline":
        call = lambda: api.random_real_baseline(ds, progress=False, **kwargs)  # noqa: E731
    elif func == "load_dataset":
        call = lambda: api.load_dataset(**kwargs)  # noqa: E731
    else:
        out = kwargs.pop("out", tmp_path / "run")
        call = lambda: api.distill("mtt", out, dataset="digits", **kwargs)  # noqa: E731
    with pytest.raises(UserError) as err:
        call()
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert tree(tmp_path) == {} and not (tmp_path / "None").exists()


def test_api_accepts_numpy_and_lists(digits_set):
    """api-args: numpy arrays, lists and numpy scalars are converted, not refused (and not an AttributeError)."""
    import numpy as np

    from distillery import api

    ds, x, y = digits_set
    res = api.evaluate_set(x.numpy(), y.tolist(), ds, runs=np.int64(1), epochs=1, progress=False)
    assert len(res.accs) == 1 and 0 <= res.mean <= 1
