"""A file fuzzer: every reader of a file a user or another program writes gets damaged and wrong variants of a valid
file, and must either give one `error:` line (exit 2, no traceback; a `UserError` from the API) or a correct result,
writing nothing outside the output folder and changing nothing that was there.

Seeded and table-driven: each reader has a valid file set, byte-level variants (zero bytes, truncations, bit flips,
garbage) of each of its files, and structured variants (wrong type, shape, dtype, NaN/inf) built as the writers
would. The case list is fixed by `SEED`, so a failure names a case that can be rerun alone.
"""

import contextlib
import hashlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from distillery.cli import main
from distillery.data import load_dataset
from distillery.errors import UserError
from distillery.experts import ExpertStore
from distillery.sets.imports import import_experts
from distillery.models import init_seeded
from distillery.sets.synset import SyntheticSet, preprocess_record

SEED = 20261205
MODEL = "ConvNetD1W8"  # the smallest model whose layout an MTT buffer on digits can hold


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    """One data cache for the module (digits decoded once), outside every case's watched folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILLERY_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


# --- byte-level damage -------------------------------------------------------------------------------------------
def byte_variants(name: str, n_flips: int = 4) -> list[tuple[str, object]]:
    """(case id, damage(path)) for one file: zero bytes, three truncations, bit flips at seeded places, garbage."""
    rng = random.Random(f"{SEED}-{name}")

    def truncate(frac):
        return lambda p: p.write_bytes(p.read_bytes()[:int(len(p.read_bytes()) * frac)])

    def flip(u):
        def damage(p):
            raw = bytearray(p.read_bytes())
            i = int(u * len(raw))
            raw[i] ^= 1 << (i % 8)
            p.write_bytes(bytes(raw))
        return damage

    out = [(f"{name}-zero-byte", lambda p: p.write_bytes(b"")),
           (f"{name}-truncated-8", lambda p: p.write_bytes(p.read_bytes()[:8])),
           (f"{name}-truncated-half", truncate(0.5)),
           (f"{name}-truncated-last", lambda p: p.write_bytes(p.read_bytes()[:-1])),
           (f"{name}-garbage", lambda p: p.write_bytes(random.Random(SEED).randbytes(len(p.read_bytes()))))]
    out += [(f"{name}-flip-{k}", flip(rng.random())) for k in range(n_flips)]
    out += [(f"{name}-flip-head-{k}", flip(rng.random() * 0.05)) for k in range(2)]
    return out


# --- running a case ----------------------------------------------------------------------------------------------
def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys, monkeypatch, case_dir: Path, argv: list) -> int:
    """Run the CLI in `case_dir`; assert exit 0, or exit 2 with one `error:` line and no traceback; and that nothing
    outside `case_dir/out` was written or changed. Returns the exit code."""
    monkeypatch.chdir(case_dir)
    before = tree(case_dir)
    with warnings.catch_warnings(record=True) as caught:  # a warning is a second line, or a silent cast (complex)
        warnings.simplefilter("always")
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code
    assert not caught, [str(w.message) for w in caught]
    out, err = capsys.readouterr()
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and "%|" not in line]
    assert "Traceback" not in err, err
    if code != 0:
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    after = {k: v for k, v in tree(case_dir).items() if not k.startswith("out/")}
    assert after == before  # nothing new outside out/, nothing that was there changed
    return code


# --- valid files -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _good_set(digits, ipc: int = 1) -> SyntheticSet:
    x, y = digits.random_set(ipc, torch.Generator().manual_seed(0))
    return SyntheticSet(x, y, "hard", 0.01, preprocess_record(digits.preprocess),
                        {"dataset": "digits", "num_classes": 10, "class_names": list(digits.spec.class_names),
                         "method": "random", "model": MODEL})


def _buffer(experts: int = 2, epochs: int = 2) -> list:
    out = []
    for k in range(experts):
        params = [p.detach().clone() for p in init_seeded(MODEL, 1, 10, (8, 8), k).parameters()]
        out.append([[p + 0.01 * e for p in params] for e in range(epochs + 1)])
    return out


# --- distilled set files (SyntheticSet.load, through `show`) ------------------------------------------------------
def _set_variant(change):
    """A set file written by `save` (fresh digest) after `change(set)`: contents only the contents check sees."""
    def make(d: Path, digits) -> None:
        s = _good_set(digits)
        s.images, s.labels, s.meta = s.images.clone(), s.labels.clone(), dict(s.meta)
        change(s)
        s.save(d / "set.safetensors")
    return make


def _set_header(edit):
    """The valid set file with its distillery JSON header replaced by `edit(header)`, and no digest (as older sets),
    so that only the contents check can see it."""
    def make(d: Path, digits) -> None:
        from safetensors.torch import load_file, save_file

        _good_set(digits).save(d / "set.safetensors")
        tensors = load_file(d / "set.safetensors")
        raw = (d / "set.safetensors").read_bytes()
        header = json.loads(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]["distillery"])
        text = json.dumps(edit(header))
        save_file(tensors, d / "set.safetensors", metadata={"distillery": text})
    return make


def _set_attr(name, value):
    return _set_variant(lambda s: setattr(s, name, value))


SET_CASES = [(c, lambda d, digits, damage=damage: (_good_set(digits).save(d / "set.safetensors"),
                                                   damage(d / "set.safetensors")))
             for c, damage in byte_variants("set")] + [
    ("set-nan-images", _set_variant(lambda s: s.images.view(-1).__setitem__(5, float("nan")))),
    ("set-inf-images", _set_variant(lambda s: s.images.view(-1).__setitem__(5, float("inf")))),
    ("set-int-images", _set_attr("images", torch.zeros(10, 1, 8, 8, dtype=torch.int64))),
    ("set-3d-images", _set_attr("images", torch.zeros(10, 8, 8))),
    ("set-empty", _set_variant(lambda s: (setattr(s, "images", s.images[:0]), setattr(s, "labels", s.labels[:0])))),
    ("set-labels-out-of-range", _set_variant(lambda s: s.labels.__setitem__(0, 99))),
    ("set-labels-negative", _set_variant(lambda s: s.labels.__setitem__(0, -1))),
    ("set-labels-float-hard", _set_attr("labels", torch.zeros(10))),
    ("set-labels-short", _set_variant(lambda s: setattr(s, "labels", s.labels[:5]))),
    ("set-soft-wrong-k", _set_variant(lambda s: (setattr(s, "labels", torch.rand(10, 3)),
                                                 setattr(s, "label_kind", "soft")))),
    ("set-soft-nan", _set_variant(lambda s: (setattr(s, "labels", torch.full((10, 10), float("nan"))),
                                             setattr(s, "label_kind", "soft")))),
    ("set-lr-negative", _set_attr("lr", -0.01)),
    ("set-lr-nan", _set_attr("lr", float("nan"))),
    ("set-uneven-classes", _set_variant(lambda s: (setattr(s, "images", s.images[:9]),
                                                   setattr(s, "labels", s.labels[:9])))),
    ("set-header-list", _set_header(lambda h: [h])),
    ("set-header-kind", _set_header(lambda h: {**h, "label_kind": "fuzzy"})),
    ("set-header-lr-string", _set_header(lambda h: {**h, "lr": "0.01"})),
    ("set-header-meta-list", _set_header(lambda h: {**h, "meta": []})),
    ("set-header-num-classes", _set_header(lambda h: {**h, "meta": {**h["meta"], "num_classes": "10"}})),
    ("set-header-dataset-int", _set_header(lambda h: {**h, "meta": {**h["meta"], "dataset": 7}})),
    ("set-header-class-names", _set_header(lambda h: {**h, "meta": {**h["meta"], "class_names": 3}})),
    ("set-header-preprocess-kind", _set_header(lambda h: {**h, "preprocess_meta": {"kind": "nope"}})),
    ("set-header-preprocess-list", _set_header(lambda h: {**h, "preprocess_meta": [1]})),
]


@pytest.mark.parametrize("case,make", SET_CASES, ids=[c for c, _ in SET_CASES])
def test_fuzz_set_file(capsys, monkeypatch, tmp_path, digits, case, make):
    make(tmp_path, digits)
    code = run_cli(capsys, monkeypatch, tmp_path, ["show", "set.safetensors", "--out", "out/grid.png"])
    if code == 0:  # only a flip that changes nothing the set means (JSON whitespace, say) can pass
        s = SyntheticSet.load(tmp_path / "set.safetensors")
        assert torch.isfinite(s.images).all()
    with pytest.raises(UserError) if code else contextlib.nullcontext():  # the API agrees with the CLI
        SyntheticSet.load(tmp_path / "set.safetensors")


# --- published sets: images_*.pt + labels_*.pt + lr_*.pt ---------------------------------------------------------
def _pt_files(d: Path, digits, images=None, labels=None, lr=None) -> None:
    s = _good_set(digits)
    torch.save(s.images if images is None else images, d / "images_best.pt")
    torch.save(s.labels if labels is None else labels, d / "labels_best.pt")
    torch.save(torch.tensor(0.01) if lr is None else lr, d / "lr_best.pt")


def _pt(**parts):
    return lambda d, digits: _pt_files(d, digits, **{k: (v() if callable(v) else v) for k, v in parts.items()})


def _nan_like(shape, value=float("nan")):
    def make():
        x = torch.randn(shape)
        x.view(-1)[1] = value
        return x
    return make


PT_CASES = [(c, lambda d, digits, damage=damage, f=f: (_pt_files(d, digits), damage(d / f)))
            for f in ("images_best.pt", "labels_best.pt", "lr_best.pt")
            for c, damage in byte_variants(f.split("_")[0], n_flips=3)] + [
    ("images-list", _pt(images=[torch.zeros(10, 1, 8, 8)])),
    ("images-string", _pt(images="images")),
    ("images-none", _pt(images={"images": None})),
    ("images-dict-no-images", _pt(images={"x": torch.zeros(3)})),
    ("images-dict-bad-lr", _pt(images={"images": torch.zeros(10, 1, 8, 8), "lr": "fast"})),
    ("images-int-scalar", _pt(images=7)),
    ("images-3d", _pt(images=torch.zeros(10, 8, 8))),
    ("images-wrong-channels", _pt(images=torch.zeros(10, 3, 8, 8))),
    ("images-empty", _pt(images=torch.zeros(0, 1, 8, 8))),
    ("images-9", _pt(images=torch.zeros(9, 1, 8, 8))),
    ("images-complex", _pt(images=torch.zeros(10, 1, 8, 8, dtype=torch.cfloat))),
    ("images-bool", _pt(images=torch.zeros(10, 1, 8, 8, dtype=torch.bool))),
    ("images-float16", _pt(images=lambda: torch.randn(10, 1, 8, 8).half())),
    ("images-float64", _pt(images=lambda: torch.randn(10, 1, 8, 8).double())),
    ("images-uint8", _pt(images=lambda: torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8))),
    ("images-int64", _pt(images=lambda: torch.randint(-5, 5, (10, 1, 8, 8)))),
    ("images-nan", _pt(images=_nan_like((10, 1, 8, 8)))),
    ("images-inf", _pt(images=_nan_like((10, 1, 8, 8), float("-inf")))),
    ("images-huge", _pt(images=torch.full((10, 1, 8, 8), 3e38))),
    ("labels-list", _pt(labels=[0, 1])),
    ("labels-string", _pt(labels="cat")),
    ("labels-minus-one", _pt(labels=torch.tensor([-1, 1, 2, 3, 4, 5, 6, 7, 8, 9]))),
    ("labels-too-big", _pt(labels=torch.arange(10) + 100)),
    ("labels-short", _pt(labels=torch.arange(5))),
    ("labels-3d", _pt(labels=torch.zeros(10, 10, 1))),
    ("labels-scalar", _pt(labels=torch.tensor(3))),
    ("labels-float-1d", _pt(labels=torch.arange(10).float())),
    ("labels-bool", _pt(labels=torch.ones(10, dtype=torch.bool))),
    ("labels-complex", _pt(labels=torch.zeros(10, 10, dtype=torch.cfloat))),
    ("labels-soft-nan", _pt(labels=_nan_like((10, 10)))),
    ("labels-soft-inf", _pt(labels=_nan_like((10, 10), float("inf")))),
    ("labels-soft-wrong-k", _pt(labels=torch.rand(10, 4))),
    ("labels-uneven", _pt(labels=torch.tensor([0, 0, 2, 3, 4, 5, 6, 7, 8, 9]))),
    ("lr-string", _pt(lr="0.01")),
    ("lr-negative", _pt(lr=torch.tensor(-0.01))),
    ("lr-zero", _pt(lr=0.0)),
    ("lr-nan", _pt(lr=torch.tensor(float("nan")))),
    ("lr-inf", _pt(lr=float("inf"))),
    ("lr-vector", _pt(lr=torch.ones(2))),
    ("lr-bool", _pt(lr=True)),
    ("lr-complex", _pt(lr=torch.tensor(1j))),
    ("lr-list", _pt(lr=[0.01])),
]


def _check_imported(path: Path) -> None:
    """A set the import wrote is a valid set: finite images, labels in range, lr > 0 or none."""
    s = SyntheticSet.load(path)
    assert torch.isfinite(s.images).all() and len(s.images) == len(s.labels)
    assert s.lr is None or s.lr > 0


@pytest.mark.parametrize("case,make", PT_CASES, ids=[c for c, _ in PT_CASES])
def test_fuzz_published_pt(capsys, monkeypatch, tmp_path, digits, case, make):
    make(tmp_path, digits)
    if run_cli(capsys, monkeypatch, tmp_path, ["import-set", "images_best.pt", "--dataset", "digits",
                                               "--out", "out/s.safetensors"]) == 0:
        _check_imported(tmp_path / "out" / "s.safetensors")


# --- RaT-BPTT .h5 (+ .pth beside it) ------------------------------------------------------------------------------
h5py = pytest.importorskip("h5py")


def _h5_files(d: Path, digits, data=None, label=None, pth=None, fill=None) -> None:
    s = _good_set(digits)
    rows = s.images.reshape(10, -1)
    with h5py.File(d / "rat.h5", "w") as f:
        if fill is not None:
            fill(f)
        else:
            f.create_dataset("data", data=rows.numpy() if data is None else data)
            if label is not None:
                f.create_dataset("label", data=label)
    soft = torch.nn.functional.one_hot(s.labels, 10).float()
    ck = {"epoch": 3, "model_state_dict": {"module.data.weight": rows.clone()},
          "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0, 1]}]},
          "label_state_dict": {"module.label.weight": soft}}
    torch.save(ck if pth is None else pth, d / "rat.pth")


def _h5(**parts):
    return lambda d, digits: _h5_files(d, digits, **parts)


def _external(f):
    f["data"] = h5py.ExternalLink("/etc/hostname", "/data")


def _soft_link(f):
    f.create_dataset("real", data=np.zeros((10, 64), np.float32))
    f["data"] = h5py.SoftLink("/real")


def _dangling(f):
    f["data"] = h5py.SoftLink("/nowhere")


def _pth_with(weight):
    return {"epoch": 1, "label_state_dict": {"module.label.weight": weight}}


H5_CASES = [(c, lambda d, digits, damage=damage, f=f: (_h5_files(d, digits), damage(d / f)))
            for f in ("rat.h5", "rat.pth") for c, damage in byte_variants(f.replace(".", "-"), n_flips=3)] + [
    ("data-group", _h5(fill=lambda f: f.create_group("data"))),
    ("data-bytes", _h5(data=np.bytes_(b"abc"))),
    ("data-strings", _h5(fill=lambda f: f.create_dataset("data", data=["a", "b"], dtype=h5py.string_dtype()))),
    ("data-scalar", _h5(data=np.float32(1.5))),
    ("data-empty", _h5(data=np.zeros((0, 64), np.float32))),
    ("data-complex", _h5(data=np.zeros((10, 64), np.complex64))),
    ("data-bool", _h5(data=np.zeros((10, 64), bool))),
    ("data-compound", _h5(data=np.zeros(10, dtype=[("a", "f4"), ("b", "i4")]))),
    ("data-wrong-shape", _h5(data=np.zeros((10, 65), np.float32))),
    ("data-1d", _h5(data=np.zeros(640, np.float32))),
    ("data-nan", _h5(data=np.full((10, 64), np.nan, np.float32))),
    ("data-external-link", _h5(fill=_external)),
    ("data-soft-link", _h5(fill=_soft_link)),
    ("data-dangling-link", _h5(fill=_dangling)),
    ("data-missing", _h5(fill=lambda f: f.create_dataset("grad", data=np.zeros(3)))),
    ("label-nan", _h5(label=np.full((10, 10), np.nan, np.float32))),
    ("label-group", _h5(fill=lambda f: (f.create_dataset("data", data=np.zeros((10, 64), np.float32)),
                                        f.create_group("label")))),
    ("label-wrong-k", _h5(label=np.zeros((10, 3), np.float32))),
    ("label-negative", _h5(label=-np.ones(10, np.int64))),
    ("label-bytes", _h5(label=np.bytes_(b"x"))),
    ("pth-list", _h5(pth=[1, 2])),
    ("pth-string", _h5(pth="labels")),
    ("pth-state-string", _h5(pth={"label_state_dict": "x"})),
    ("pth-state-empty", _h5(pth={"label_state_dict": {}})),
    ("pth-weight-list", _h5(pth=_pth_with([1.0]))),
    ("pth-weight-1d-float", _h5(pth=_pth_with(torch.zeros(10)))),
    ("pth-weight-wrong-k", _h5(pth=_pth_with(torch.zeros(10, 4)))),
    ("pth-weight-wrong-n", _h5(pth=_pth_with(torch.zeros(7, 10)))),
    ("pth-weight-nan", _h5(pth=_pth_with(torch.full((10, 10), float("nan"))))),
    ("pth-weight-complex", _h5(pth=_pth_with(torch.zeros(10, 10, dtype=torch.cfloat)))),
    ("pth-model-state-string", _h5(pth={"model_state_dict": "x", **_pth_with(torch.rand(10, 10))})),
    ("pth-no-labels", _h5(pth={"epoch": 1})),
]


@pytest.mark.parametrize("case,make", H5_CASES, ids=[c for c, _ in H5_CASES])
def test_fuzz_ratbptt_h5(capsys, monkeypatch, tmp_path, digits, case, make):
    make(tmp_path, digits)
    if run_cli(capsys, monkeypatch, tmp_path, ["import-set", "rat.h5", "--dataset", "digits",
                                               "--out", "out/s.safetensors"]) == 0:
        _check_imported(tmp_path / "out" / "s.safetensors")


# --- MTT replay buffers (import-experts) -------------------------------------------------------------------------
def _buf(change):
    def make(d: Path) -> None:
        b = _buffer()
        torch.save(change(b), d / "replay_buffer_0.pt")
    return make


def _set_in(b, path, value):
    """b with b[i][j]...[k] = value for path (i, j, ..., k)."""
    node = b
    for i in path[:-1]:
        node = node[i]
    node[path[-1]] = value
    return b


def _all_same(b):
    return [[list(e[0]) for _ in e] for e in b]


BUFFER_CASES = [(c, lambda d, damage=damage: (torch.save(_buffer(), d / "replay_buffer_0.pt"),
                                              damage(d / "replay_buffer_0.pt")))
                for c, damage in byte_variants("buffer")] + [
    ("buffer-dict", _buf(lambda b: {"experts": b})),
    ("buffer-tensor", _buf(lambda b: torch.zeros(3))),
    ("buffer-empty", _buf(lambda b: [])),
    ("buffer-strings", _buf(lambda b: [["a", "b", "c"]])),
    ("expert-tensor", _buf(lambda b: [torch.zeros(3, 5)])),
    ("expert-one-snapshot", _buf(lambda b: [b[0][:1]])),
    ("experts-other-epochs", _buf(lambda b: [b[0], b[1][:2]])),
    ("snapshot-missing-param", _buf(lambda b: _set_in(b, (0, 1), b[0][1][:-1]))),
    ("snapshot-extra-param", _buf(lambda b: _set_in(b, (0, 1), b[0][1] + [torch.zeros(3)]))),
    ("param-wrong-shape", _buf(lambda b: _set_in(b, (0, 1, 0), torch.zeros(2, 2)))),
    ("param-int", _buf(lambda b: _set_in(b, (0, 1, 0), b[0][1][0].long()))),
    ("param-complex", _buf(lambda b: _set_in(b, (0, 1, 0), b[0][1][0].to(torch.cfloat)))),
    ("param-string", _buf(lambda b: _set_in(b, (0, 1, 0), "w"))),
    ("param-nan", _buf(lambda b: _set_in(b, (1, 2, 1), torch.full_like(b[1][2][1], float("nan"))))),
    ("param-inf", _buf(lambda b: _set_in(b, (0, 0, 0), torch.full_like(b[0][0][0], float("inf"))))),
    ("param-float64", _buf(lambda b: [[[p.double() for p in s] for s in e] for e in b])),
    ("snapshots-all-equal", _buf(_all_same)),
    ("snapshots-two-equal", _buf(lambda b: _set_in(b, (1, 2), list(b[1][1])))),
]


@pytest.mark.parametrize("case,make", BUFFER_CASES, ids=[c for c, _ in BUFFER_CASES])
def test_fuzz_replay_buffer(capsys, monkeypatch, tmp_path, case, make):
    (tmp_path / "given").mkdir()
    make(tmp_path / "given")
    if run_cli(capsys, monkeypatch, tmp_path, ["import-experts", "given", "--dataset", "digits", "--model", MODEL,
                                               "--out", "out/store"]) == 0:
        store = ExpertStore.open(tmp_path / "out" / "store")
        for k in range(store.num_experts):
            t = store.trajectory(k)
            assert torch.isfinite(t).all() and (t[1:] != t[:-1]).any(1).all()


# --- expert stores (ExpertStore.open and reads, through the API) --------------------------------------------------
@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    """A valid 2-expert store, imported from an MTT buffer (no training)."""
    d = tmp_path_factory.mktemp("buffer")
    torch.save(_buffer(), d / "replay_buffer_0.pt")
    import_experts(d, "digits", MODEL, d / "store")
    return d / "store"


def _manifest(edit):
    def damage(store: Path) -> None:
        m = json.loads((store / "manifest.json").read_text())
        edit(m)
        (store / "manifest.json").write_text(json.dumps(m))
    return damage


def _entry(key, value):
    return _manifest(lambda m: m["experts"][0].__setitem__(key, value))


STORE_CASES = [(c, lambda s, damage=damage, f=f: damage(s / f))
               for f, name in (("expert_0000.safetensors", "shard"), ("manifest.json", "manifest"))
               for c, damage in byte_variants(name, n_flips=3)] + [
    ("manifest-list", lambda s: (s / "manifest.json").write_text("[]")),
    ("manifest-epochs-string", _manifest(lambda m: m.update(epochs="2"))),
    ("manifest-epochs-negative", _manifest(lambda m: m.update(epochs=-1))),
    ("manifest-experts-dict", _manifest(lambda m: m.update(experts={"a": 1}))),
    ("manifest-layout-missing", _manifest(lambda m: m.pop("layout"))),
    ("manifest-dataset-int", _manifest(lambda m: m.update(dataset=3))),
    ("entry-file-outside", _entry("file", "../../../../etc/hostname")),
    ("entry-file-int", _entry("file", 5)),
    ("entry-sha-wrong", _entry("sha256", "0" * 64)),
    ("entry-index-string", _entry("index", "0")),
    ("shard-nan", lambda s: _rewrite_shard(s, lambda t: t.index_fill(1, torch.tensor([0]), float("nan")))),
    ("shard-degenerate", lambda s: _rewrite_shard(s, lambda t: t[:1].expand_as(t).contiguous())),
    ("shard-float64", lambda s: _rewrite_shard(s, lambda t: t.double())),
]

def _rewrite_shard(store: Path, change) -> None:
    """Shard 0 with its trajectory changed, and its manifest sha256 updated to match (a consistent, wrong store)."""
    from safetensors import safe_open
    from safetensors.torch import save

    path = store / "expert_0000.safetensors"
    with safe_open(path, framework="pt") as f:
        meta, t = f.metadata(), f.get_tensor("trajectory")
    data = save({"trajectory": change(t)}, metadata=meta)
    path.write_bytes(data)
    _entry("sha256", hashlib.sha256(data).hexdigest())(store)


@pytest.mark.parametrize("case,damage", [pytest.param(c, d, id=c) for c, d in STORE_CASES])
def test_fuzz_expert_store(tmp_path, good_store, case, damage):
    store = tmp_path / "store"
    shutil.copytree(good_store, store)
    damage(store)
    before = tree(tmp_path)
    try:
        opened = ExpertStore.open(store)
        for k in range(opened.num_experts):
            t = opened.trajectory(k)
            assert t.dtype == torch.float32 and torch.isfinite(t).all() and (t[1:] != t[:-1]).any(1).all()
    except UserError as e:  # one line, never advising to delete a file outside the store
        assert "\n" not in str(e) and not ("hostname" in str(e) and "delete" in str(e))
    assert tree(tmp_path) == before


# --- run directories (`distillery report` reads config.json, metrics.csv, result.json and the sets) ---------------
def _run_dir(d: Path, digits) -> None:
    """A run directory as `distill` leaves it, small: config, two metrics rows, a result and the best set."""
    run = d / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": "mtt", "dataset": "digits", "ipc": 1, "model": MODEL,
                                                 "history": [{"time": "t", "event": "start"}]}))
    (run / "metrics.csv").write_text("it,loss,val_acc\n0,2.5,0.1\n1,2.0,0.2\n")
    (run / "result.json").write_text(json.dumps({"best": {"iteration": 1, "val_acc": 0.2}, "seconds": 3.0}))
    _good_set(digits).save(run / "best.safetensors")


def _run_file(name, text):
    return lambda d, digits: (_run_dir(d, digits), (d / "run" / name).write_bytes(
        text if isinstance(text, bytes) else text.encode()))


RUN_CASES = [(c, lambda d, digits, damage=damage, f=f: (_run_dir(d, digits), damage(d / "run" / f)))
             for f in ("config.json", "metrics.csv", "result.json")
             for c, damage in byte_variants(f.replace(".", "-"), n_flips=2)
             if c.rsplit("-", 1)[-1] in ("byte", "half", "garbage", "0")] + [  # each case plots: ~0.5 s
    ("config-list", _run_file("config.json", "[1, 2]")),
    ("config-history-string", _run_file("config.json", '{"history": "x", "ipc": "one"}')),
    ("config-nan", _run_file("config.json", '{"ipc": NaN, "method": 3}')),
    ("metrics-bad-bytes", _run_file("metrics.csv", b"it,loss\n0,\xff\xfe\n")),
    ("metrics-no-header", _run_file("metrics.csv", "1,2,3\n")),
    ("metrics-nan-inf", _run_file("metrics.csv", "it,loss\n0,nan\n1,inf\n2,-inf\n")),
    ("metrics-ragged", _run_file("metrics.csv", "it,loss\n0,1,2,3\n1\n")),
    ("result-list", _run_file("result.json", "[]")),
    ("result-wrong-types", _run_file("result.json", '{"best": 3, "final": "x", "seconds": "long"}')),
]

@pytest.mark.parametrize("case,make", [pytest.param(c, m, id=c) for c, m in RUN_CASES])
def test_fuzz_run_dir(capsys, monkeypatch, tmp_path, digits, case, make):
    make(tmp_path, digits)
    run_cli(capsys, monkeypatch, tmp_path, ["report", "run", "--out", "out/report.html"])


# --- the random-real baseline cache ($DISTILLERY_CACHE/baselines/*.json) -----------------------------------------
BASELINE = {"test_mean": 0.25, "test_std": 0.05, "test_accs": [0.2, 0.3], "lr": 0.01, "epochs": 20, "steps": None}
BASELINE_CASES = byte_variants("baseline") + [
    (f"baseline-{name}", lambda p, rec=rec: p.write_text(json.dumps(rec) if not isinstance(rec, str) else rec))
    for name, rec in [("list", [0.2, 0.3]), ("accs-short", {**BASELINE, "test_accs": [0.2]}),
                      ("accs-nan", '{"test_accs": [NaN, 0.3]}'), ("accs-inf", '{"test_accs": [Infinity, 0.3]}'),
                      ("accs-above-1", {**BASELINE, "test_accs": [1.5, 0.3]}),
                      ("accs-negative", {**BASELINE, "test_accs": [-0.1, 0.3]}),
                      ("accs-ints", {**BASELINE, "test_accs": [0, 1]}), ("accs-bool", {**BASELINE, "test_accs": [True, 0.3]}),
                      ("accs-strings", {**BASELINE, "test_accs": ["0.2", "0.3"]}), ("no-accs", {"steps": 3}),
                      ("steps-negative", {**BASELINE, "steps": -3}), ("steps-float", {**BASELINE, "steps": 2.5}),
                      ("steps-bool", {**BASELINE, "steps": True}), ("huge", " " * (2 << 20) + json.dumps(BASELINE))]]


@pytest.mark.parametrize("case,damage", [pytest.param(c, d, id=c) for c, d in BASELINE_CASES])
def test_fuzz_baseline_cache(tmp_path, case, damage):
    """cache-baseline-damaged: a damaged or wrong cached baseline is measured again (a warning and None), never used, never a traceback."""
    from distillery.evaluation.protocol import dsa_protocol
    from distillery.evaluation.score import read_cached_baseline

    proto = dsa_protocol("ConvNet", runs=2, seed=0, lr=None, augment="none", epochs=20)
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(BASELINE))
    assert read_cached_baseline(path, proto)["test_accs"] == BASELINE["test_accs"]
    damage(path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = read_cached_baseline(path, proto)
    assert got is None or got["test_accs"] == BASELINE["test_accs"], got
    assert got is not None or any("damaged" in str(w.message) for w in seen)
