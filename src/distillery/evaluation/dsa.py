"""The shared evaluation protocol (SPEC §7): train fresh networks on a (distilled) set, test on real data.

Per run: a fresh randomly initialised network, SGD (momentum 0.9, weight decay 5e-4), minibatches of 256, DSA on
every batch (non-siamese), `epochs + 1` passes over the set with the learning rate divided by 10 after pass
`epochs // 2 + 1` (the reference code's off-by-one, SPEC P12), then one test pass. We report mean ± population std
over runs. Every random draw (init, order, augmentation, random-real sets) comes from the seed, so a number can be
reproduced exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..augment import Augment
from ..distributed import all_reduce_sum_, rank_and_world
from ..errors import TrainingDiverged
from ..models import FunctionalModel, init_seeded
from ..config.validate import check_cuda
from .parallel import map_runs
from .protocol import DEFAULT_EVAL_EPOCHS, EvalProtocol, Scoring
from .training import MOMENTUM, WEIGHT_DECAY, capturable, sgd_schedule, train_captured


@dataclass
class EvalResult:
    """Accuracies (fractions) of independently trained networks, with their mean and population std."""

    accs: list[float]
    model: str
    epochs: int
    lr: float
    split: str
    protocol: str = "dsa"                      # dsa (MTT/TESLA evaluate_synset) | rat (RaT-BPTT test())
    steps: int | None = None                   # rat: the step count chosen on validation
    val_by_steps: dict[int, float] | None = None  # rat: mean validation accuracy per step count
    train_loss: float | None = None            # rat, on request: mean CE on the real train split (cctype 1 signal)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accs))

    @property
    def std(self) -> float:
        return float(np.std(self.accs))  # ddof=0, as the reference code reports it

    def __str__(self) -> str:
        how = f"rat protocol, {self.steps} steps" if self.protocol == "rat" else "dsa protocol"
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f} % ({len(self.accs)} runs, {self.split} split, {how})"


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    """Top-1 accuracy of `model` on (x, y), in eval mode, without augmentation."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()
    model.train(was_training)
    return int(correct) / max(1, len(x))  # one host read


