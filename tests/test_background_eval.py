"""Validation evaluations in the background (--eval-overlap auto) change no number, and a kill loses nothing."""

import json
import threading
import time

import pytest
import torch

from distillery.data import load_dataset
from distillery.methods import Method
from distillery.run import loop as run_module
from distillery.run.checkpoint import CHECKPOINT, read_checkpoint
from distillery.run.config import LoopConfig
from distillery.run.loop import run_distillation
from distillery.sets.synset import SyntheticSet


class Drifts(Method):
    """A stand-in method: the set moves by a draw keyed by the iteration (exact on resume); stops at `kill`."""

    def __init__(self, ds, kill: int | None = None):
        self.x, self.y = ds.random_set(1, torch.Generator().manual_seed(0))
        self.kill = kill

    def step(self, it):
        if it == self.kill:
            raise KeyboardInterrupt
        self.x = self.x + 0.3 * torch.randn(self.x.shape, generator=torch.Generator().manual_seed(it))
        return {"loss": float(self.x.abs().mean())}

    def synset(self):
        return SyntheticSet(self.x.clone(), self.y.clone(), meta={"num_classes": 10, "model": "ConvNetD1"})

    def state_dict(self):
        return {"x": self.x.clone()}

    def load_state_dict(self, state):
        self.x = state["x"].clone()


LOOP = dict(iterations=12, eval_every=4, eval_runs=2, eval_epochs=4, final_eval_runs=2, checkpoint_every=1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _outcome(run_dir):
    result = json.loads((run_dir / "result.json").read_text())
    rows = [(r["it"], r.get("val_acc")) for r in read_checkpoint(run_dir / CHECKPOINT)["rows"]]
    return rows, result["best"]["iteration"], result["best"]["test_accs"], result["last"]["test_accs"]


def _eval_threads(monkeypatch, delay=0.0):
    """Record the thread each validation evaluation runs in (optionally slowed down, to be caught pending)."""
    names, real = [], run_module.evaluate_synset

    def spy(*args, **kwargs):
        if kwargs.get("split") == "val":
            names.append(threading.current_thread().name)
            time.sleep(delay)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate_synset", spy)
    return names


def test_background_evaluation_equals_waiting_for_each(digits, tmp_path, threads, monkeypatch):
    threads(1)  # off, one thread: evaluation and steps single-threaded, one after the other
    run_distillation(Drifts(digits), digits, tmp_path / "off", LoopConfig(**LOOP, eval_overlap="off"), progress=False)
    threads(2)  # auto, two threads: one for the steps, one for the evaluation in the background
    names = _eval_threads(monkeypatch)
    run_distillation(Drifts(digits), digits, tmp_path / "auto", LoopConfig(**LOOP), progress=False)
    assert names == ["distillery-eval"] * 3 + ["MainThread"]  # the last one has nothing to overlap: in place
    assert torch.get_num_threads() == 2  # given back
    off, auto = _outcome(tmp_path / "off"), _outcome(tmp_path / "auto")
    assert auto == off
    assert sum(v is not None for _, v in off[0]) == 4  # evaluations at 0, 4, 8, 12 all recorded
    assert not any((tmp_path / "auto" / "pending").glob("*"))


def test_a_kill_while_an_evaluation_runs_in_the_background_loses_nothing(digits, tmp_path, threads, monkeypatch):
    threads(2)
    run_distillation(Drifts(digits), digits, tmp_path / "whole", LoopConfig(**LOOP), progress=False)
    _eval_threads(monkeypatch, delay=1.0)  # the evaluation of iteration 4 is still running at iteration 6
    with pytest.raises(KeyboardInterrupt):
        run_distillation(Drifts(digits, kill=6), digits, tmp_path / "cut", LoopConfig(**LOOP), progress=False)
    assert not any(t.name == "distillery-eval" for t in threading.enumerate())  # cancelled and joined, not left
    ckpt = read_checkpoint(tmp_path / "cut" / CHECKPOINT)
    assert ckpt["it"] == 6 and ckpt["pending_eval"] == 4
    assert (tmp_path / "cut" / "pending" / "it_000004.safetensors").is_file()
    monkeypatch.undo()
    run_distillation(Drifts(digits), digits, tmp_path / "cut", LoopConfig(**LOOP), resume=True, progress=False)
    assert _outcome(tmp_path / "cut") == _outcome(tmp_path / "whole")


def test_close_ends_an_evaluation_through_the_tick_it_hands_out():
    """The training loops know no threads: the evaluation ends because it calls `check` (its `tick`) each epoch."""
    from distillery.evaluation.background import BackgroundEval

    bg, ticks = BackgroundEval(), []

    def evaluation():
        while True:  # an evaluation that would never end on its own
            bg.check()
            ticks.append(1)
            time.sleep(0.005)

    bg.start(evaluation)
    while not ticks:
        time.sleep(0.005)
    bg.close()  # cancels and joins
    assert not bg.busy and not any(t.name == "distillery-eval" for t in threading.enumerate())
    bg.check()  # cleared: a later evaluation runs on
