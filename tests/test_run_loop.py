"""The shared run loop stops on NaN/inf and never writes a bad set or checkpoint."""

import pytest
import torch

from distillery.data import load_dataset
from distillery.run import Diverged, LoopConfig, run_distillation
from distillery.synset import SyntheticSet


class BreaksAt:
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
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["it"] == 4 and torch.isfinite(ckpt["method"]["x"]).all()