def train_model(model_name: str, x: torch.Tensor, y: torch.Tensor, channels: int, num_classes: int,
                epochs: int, lr: float, batch: int = 256, strategy: str = "none", seed: int = 0,
                progress: tqdm | None = None, tick: Callable[[], None] | None = None) -> nn.Module:
    """Train a fresh `model_name` on (x, y) with the SPEC §7 recipe and return it (on x's device).

    `y` may be class ids (int64) or per-image probability/weight vectors (soft or learned labels). `tick()` is
    called before every epoch (a background evaluation's cancellation check).
    """
    device = x.device
    model = init_seeded(model_name, channels, num_classes, tuple(x.shape[2:]), seed).to(device=device, dtype=x.dtype)
    model.train()
    gen = torch.Generator(device=device).manual_seed(seed)
    augment = Augment(strategy)
    opt = [torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)]

    def epoch(rate: float) -> torch.Tensor:  # the optimiser holds the rate
        order = torch.randperm(len(x), generator=gen, device=device)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            xb = augment(x[idx], gen)
            loss = F.cross_entropy(model(xb), y[idx])
            opt[0].zero_grad(set_to_none=True)
            loss.backward()
            opt[0].step()
        return loss.detach()  # the last minibatch's

    def restart(rate: float) -> None:
        opt[0] = torch.optim.SGD(model.parameters(), lr=rate, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    try:
        sgd_schedule(epochs, lr, epoch, restart, None if progress is None else lambda: progress.update(1), tick)
    except FloatingPointError as err:
        raise TrainingDiverged(f"evaluation training diverged ({err}) with lr {lr:g}; evaluate with a smaller --lr") from None
    return model


def train_runs(model_name: str, x: torch.Tensor, y: torch.Tensor, channels: int, num_classes: int, epochs: int,
               lr: float, batch: int, strategy: str, seeds: list[int], progress: tqdm | None = None,
               fast: bool = False, tick: Callable[[], None] | None = None) -> list[nn.Module]:
    """`train_model` for each seed, side by side on the CPU (`parallel.map_runs`). `fast` (CUDA): from captured CUDA
    graphs (`training.train_captured`), for models without BatchNorm statistics; the others train as usual."""
    if fast:
        check_cuda("--eval-fast", x.device)
    template = init_seeded(model_name, channels, num_classes, tuple(x.shape[2:]), 0).to(device=x.device, dtype=x.dtype)
    if not (fast and capturable(template)):  # on the CPU: several runs at once, 1 thread each
        return map_runs(lambda s: train_model(model_name, x, y, channels, num_classes, epochs, lr, batch, strategy, s,
                                              progress, tick), seeds, x.device)
    fm = FunctionalModel(template)

    def run(s: int) -> torch.Tensor:
        init = fm.flatten(init_seeded(model_name, channels, num_classes, tuple(x.shape[2:]), s)).detach().to(x.device)
        gen = torch.Generator(device=x.device).manual_seed(s)
        on_epoch = None if progress is None else lambda: progress.update(1)
        try:
            return train_captured(template, init, x, y, epochs, lr, batch, Augment(strategy), gen, on_epoch, tick=tick)
        except FloatingPointError as err:
            raise TrainingDiverged(f"evaluation training diverged ({err}) with lr {lr:g}; "
                                   "evaluate with a smaller --lr") from None

    flats = [run(s) for s in seeds]
    return [fm.load_into(f, copy.deepcopy(template)) for f in flats]


def evaluate_set(x: torch.Tensor, y: torch.Tensor, dataset, model: str | None = None, runs: int = 5,
                 epochs: int = DEFAULT_EVAL_EPOCHS, lr: float = 0.01, batch: int = 256, strategy: str | None = None,
                 seed: int = 0, split: str = "test", progress: bool = True,
                 distributed: bool = False, fast: bool = False,
                 tick: Callable[[], None] | None = None) -> EvalResult:
    """Train `runs` fresh networks on (x, y) with the dsa protocol (MTT/TESLA's evaluate_synset, SPEC §7) and test
    each on `dataset`'s `split` ("val" or "test"). `strategy`: the DSA strategy (default the dataset's).

    `fast` (CUDA only): train from captured CUDA graphs (`train_runs`), equal up to float rounding. Select anything
    (checkpoints, hyperparameters) on "val"; report "test" once.

    `distributed=True` (torchrun; every rank must call it): rank r trains runs r, r + G, ... with the seeds those
    runs have in one process, and every rank gets all the accuracies, so the result equals a single-process
    evaluation. `tick()`: called before every epoch of every run (a background evaluation's cancellation check).
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    spec = dataset.spec
    model = model or spec.default_model
    strategy = spec.dsa_strategy if strategy is None else strategy
    target = dataset.val if split == "val" else dataset.test
    device = target.x.device
    x, y = x.to(device), y.to(device)
    rank, world = rank_and_world() if distributed else (0, 1)
    mine = range(rank, runs, world)
    accs = [0.0] * runs
    bar = tqdm(total=len(mine) * (epochs + 1), desc=f"eval {model}", unit="ep", leave=False,
               disable=not (progress and rank == 0))
    nets = train_runs(model, x, y, spec.channels, spec.num_classes, epochs, lr, batch, strategy,
                      [seed * 1000 + r for r in mine], bar, fast, tick)
    for r, net in zip(mine, nets):
        accs[r] = accuracy(net, target.x, target.y)
    bar.close()
    if distributed:  # each run's accuracy is on one rank, zeros elsewhere: the sum is exact
        accs = all_reduce_sum_(torch.tensor(accs, dtype=torch.float64, device=device)).tolist()
    return EvalResult(accs, model, epochs, lr, split)


def score(x: torch.Tensor, y: torch.Tensor, dataset, proto: EvalProtocol, how: Scoring) -> EvalResult:
    """The dsa protocol object's scoring: `evaluate_set` with every setting of `proto`."""
    return evaluate_set(x, y, dataset, proto.model, runs=proto.runs, epochs=proto.epochs, lr=proto.lr,
                        batch=proto.batch, strategy=proto.augment, seed=proto.seed, split=how.split,
                        progress=how.progress, distributed=how.distributed, fast=how.fast, tick=how.tick)


def random_real_runs(dataset, ipc: int, runs: int, seed: int, evaluate: Callable[[torch.Tensor, torch.Tensor, int],
                     EvalResult], progress: bool = True) -> list[EvalResult]:
    """Run r: a fresh draw of `ipc` real images per class from seed·1000 + r, scored by `evaluate(x, y, seed·1000 + r)`
    (one network); the runs go side by side on the CPU (`parallel.map_runs`)."""
    device = dataset.train.x.device
    bar = tqdm(total=runs, desc="random real", unit="run", leave=False, disable=not progress)

    def one(r: int) -> EvalResult:
        gen = torch.Generator(device=device).manual_seed(seed * 1000 + r)
        x, y = dataset.random_set(ipc, gen)
        res = evaluate(x, y, seed * 1000 + r)
        bar.update(1)
        return res

    results = map_runs(one, range(runs), device)
    bar.close()
    return results


def random_real_baseline(dataset, ipc: int, runs: int = 5, model: str | None = None, epochs: int = DEFAULT_EVAL_EPOCHS,
                         lr: float = 0.01, seed: int = 0, split: str = "test", progress: bool = True,
                         fast: bool = False) -> EvalResult:
    """Random real images (`ipc` per class, a fresh draw per run) evaluated with the same protocol."""
    results = random_real_runs(dataset, ipc, runs, seed, lambda x, y, s: evaluate_set(
        x, y, dataset, model, runs=1, epochs=epochs, lr=lr, seed=s, split=split, progress=False, fast=fast), progress)
    return EvalResult([a for res in results for a in res.accs], results[0].model, epochs, lr, split)


def full_data_baseline(dataset, runs: int = 1, model: str | None = None, epochs: int = 50, lr: float = 0.01,
                       seed: int = 0, split: str = "test", progress: bool = True, fast: bool = False) -> EvalResult:
    """Train on the whole training split (minus the held-out validation part) with the same recipe."""
    return evaluate_set(dataset.train.x, dataset.train.y, dataset, model, runs=runs, epochs=epochs, lr=lr,
                        seed=seed, split=split, progress=progress, fast=fast)
