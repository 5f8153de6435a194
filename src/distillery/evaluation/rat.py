"""RaT-BPTT's own evaluation protocol (`rat`): the published `framework/base.py` `test()` (SPEC §6.6).

Per run: a fresh network of the evaluation model, the *inner* optimiser of the distillation (torch.optim.Adam at
1e-3 in the published rows, or SGD momentum 0.9 / weight decay 5e-4), one `subsample` mini-batch per step (the same
batch rule as the inner loop: all or `task_sampler_nc` classes, `batch_per_class` images each), the synthetic
augmentation (`flip_rotate`) on every batch, labels used as given (learned labels are CE probability targets),
trained for cumulative 300, 600, 1000 and 3000 steps with an accuracy measurement after each count.

The published code keeps the count with the best mean TEST accuracy over its networks (SPEC P4). We choose the
count on the VALIDATION split (mean over the runs), then report the test accuracy of every run at that count. With
no validation split (`--val-fraction 0`) there is nothing to choose on: the longest count is reported.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..augment import Augment
from ..errors import UserError
from ..methods.bptt import sample_batch
from ..models import init_seeded
from .dsa import EvalResult, accuracy
from .parallel import map_runs
from .protocol import EvalProtocol, Scoring


def make_optimizer(params, proto: EvalProtocol) -> torch.optim.Optimizer:
    """base.py / distill_higher.py `init_train`: Adam(lr) or SGD(lr, momentum 0.9, weight decay 5e-4)."""
    if proto.optimizer == "adam":
        return torch.optim.Adam(params, lr=proto.lr)
    return torch.optim.SGD(params, lr=proto.lr, momentum=0.9, weight_decay=5e-4)  # the protocol checked the name


def train_rat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, proto: EvalProtocol,
              generator: torch.Generator, on_count: Callable[[int, nn.Module], None] | None = None,
              tick: Callable[[], None] | None = None) -> torch.optim.Optimizer:
    """Train `model` in place for max(proto.steps) steps of the published test() loop; call `on_count(steps, model)`
    after each cumulative count. Draws from `generator`, per step: the batch indices, then its augmentation."""
    ipc = len(x) // num_classes
    nc = proto.classes_per_batch or num_classes
    bpc = proto.batch_per_class or ipc
    augment = Augment.rat(proto.augment)
    augment = augment if augment.tokens else None  # no augmentation draws no random numbers
    optimizer = make_optimizer(model.parameters(), proto)
    model.train()
    done = 0
    for count in proto.steps:
        for _ in range(count - done):
            if tick is not None:  # before every step: a background evaluation's cancellation check
                tick()
            idx = sample_batch(num_classes, ipc, nc, bpc, generator)
            xb = x[idx] if augment is None else augment(x[idx], generator)
            loss = F.cross_entropy(model(xb), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if not torch.isfinite(loss):
            raise UserError(f"rat evaluation training diverged (loss {loss.item()}) by step {count} with "
                            f"{proto.optimizer} lr {proto.lr:g}; evaluate with --protocol dsa or a smaller --lr")
        done = count
        if on_count is not None:
            on_count(count, model)
    return optimizer


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    """Mean cross-entropy of `model` on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    total = sum(float(F.cross_entropy(model(x[i:i + batch]), y[i:i + batch], reduction="sum"))
                for i in range(0, len(x), batch))
    model.train(was_training)
    return total / max(1, len(x))


def score(x: torch.Tensor, y: torch.Tensor, dataset, proto: EvalProtocol, how: Scoring) -> EvalResult:
    """The rat protocol object's scoring: `proto.runs` networks trained with the published test() loop, the step
    count chosen on the validation split (single process; no captured graphs)."""
    model, runs, seed, split = proto.model, proto.runs, proto.seed, how.split
    spec = dataset.spec
    device = dataset.test.x.device
    x, y = x.to(device), y.to(device)
    has_val = len(dataset.val.y) > 0
    target = dataset.val if split == "val" else dataset.test
    bar = tqdm(total=runs * max(proto.steps), desc=f"eval {model} (rat)", unit="step", leave=False,
               disable=not how.progress)

    def one(r: int) -> tuple[dict[int, float], dict[int, float], float | None]:
        """Run r: val and target accuracy after each step count (and the train loss, on request)."""
        net = init_seeded(model, spec.channels, spec.num_classes, tuple(x.shape[2:]), seed * 1000 + r).to(device)
        gen = torch.Generator(device=device).manual_seed(seed * 1000 + r)
        val, tgt, last = {}, {}, [0]

        def measure(count: int, net: nn.Module) -> None:
            if has_val:
                val[count] = accuracy(net, dataset.val.x, dataset.val.y)
            tgt[count] = val[count] if split == "val" and has_val else accuracy(net, target.x, target.y)
            bar.update(count - last[0])
            last[0] = count

        train_rat(net, x, y, spec.num_classes, proto, gen, measure, how.tick)
        return val, tgt, mean_loss(net, dataset.train.x, dataset.train.y) if how.train_loss else None

    per_run = map_runs(one, range(runs), device)  # side by side on the CPU, one thread each
    bar.close()
    val_accs = {c: [v[c] for v, _, _ in per_run if c in v] for c in proto.steps}
    target_accs = {c: [t[c] for _, t, _ in per_run] for c in proto.steps}
    losses = [loss for _, _, loss in per_run if loss is not None]
    if has_val:  # ties go to the shorter count, as list.index(max(...)) in base.py
        means = [float(np.mean(val_accs[c])) for c in proto.steps]
        chosen = proto.steps[means.index(max(means))]
    else:
        chosen = proto.steps[-1]
    return EvalResult(target_accs[chosen], model, chosen, proto.lr, split, protocol="rat", steps=chosen,
                      val_by_steps={c: float(np.mean(val_accs[c])) for c in proto.steps} if has_val else None,
                      train_loss=float(np.mean(losses)) if losses else None)
