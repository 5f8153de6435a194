"""The shared evaluation protocol (SPEC §7): train fresh networks on a (distilled) set, test on real data.

Per run: a fresh randomly initialised network, SGD (momentum 0.9, weight decay 5e-4), minibatches of 256, DSA on
every batch (non-siamese), `epochs + 1` passes over the set with the learning rate divided by 10 after pass
`epochs // 2 + 1` (the reference code's off-by-one, SPEC P12), then one test pass. We report mean ± population std
over runs. Every random draw (init, order, augmentation, random-real sets) comes from the seed, so a number can be
reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .augment import Augment
from .errors import UserError
from .models import init_seeded


@dataclass
class EvalResult:
    """Accuracies (fractions) of independently trained networks, with their mean and population std."""

    accs: list[float]
    model: str
    epochs: int
    lr: float
    split: str

    @property
    def mean(self) -> float:
        return float(np.mean(self.accs))

    @property
    def std(self) -> float:
        return float(np.std(self.accs))  # ddof=0, as the reference code reports it

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f} % ({len(self.accs)} runs, {self.split} split)"


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    """Top-1 accuracy of `model` on (x, y), in eval mode, without augmentation."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    model.train(was_training)
    return correct / max(1, len(x))


def train_model(model_name: str, x: torch.Tensor, y: torch.Tensor, channels: int, num_classes: int,
                epochs: int, lr: float, batch: int = 256, strategy: str = "none", seed: int = 0,
                progress: tqdm | None = None) -> nn.Module:
    """Train a fresh `model_name` on (x, y) with the SPEC §7 recipe and return it (on x's device).

    `y` may be class ids (int64) or per-image probability/weight vectors (soft or learned labels).
    """
    device = x.device
    model = init_seeded(model_name, channels, num_classes, tuple(x.shape[2:]), seed).to(device)
    model.train()
    gen = torch.Generator(device=device).manual_seed(seed)
    augment = Augment(strategy)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    decay_after = epochs // 2 + 1
    for ep in range(epochs + 1):
        order = torch.randperm(len(x), generator=gen, device=device)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            xb = augment(x[idx], gen)
            loss = F.cross_entropy(model(xb), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if not torch.isfinite(loss):
            raise UserError(f"evaluation training diverged (loss {loss.item()}) at epoch {ep} with lr {lr:g}; "
                            "evaluate with a smaller --lr")
        if ep == decay_after:  # the reference code rebuilds the optimiser, so momentum restarts
            optimizer = torch.optim.SGD(model.parameters(), lr=lr * 0.1, momentum=0.9, weight_decay=5e-4)
        if progress is not None:
            progress.update(1)
    return model


def evaluate_set(x: torch.Tensor, y: torch.Tensor, dataset, model: str | None = None, runs: int = 5,
                 epochs: int = 300, lr: float = 0.01, batch: int = 256, strategy: str | None = None,
                 seed: int = 0, split: str = "test", progress: bool = True) -> EvalResult:
    """Train `runs` fresh networks on (x, y) and test each on `dataset`'s `split` ("val" or "test").

    Select anything (checkpoints, hyperparameters) on "val"; report "test" once.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    spec = dataset.spec
    model = model or spec.default_model
    strategy = spec.dsa_strategy if strategy is None else strategy
    target = dataset.val if split == "val" else dataset.test
    device = target.x.device
    x, y = x.to(device), y.to(device)
    accs = []
    bar = tqdm(total=runs * (epochs + 1), desc=f"eval {model}", unit="ep", leave=False, disable=not progress)
    for r in range(runs):
        net = train_model(model, x, y, spec.channels, spec.num_classes, epochs, lr, batch, strategy,
                          seed=seed * 1000 + r, progress=bar)
        accs.append(accuracy(net, target.x, target.y))
    bar.close()
    return EvalResult(accs, model, epochs, lr, split)


def random_real_baseline(dataset, ipc: int, runs: int = 5, model: str | None = None, epochs: int = 300,
                         lr: float = 0.01, seed: int = 0, split: str = "test", progress: bool = True) -> EvalResult:
    """Random real images (`ipc` per class, a fresh draw per run) evaluated with the same protocol."""
    accs = []
    for r in range(runs):
        gen = torch.Generator(device=dataset.train.x.device).manual_seed(seed * 1000 + r)
        x, y = dataset.random_set(ipc, gen)
        res = evaluate_set(x, y, dataset, model, runs=1, epochs=epochs, lr=lr, seed=seed * 1000 + r,
                           split=split, progress=progress)
        accs.extend(res.accs)
    return EvalResult(accs, res.model, epochs, lr, split)


def full_data_baseline(dataset, runs: int = 1, model: str | None = None, epochs: int = 50, lr: float = 0.01,
                       seed: int = 0, split: str = "test", progress: bool = True) -> EvalResult:
    """Train on the whole training split (minus the held-out validation part) with the same recipe."""
    return evaluate_set(dataset.train.x, dataset.train.y, dataset, model, runs=runs, epochs=epochs, lr=lr,
                        seed=seed, split=split, progress=progress)
