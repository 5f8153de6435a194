"""The shared run loop stops on NaN/inf and never writes a bad set or checkpoint."""

import pytest
import torch

from distillery.run.checkpoint import CHECKPOINT, read_checkpoint
from distillery.data import load_dataset
from distillery.methods import Method
from distillery.errors import Diverged
from distillery.run.config import LoopConfig
from distillery.run.loop import run_distillation
from distillery.sets.synset import SyntheticSet


class BreaksAt(Method):
    """A stand-in method whose images turn NaN at step `bad` while its logged loss stays finite."""

    def __init__(self, ds, bad: int):
        self.x, self.y = ds.random_set(1, torch.Generator().manual_seed(0))
        self.bad = bad

    def step(self, it):
        if it == self.bad:
            self.x = self.x * float("nan")
        return {"loss": 1.0}

    def synset(self):
        return SyntheticSet(self.x.clone(), self.y.clone(), meta={"num_classes": 10})

    def state_dict(self):
        return {"x": self.x.clone()}

    def load_state_dict(self, state):
        self.x = state["x"]


def test_nan_images_stop_the_run_and_the_checkpoint_stays_good(tmp_path):
    ds = load_dataset("digits")
    loop = LoopConfig(iterations=20, eval_every=100, eval_runs=1, eval_epochs=1, checkpoint_every=2)
    with pytest.raises(Diverged, match="synthetic images"):
        run_distillation(BreaksAt(ds, bad=4), ds, tmp_path, loop, progress=False)
    ckpt = read_checkpoint(tmp_path / CHECKPOINT)
    assert ckpt["it"] == 4 and torch.isfinite(ckpt["method"]["x"]).all()


@pytest.mark.parametrize("last_it", [4, 8])
def test_final_report_measures_the_best_set_once_when_it_is_the_last(tmp_path, monkeypatch, last_it):
    """best = last (same iteration): one measurement reported for both; otherwise each is measured."""
    import distillery.run.final as run
    ds = load_dataset("digits")
    x, y = ds.random_set(1, torch.Generator().manual_seed(0))
    SyntheticSet(x, y, meta={"num_classes": 10, "iteration": 4}).save(tmp_path / "best.safetensors")
    SyntheticSet(x, y, meta={"num_classes": 10, "iteration": last_it}).save(tmp_path / "last.safetensors")
    calls = []
    real = run.evaluate_synset

    def counting(*args, **kwargs):
        calls.append(kwargs["split"])
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "evaluate_synset", counting)
    out = run.final_report(ds, tmp_path, LoopConfig(eval_epochs=2, final_eval_runs=2, eval_model="ConvNetD2"))
    assert len(calls) == (1 if last_it == 4 else 2) and set(calls) == {"test"}
    assert out["last"]["iteration"] == last_it and out["best"]["iteration"] == 4
    assert out["last"]["test_accs"] == out["best"]["test_accs"]  # same images, same seeds: same numbers either way


class Ticks(Method):
    """A stand-in method each of whose steps advances the loop's clock by one second (no real waiting)."""

    def __init__(self, ds, clock):
        self.x, self.y = ds.random_set(1, torch.Generator().manual_seed(0))
        self.clock = clock

    def step(self, it):
        self.clock[0] += 1.0
        return {"loss": 1.0}

    def synset(self):
        return SyntheticSet(self.x.clone(), self.y.clone(), meta={"num_classes": 10, "model": "ConvNetD2"})

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_time_budget_ends_the_run_evaluated_and_a_resume_counts_the_time_spent(tmp_path, monkeypatch):
    """--time-budget 3.5 with 1 s steps: iterations 0..3 run, iteration 4 is the last (evaluated, best/last written,
    reported); a resume with a larger budget continues from the step time already spent, not from zero."""
    import distillery.run.loop as run
    clock = [0.0]
    monkeypatch.setattr(run.time, "time", lambda: clock[0])
    ds = load_dataset("digits")
    loop = LoopConfig(iterations=100, eval_every=50, eval_runs=1, eval_epochs=1, final_eval_runs=1,
                      checkpoint_every=2, time_budget=3.5, eval_overlap="off")
    out = run_distillation(Ticks(ds, clock), ds, tmp_path, loop, progress=False)
    assert out["iterations_reached"] == 4 and out["best"]["iteration"] in (0, 4)
    assert SyntheticSet.load(tmp_path / "last.safetensors").meta["iteration"] == 4
    assert out["step_seconds"] == pytest.approx(4.0)
    loop.time_budget = 6.5
    out = run_distillation(Ticks(ds, clock), ds, tmp_path, loop, resume=True, progress=False)
    assert out["iterations_reached"] == 7  # 4 s spent before, 3 more steps: 7 s >= 6.5
    out = run_distillation(Ticks(ds, clock), ds, tmp_path, loop, resume=True, progress=False)
    assert out["iterations_reached"] == 7  # the budget is spent: a resume evaluates and reports, no further step
