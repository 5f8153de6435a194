"""The SPEC §7 evaluation protocol: schedule, statistics, determinism, baselines."""

import numpy as np
import pytest
import torch

from distillery.evaluation import dsa as evaluate
from distillery.data import load_dataset
from distillery.evaluation.dsa import EvalResult, evaluate_set, random_real_baseline, train_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_population_std():
    r = EvalResult([0.5, 0.7, 0.9], "ConvNet", 10, 0.01, "test")
    assert r.mean == pytest.approx(0.7) and r.std == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=0))


def test_schedule_passes_and_decay(monkeypatch, digits):
    """E+1 passes; the optimiser is rebuilt with lr/10 after pass E//2+1 (SPEC §7.1, P12)."""
    made, steps = [], []
    real_sgd = torch.optim.SGD

    class SpySGD(real_sgd):
        def __init__(self, params, lr, **kw):
            made.append((lr, kw))
            super().__init__(params, lr=lr, **kw)

        def step(self, closure=None):
            steps.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(evaluate.torch.optim, "SGD", SpySGD)
    x, y = digits.train.x[:20], digits.train.y[:20]
    epochs = 6
    train_model("ConvNetD2", x, y, 1, 10, epochs=epochs, lr=0.1, batch=10, strategy="none")
    assert [m[0] for m in made] == [0.1, pytest.approx(0.01)]
    assert all(m[1] == {"momentum": 0.9, "weight_decay": 5e-4} for m in made)
    per_epoch = 2
    assert len(steps) == (epochs + 1) * per_epoch
    n_high = (epochs // 2 + 2) * per_epoch  # passes 0 .. E//2+1 use the full lr
    assert steps[:n_high] == [0.1] * n_high and all(s == pytest.approx(0.01) for s in steps[n_high:])


def test_deterministic_and_seed_dependent(digits):
    x, y = digits.random_set(2, torch.Generator().manual_seed(0))
    a = evaluate_set(x, y, digits, runs=2, epochs=5, seed=3, progress=False)
    b = evaluate_set(x, y, digits, runs=2, epochs=5, seed=3, progress=False)
    c = evaluate_set(x, y, digits, runs=2, epochs=5, seed=4, progress=False)
    assert a.accs == b.accs and a.accs != c.accs


def test_soft_labels_train(digits):
    x, y = digits.random_set(5, torch.Generator().manual_seed(0))
    soft = torch.nn.functional.one_hot(y, 10).float() * 0.9 + 0.01
    res = evaluate_set(x, soft, digits, runs=1, epochs=30, progress=False)
    assert res.mean > 0.3  # chance is 0.1


def test_random_baseline_beats_chance_on_val(digits):
    res = random_real_baseline(digits, ipc=5, runs=2, epochs=50, split="val", progress=False)
    assert res.split == "val" and len(res.accs) == 2 and res.mean > 0.5
