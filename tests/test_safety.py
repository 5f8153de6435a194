"""Safety by construction (docs/ERRORS.md, "Files, stores and caches"): nothing written by a user or another process
is unpickled, paths from metadata stay in their store, shared stores and caches survive concurrent processes, outputs
never land by accident, run files are read through checked readers."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_background_eval import Drifts
import torch
from safetensors.torch import save as save_tensors

from distillery.run.checkpoint import CHECKPOINT, read_checkpoint, write_checkpoint
from distillery.cli import main
from distillery.errors import UserError


def one_line(capsys, argv, needle, code=2):
    """Run the CLI; assert exit `code` and exactly one stderr line `error: ...` containing `needle`; return it."""
    got = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and "%|" not in line]
    assert got == code, (got, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    return lines[0]


class Payload:
    """Unpickling this would create the file `marker` (a stand-in for any code an attacker chooses)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


STATE = {"it": 2, "best_val": 0.5, "rows": [{"it": 0, "loss": 1.0}], "pending_eval": None,
         "method": {"images": torch.randn(3, 1, 4, 4), "opt": {"state": {0: {"step": torch.tensor(2.0)}},
                                                             "param_groups": [{"betas": (0.9, 0.99), "params": [0]}]}}}


def test_checkpoint_round_trip_is_exact(tmp_path):
    """checkpoint-format: tensors bit-exact, ints stay ints, tuples tuples, int dict keys int keys."""
    write_checkpoint(STATE, tmp_path / CHECKPOINT)
    got = read_checkpoint(tmp_path / CHECKPOINT, template=STATE["method"])
    assert torch.equal(got["method"]["images"], STATE["method"]["images"])
    assert got["method"]["opt"]["state"][0]["step"].item() == 2.0
    assert got["method"]["opt"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert got["rows"] == STATE["rows"] and got["it"] == 2 and got["pending_eval"] is None


@pytest.mark.parametrize("kind", ["pickle", "pickle-in-header"])
def test_crafted_checkpoint_runs_nothing(tmp_path, kind):
    """checkpoint-crafted: a checkpoint with a `__reduce__` payload is refused as damaged and its code never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / CHECKPOINT
    if kind == "pickle":  # the old torch.save format, with a payload where a tensor should be
        buf = io.BytesIO()
        torch.save({**STATE, "method": Payload(marker)}, buf)
        path.write_bytes(buf.getvalue())
    else:  # a valid safetensors container whose JSON carries a pickled payload
        buf = io.BytesIO()
        torch.save(Payload(marker), buf)
        meta = {"format": "distillery-checkpoint", "version": "1", "sha256": "0",
                "state": json.dumps({"dict": [["method", buf.getvalue().hex()]]})}
        path.write_bytes(save_tensors({"t0": torch.zeros(1)}, metadata=meta))
    with pytest.raises(UserError, match="is damaged") as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value) and not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "zero-bytes", "nan", "wrong-shape", "wrong-dtype", "bad-iteration",
                                    "extra-tensor", "flipped"])
def test_damaged_checkpoint_is_one_line(tmp_path, damage):
    """checkpoint-damaged: every kind of damage is 'checkpoint X is damaged (...)', never a traceback."""
    path = tmp_path / CHECKPOINT
    state = {**STATE, "method": dict(STATE["method"])}
    if damage == "nan":
        state["method"]["images"] = torch.full((3, 1, 4, 4), float("nan"))
    elif damage == "wrong-shape":
        state["method"]["images"] = torch.zeros(3, 2, 4, 4)
    elif damage == "wrong-dtype":
        state["method"]["images"] = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    elif damage == "bad-iteration":
        state["it"] = -3
    write_checkpoint(state, path)
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "zero-bytes":
        path.write_bytes(b"")
    elif damage == "flipped":
        path.write_bytes(raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:])
    elif damage == "extra-tensor":
        from distillery.run import checkpoint
        tensors: dict = {}
        tree = checkpoint._encode(state, tensors)
        tensors["t99"] = torch.zeros(1)
        meta = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "state": json.dumps(tree),
                "sha256": checkpoint._digest(tensors)}
        path.write_bytes(save_tensors(tensors, metadata=meta))
    with pytest.raises(UserError, match=f"checkpoint {re.escape(str(path))} is damaged") as err:
        read_checkpoint(path, template=STATE["method"])
    assert "\n" not in str(err.value)


def test_no_unsafe_loads_in_the_sources():
    """Nothing in src/ unpickles with weights_only=False or np.load(allow_pickle=True)."""
    src = Path(__file__).resolve().parents[1] / "src"
    text = "\n".join(p.read_text() for p in src.rglob("*.py"))
    assert "weights_only=False" not in text and "allow_pickle=True" not in text
    assert not re.search(r"pickle\.loads?\(", text)


def _tiny_set():
    from distillery.sets.synset import SyntheticSet
    return SyntheticSet(torch.rand(10, 1, 8, 8), torch.arange(10), meta={"dataset": "digits", "num_classes": 10})


def test_export_refuses_a_non_empty_folder_and_replaces_it_whole(tmp_path, capsys):
    """export-not-empty: a non-empty --out is refused untouched; --replace replaces it whole (no stale files)."""
    s = _tiny_set()
    s.save(tmp_path / "s.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "images_best.pt").write_bytes(b"precious")
    one_line(capsys, ["export", tmp_path / "s.safetensors", "--format", "pt", "--out", out], "--replace")
    assert sorted(p.name for p in out.iterdir()) == ["images_best.pt"]
    assert (out / "images_best.pt").read_bytes() == b"precious"
    assert main(["export", str(tmp_path / "s.safetensors"), "--format", "imagefolder", "--out", str(out),
                 "--replace"]) == 0
    assert not (out / "images_best.pt").exists() and (out / "labels.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    from distillery.api import export_set
    with pytest.raises(UserError, match="not empty"):  # the API is as strict
        export_set(s, "pt", out)
    with pytest.raises(UserError, match="out=None is not a path"):
        export_set(s, "pt", None)


def test_failed_export_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """export-atomic: an export that fails half-way leaves --out (and its parent) as they were."""
    from distillery.sets import export
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def boom(*args):
        raise UserError("cannot write: disk full")
    monkeypatch.setattr(export, "_export_imagefolder", boom)
    with pytest.raises(UserError):
        export.export_set(_tiny_set(), "imagefolder", out, replace=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"] and len(list(tmp_path.iterdir())) == 1


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """A real 2-expert, 2-epoch ConvNetD1 store on digits."""
    from distillery.data import load_dataset
    from distillery.experts import train_experts
    path = tmp_path_factory.mktemp("experts") / "store"
    train_experts(load_dataset("digits"), "ConvNetD1", 2, epochs=2, out_dir=path, progress=False)
    return path


@pytest.mark.parametrize("key,value", [("epochs", "2"), ("epochs", -1), ("layout", None), ("preprocess", []),
                                       ("experts", {"0": 1}), ("experts", [{"index": -1, "file": "a", "sha256": ""}])])
def test_manifest_fields_are_checked(tmp_path, digits_store, key, value):
    """experts-manifest-damaged: a manifest whose fields have the wrong type or range is damaged (one line)."""
    from distillery.experts import ExpertStore
    store = tmp_path / "store"
    shutil.copytree(digits_store, store)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest[key] = value
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest.json is damaged"):
        ExpertStore.open(store)


@pytest.mark.parametrize("file", ["../../../../etc/hostname", "/etc/hostname", "link.safetensors", "", 7])
def test_manifest_paths_stay_in_the_store(tmp_path, digits_store, file):
    """experts-path-outside: a manifest naming a file outside its store is damaged; nothing outside is named as
    something to delete."""
    from distillery.experts import ExpertStore
    store = tmp_path / "store"
    shutil.copytree(digits_store, store)
    (store / "link.safetensors").symlink_to("/etc/hostname")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["experts"][0]["file"] = file
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest.json is damaged") as err:
        ExpertStore.open(store)
    assert "delete" not in str(err.value) and "hostname" not in str(err.value).split("names")[0]


def _cli(*argv: str, env: dict | None = None) -> subprocess.Popen:
    """Start `python -m distillery ARGV` (the worktree's sources) with its output captured."""
    return subprocess.Popen([sys.executable, "-m", "distillery", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_two_experts_commands_share_one_store(tmp_path):
    """experts-concurrent: two `distillery experts` into one store both succeed; the store equals one written by a
    single process, and no snapshot, lock or advice to delete is left behind."""
    from distillery.experts import ExpertStore
    argv = ["experts", "--dataset", "digits", "--model", "ConvNetD1", "--num-experts", "3", "--expert-epochs-train", "2",
            "--threads", "1", "--no-progress"]
    procs = [_cli(*argv, "--out", str(tmp_path / "shared")) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not any("Traceback" in o or "delete" in o for o in outs), outs
    assert main([*argv, "--out", str(tmp_path / "alone")]) == 0
    shared, alone = ExpertStore.open(tmp_path / "shared"), ExpertStore.open(tmp_path / "alone")
    assert [e["index"] for e in shared.experts] == [0, 1, 2]
    for k in range(3):
        assert torch.equal(shared.trajectory(k), alone.trajectory(k))
    assert not (tmp_path / "shared" / ".partial").exists()


@pytest.mark.slow
def test_two_distill_runs_share_the_expert_cache(tmp_path, capsys, monkeypatch):
    """experts-cache-concurrent: two `distill` runs training the same cached experts at once both succeed; a later
    run says it uses the cached experts."""
    argv = ["distill", "--method", "mtt", "--dataset", "digits", "--ipc", "1", "--model", "ConvNetD1",
            "--num-experts", "2", "--expert-epochs-train", "2", "--syn-steps", "2", "--max-start-epoch", "1",
            "--expert-epochs", "1", "--iterations", "2", "--eval-every", "100", "--eval-runs", "1", "--eval-epochs",
            "1", "--final-eval-runs", "1", "--no-progress", "--threads", "1"]
    env = {"DISTILLERY_CACHE": str(tmp_path / "cache")}
    procs = [_cli(*argv, "--out", str(tmp_path / f"run{i}"), env=env) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not any("Traceback" in o or "delete" in o for o in outs), outs
    monkeypatch.setenv("DISTILLERY_CACHE", env["DISTILLERY_CACHE"])
    assert main([*argv, "--out", str(tmp_path / "run3")]) == 0
    out = capsys.readouterr().out
    assert "using cached experts at" in out and "training" not in out, out
    result = json.loads((tmp_path / "run3" / "result.json").read_text())
    parts = [result[k] for k in ("seconds", "seconds_experts", "seconds_baseline")]
    assert all(p >= 0 for p in parts) and result["seconds_total"] >= sum(parts)


def _damage_file(path: Path, damage: str) -> None:
    """Truncate, zero, or flip bytes of a file in place."""
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "zero-bytes":
        path.write_bytes(b"")
    else:
        path.write_bytes(raw[:100] + bytes(b ^ 0xFF for b in raw[100:200]) + raw[200:])


@pytest.mark.parametrize("damage", ["truncated", "zero-bytes", "nan", "wrong-shape"])
def test_damaged_zca_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, damage):
    """cache-zca-damaged: a damaged ZCA cache file is never used: a warning, a new fit, the same data."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    from distillery.data import load_dataset
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path))
    good = load_dataset("digits", zca="kornia")
    (path,) = (tmp_path / "zca").glob("*.safetensors")
    if damage in ("nan", "wrong-shape"):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(path)
        tensors["W"] = tensors["W"] * float("nan") if damage == "nan" else tensors["W"][:10]
        save_file(tensors, path, metadata=meta)
    else:
        _damage_file(path, damage)
    with pytest.warns(UserWarning, match="ZCA cache .* is damaged"):
        again = load_dataset("digits", zca="kornia")
    assert torch.equal(again.train.x, good.train.x) and torch.isfinite(again.train.x).all()
    load_dataset("digits", zca="kornia")  # rewritten whole: read back without a warning (filterwarnings=error)


@pytest.mark.filterwarnings("error")
def test_zca_cache_reads_back_silently(tmp_path, monkeypatch):
    """A good ZCA cache is used without a warning."""
    from distillery.data import load_dataset
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path))
    a, b = load_dataset("digits", zca="kip"), load_dataset("digits", zca="kip")
    assert torch.equal(a.train.x, b.train.x)


def _image_folder(root: Path, size: int = 8) -> Path:
    """A tiny imagefolder dataset: 2 classes x 4 images in train/, 2 in test/."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for j in range(n):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{j}.png")
    return root


@pytest.mark.parametrize("damage", ["truncated", "zero-bytes", "flipped", "wrong-shape"])
def test_damaged_decoded_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, damage):
    """cache-decoded-damaged: a damaged decoded-image cache is never used: a warning, the images decoded again."""
    import numpy as np
    from distillery.data import load_dataset
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    folder = _image_folder(tmp_path / "imgs")
    good = load_dataset(f"imagefolder:{folder}", val_fraction=0)
    caches = sorted((tmp_path / "cache").rglob("*.npz"))
    assert caches
    for path in caches:
        if damage == "wrong-shape":
            with np.load(path) as f:
                np.savez(path.with_suffix(""), images=f["images"][:, :4], labels=f["labels"], classes=f["classes"])
        else:
            _damage_file(path, damage)
    with pytest.warns(UserWarning, match="decoded-image cache .* is damaged"):
        again = load_dataset(f"imagefolder:{folder}", val_fraction=0)
    assert torch.equal(again.train.x, good.train.x) and torch.equal(again.test.y, good.test.y)


RUN_FILES = {  # name: damaged contents
    "metrics.csv": [b"it,loss\n0,1.5\n1,\xff\xfe\n", b"it,loss\n0,abc\n", b"loss\n1.0\n", b"it,loss\n0,1,2\n"],
    "config.json": [b"{half", b"[1, 2]", b'{"history": 3}', b"\xff"],
    "result.json": [b'{"best": 1}', b"null", b'{"best": {"test_mean": "high"}}'],
}


@pytest.mark.parametrize("name,content", [(n, c) for n, cs in RUN_FILES.items() for c in cs])
def test_damaged_run_files_are_named(tmp_path, capsys, name, content):
    """run-file-damaged: `distillery report` on a run whose config.json, metrics.csv or result.json is damaged says
    so in one line, naming the file and the run, and writes nothing."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": "mtt", "dataset": "digits", "ipc": 1}))
    (run / "metrics.csv").write_text("it,loss,val_acc\n0,1.5,0.5\n1,1.2,\n")
    (run / name).write_bytes(content)
    line = one_line(capsys, ["report", run], f"{name} in {run} is damaged")
    assert not (run / "report.html").exists(), line


def test_good_run_files_make_a_report(tmp_path):
    """The checked readers accept what a run writes (empty cells included)."""
    from distillery.run.files import read_metrics
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("it,loss,val_acc\n0,1.5,0.5\n1,1.2,\n")
    assert read_metrics(run) == [{"it": 0.0, "loss": 1.5, "val_acc": 0.5}, {"it": 1.0, "loss": 1.2}]
    assert main(["report", str(run)]) == 0 and (run / "report.html").is_file()


def test_a_finished_run_leaves_no_lock_and_no_pending(tmp_path):
    """run-leftovers: with background evaluations (2 threads), a finished run leaves neither `pending/` nor `.lock`,
    and the directory can be locked again at once."""
    from distillery.data import load_dataset
    from distillery.run.config import LoopConfig
    from distillery.run.loop import run_distillation
    from distillery.run.resume import prepare_run_dir
    ds = load_dataset("digits")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loop = LoopConfig(iterations=4, eval_every=2, eval_runs=1, eval_epochs=2, final_eval_runs=1)
        prepare_run_dir(tmp_path / "run", {"method": "test"}, resume=False)
        run_distillation(Drifts(ds), ds, tmp_path / "run", loop, progress=False)
    finally:
        torch.set_num_threads(before)
    assert not (tmp_path / "run" / "pending").exists() and not (tmp_path / "run" / ".lock").exists()
    prepare_run_dir(tmp_path / "run", {"method": "test"}, resume=True)  # not "in use"


def test_progress_bar_shows_the_latest_validation_accuracy():
    """progress-val: a finished background evaluation shows in the bar before the loop records it."""
    import time
    from types import SimpleNamespace
    from distillery.evaluation.background import BackgroundEval
    from distillery.run.loop import LoopState
    bg = BackgroundEval()
    try:
        bg.start(lambda: (4, None, SimpleNamespace(mean=0.931)))
        run = SimpleNamespace(background=bg, has_val=True, val=0.733)
        while bg.peek() is None:
            time.sleep(0.01)
        assert LoopState.latest_val(run) == 0.931
        bg.result()
        assert LoopState.latest_val(run) == 0.733
        assert LoopState.latest_val(SimpleNamespace(background=None, has_val=True, val=-1.0)) is None
    finally:
        bg.close()


def test_a_set_on_a_moved_image_folder_is_evaluated_with_its_new_path(tmp_path, capsys, monkeypatch):
    """set-folder-moved: a set distilled on imagefolder:X whose folder moved: without --dataset the message says to
    pass the new path; --dataset imagefolder:NEW with the same classes and size evaluates it; other classes do not."""
    from distillery.data import load_dataset
    from distillery.sets.synset import SyntheticSet, preprocess_record
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    old = _image_folder(tmp_path / "old")
    ds = load_dataset(f"imagefolder:{old}")
    x, y = ds.random_set(1, torch.Generator().manual_seed(0))
    SyntheticSet(x, y, preprocess=preprocess_record(ds.preprocess),
                 meta={"dataset": ds.spec.name, "num_classes": 2, "class_names": list(ds.spec.class_names),
                       "method": "random", "model": "ConvNetD1"}).save(tmp_path / "set.safetensors")
    new = tmp_path / "new"
    old.rename(new)
    argv = ["evaluate", tmp_path / "set.safetensors", "--runs", "1", "--eval-epochs", "1", "--no-progress"]
    one_line(capsys, argv, "--dataset imagefolder:NEW_PATH")
    assert main([str(a) for a in [*argv, "--dataset", f"imagefolder:{new}"]]) == 0
    capsys.readouterr()
    (new / "train" / "dog").rename(new / "train" / "wolf")
    (new / "test" / "dog").rename(new / "test" / "wolf")
    one_line(capsys, [*argv, "--dataset", f"imagefolder:{new}"], "does not hold the images")


@pytest.fixture(scope="module")
def mtt_run(tmp_path_factory, digits_store):
    """(argv, run dir) of a finished 2-iteration MTT run on digits (tests copy the directory before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    argv = ["distill", "--method", "mtt", "--dataset", "digits", "--ipc", "1", "--model", "ConvNetD1",
            "--experts", digits_store, "--out", out, "--syn-steps", "2", "--max-start-epoch", "1",
            "--expert-epochs", "1", "--iterations", "2", "--eval-every", "100", "--eval-runs", "1",
            "--eval-epochs", "1", "--final-eval-runs", "1", "--checkpoint-every", "1", "--no-progress",
            "--threads", "1"]
    assert main([str(a) for a in argv]) == 0
    return argv, out


def _copy_run(mtt_run, tmp_path):
    """A private copy of the finished run, and the argv that resumes it to iteration 3."""
    argv, src = mtt_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    argv = [out if a == src else a for a in argv]
    argv[argv.index("--iterations") + 1] = "3"
    return [*argv, "--resume"], out


def test_resume_of_a_crafted_checkpoint_runs_nothing(tmp_path, capsys, mtt_run):
    """checkpoint-crafted, through the CLI: `--resume` of a checkpoint holding a pickled payload stops with one line
    and the payload never runs."""
    argv, out = _copy_run(mtt_run, tmp_path)
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({**STATE, "method": Payload(marker)}, buf)
    (out / CHECKPOINT).write_bytes(buf.getvalue())
    capsys.readouterr()
    one_line(capsys, argv, "is damaged")
    assert not marker.exists()


def test_resume_without_the_best_set_stops_at_once(tmp_path, capsys, mtt_run):
    """run-best-missing: --resume of a run whose best.safetensors was deleted stops before any work, saying what to
    do, instead of failing at the very end without result.json."""
    argv, out = _copy_run(mtt_run, tmp_path)
    capsys.readouterr()
    (out / "best.safetensors").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    one_line(capsys, argv, "best.safetensors")
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before
