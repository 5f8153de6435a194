"""Plain-autograd training for experts and evaluation: one network, or K networks at once as one grouped net.

Why: `torch.func.grad_and_value` runs with grad mode on inside the transform, so GroupNorm takes its
double-differentiable backward; a plain `autograd.grad` uses the fused kernel (the expert epoch cost 1.30x the
published loop with the former). K networks at once use `models.grouped.GroupedConvNet` (one kernel per layer for
all K) instead of `vmap(grad)`. Every network keeps its own generator and draws in the same order as when trained
alone (order, then one DSA draw per minibatch), so the results equal separate training up to float rounding (tested).
`CapturedSGD` replays that training from one captured CUDA graph per batch size (`train_captured` for evaluation,
`--eval-fast on`; experts, `--fast on`): the SGD step with branch-free DSA (`sgd_static`), the weights and momentum
buffers kept as the graph's state.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import PARAM_FIELDS, Augment, AugParams
from ..capture import Captured
from ..models import FunctionalModel
from ..models.grouped import GroupedConvNet, groupable

MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # the evaluation optimiser (SPEC §7): SGD, restarted at the lr decay
CHECK_EVERY = 100  # passes between host reads of the on-device finite flag (a read is a sync on CUDA)
CPU_CHUNK = 32  # images per forward/backward of one CPU training step (plain_step); 16-32 measured fastest
CHUNK_MIN_PIXELS = 3 * 32 * 32  # smaller images fit the cache whole: no chunks (and the same numbers as before)

# step(flats (K, P), images (K, B, C, H, W), labels (K, B)) -> (grads (K, P), losses (K,)): experts.py's Step
Step = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def augment_each(augment: Augment, xs: list[Tensor], gens: list[torch.Generator]) -> Tensor:
    """DSA of batch k with gens[k] (the draws of `augment(xs[k], gens[k])`), applied in one call per distinct token."""
    params = [augment.sample(len(x), g, x.shape[-2:], device=x.device) for x, g in zip(xs, gens)]
    out = torch.empty((len(xs), *xs[0].shape), dtype=xs[0].dtype, device=xs[0].device)
    by_tokens: dict[tuple[str, ...], list[int]] = {}
    for k, p in enumerate(params):
        by_tokens.setdefault(p.tokens, []).append(k)
    for members in by_tokens.values():
        joined = _concat([params[k] for k in members])
        out[members] = augment.apply(torch.cat([xs[k] for k in members]), joined).view(len(members), *xs[0].shape)
    return out


def _concat(params: list[AugParams]) -> AugParams:
    """One AugParams for the concatenated batches of draws that share their tokens."""
    first = params[0]
    fields = {name: torch.cat([getattr(p, name) for p in params]) for name in PARAM_FIELDS
              if getattr(first, name) is not None}
    return AugParams(first.tokens, first.im_size, sum(p.batch for p in params), **fields)


def sgd_schedule(epochs: int, lr: float, epoch: Callable[[float], Tensor], restart: Callable[[float], None],
                 on_epoch: Callable[[], None] | None = None, tick: Callable[[], None] | None = None) -> None:
    """The SPEC §7 schedule every evaluation trainer runs (one network, grouped, captured): `epochs + 1` passes,
    `epoch(rate)` each (it returns the pass's losses, left on the device), the rate lr until pass epochs // 2 + 1
    and lr / 10 after it, where `restart(lr / 10)` restarts the momentum (the reference code rebuilds its optimiser).
    `tick()` before and `on_epoch()` after every pass. FloatingPointError on a non-finite loss, read on the host once
    per 100 passes and after the last."""
    finite: Tensor | None = None  # on the device: no host read until it is checked
    for ep in range(epochs + 1):
        if tick is not None:  # a background evaluation's cancellation check
            tick()
        ok = torch.isfinite(epoch(lr if ep <= epochs // 2 + 1 else lr * 0.1)).all()
        finite = ok if finite is None else finite & ok
        if (ep % CHECK_EVERY == CHECK_EVERY - 1 or ep == epochs) and not finite:
            raise FloatingPointError(f"non-finite training loss by epoch {ep}")
        if ep == epochs // 2 + 1:
            restart(lr * 0.1)
        if on_epoch is not None:
            on_epoch()


def plain_step(fm: FunctionalModel, chunk: int | None = None) -> Step:
    """The gradient step of ONE expert (K = 1) with plain autograd: `autograd.grad` of its loss w.r.t. the flat θ.

    On one CPU thread, for images of 32x32 and larger, the batch runs `chunk` images at a time (default CPU_CHUNK),
    gradients summed: the same gradient (float rounding), but each chunk's activations stay in cache; a whole batch
    of 256 at 32x32 spends ~40 % of its time moving 128 MB activations through memory (benchmarks/cpu_hot_path.py,
    measured at one thread). Elsewhere (CUDA, several threads, small images) the whole batch runs at once."""

    def step(flats: Tensor, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        flat = flats[0].detach().requires_grad_(True)
        x, y = xs[0], ys[0]
        cached = x.device.type == "cpu" and torch.get_num_threads() == 1 and x[0].numel() >= CHUNK_MIN_PIXELS
        size = (chunk or CPU_CHUNK) if cached or chunk else len(x)
        grad, loss = None, None
        for i in range(0, len(x), size):  # the mean loss as a sum of chunk sums / batch, each chunk's graph freed
            part = F.cross_entropy(fm(flat, x[i:i + size]), y[i:i + size], reduction="sum") / len(x)
            (g,) = torch.autograd.grad(part, flat)
            grad, loss = (g, part.detach()) if grad is None else (grad.add_(g), loss.add_(part.detach()))
        return grad[None], loss[None]

    return step


def grouped_step(fm: FunctionalModel, k: int) -> Step:
    """The gradient step of K experts as one GroupedConvNet: grads (K, P) of each expert's own mean loss."""
    net = GroupedConvNet(fm.module, k)

    def step(flats: Tensor, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        params = net.from_flats(flats)
        logits = net(params, xs)
        losses = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="none").view(ys.shape).mean(1)
        grads = torch.autograd.grad(losses.sum(), params)
        return net.to_flats(list(grads)), losses.detach()

    return step


def autograd_step(fm: FunctionalModel, k: int) -> Step | None:
    """The plain-autograd step for k experts at once: plain for k = 1, grouped for a groupable ConvNet; None: vmap."""
    if k == 1:
        return plain_step(fm)
    if groupable(fm.module):
        return grouped_step(fm, k)
    return None


def train_together(template: nn.Module, inits: list[Tensor], x: Tensor, y: Tensor, epochs: int, lr: float,
                   batch: int, augment: Augment, gens: list[torch.Generator],
                   on_epoch: Callable[[], None] | None = None,
                   tick: Callable[[], None] | None = None) -> list[Tensor]:
    """The SPEC §7 evaluation training of R networks at once as one GroupedConvNet; returns R flat vectors.

    Network r starts from inits[r] and draws from gens[r] exactly as `dsa.train_model` does alone (one order
    per epoch, one DSA draw per minibatch): SGD momentum 0.9, weight decay 5e-4, `epochs + 1` passes, lr / 10 with
    a fresh optimizer after pass `epochs // 2 + 1`. Raises FloatingPointError on a non-finite loss (read once per
    100 epochs). `y` may be class ids or per-image probability vectors.
    """
    net = GroupedConvNet(template, len(inits))
    params = net.from_flats(torch.stack(inits).to(x.dtype))
    opt = [torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)]

    def epoch(rate: float) -> Tensor:  # the optimiser holds the rate
        orders = [torch.randperm(len(x), generator=g, device=x.device) for g in gens]
        for i in range(0, len(x), batch):
            idx = [order[i:i + batch] for order in orders]
            with torch.no_grad():
                xs = augment_each(augment, [x[j] for j in idx], gens)
            ys = torch.stack([y[j] for j in idx])
            logits = net(params, xs).flatten(0, 1)
            losses = F.cross_entropy(logits, ys.flatten(0, 1), reduction="none").view(len(idx), -1).mean(1)
            opt[0].zero_grad(set_to_none=True)
            losses.sum().backward()
            opt[0].step()
        return losses.detach()  # the last minibatch's

    def restart(rate: float) -> None:
        opt[0] = torch.optim.SGD(params, lr=rate, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    sgd_schedule(epochs, lr, epoch, restart, on_epoch, tick)
    return list(net.to_flats([p.detach() for p in params]))


def sgd_static(step: Step, augment: Augment, x: Tensor, y: Tensor, flats: Tensor, bufs: Tensor, rate: Tensor,
               idx: Tensor, aug: tuple[Tensor, ...], momentum: float = MOMENTUM,
               weight_decay: float = WEIGHT_DECAY) -> Tensor:
    """One SGD step of K networks in place on `flats` and momentum buffers `bufs`, network k on x[idx[k]] with
    branch-free DSA fields `aug`: fixed shapes and no host read, so it can be captured. torch.optim.SGD's update
    (a zero buffer is its first step; momentum 0 is plain SGD). Returns the K losses."""
    k, b = idx.shape
    rows = idx.reshape(-1)
    xs = augment.apply_fields(x.index_select(0, rows), aug).view(k, b, *x.shape[1:])
    ys = y.index_select(0, rows).view(k, b, *y.shape[1:])
    grads, losses = step(flats, xs, ys)
    with torch.no_grad():
        bufs.mul_(momentum).add_(grads.add(flats, alpha=weight_decay))
        flats.sub_(bufs * rate)
    return losses


def capturable(template: nn.Module, k: int) -> bool:
    """Whether K copies of `template` can train from captured steps: no buffers (BatchNorm statistics would be
    updated outside the flat state), and groupable when k > 1."""
    return not any(True for _ in template.buffers()) and (k == 1 or groupable(template))


class CapturedSGD:
    """SGD epochs of K networks from one captured `sgd_static` graph per batch size (`capture=False`: the same step
    run eagerly, any device). The weights `flats` (K, P) and buffers `bufs` are updated in place: the graph's state.

    Each network draws from its own generator in the order plain training does: one order per epoch, then one DSA
    draw per minibatch. `option` is the flag a failed capture names."""

    def __init__(self, step: Step, augment: Augment, x: Tensor, y: Tensor, flats: Tensor, bufs: Tensor,
                 momentum: float, weight_decay: float, capture: bool = True, option: str = "--eval-fast") -> None:
        if augment.tokens and augment.mode != "S":
            raise ValueError("captured training replays branch-free mode-'S' DSA draws")
        self.augment, self.x, self.option, self.capture = augment, x, option, capture
        self.rate = torch.zeros((), dtype=flats.dtype, device=flats.device)
        self.state = [flats, bufs, self.rate]
        self._replays: dict[int, Callable[[list[Tensor]], Tensor]] = {}  # a short last batch: a second graph

        def sgd(flats: Tensor, bufs: Tensor, rate: Tensor, idx: Tensor, *aug: Tensor) -> Tensor:
            return sgd_static(step, augment, x, y, flats, bufs, rate, idx, aug, momentum, weight_decay)

        self._sgd = sgd

    def epoch(self, gens: list[torch.Generator], batch: int, lr: float) -> Tensor:
        """One pass over x at step size `lr`; the K mean training losses (on the device)."""
        x, augment = self.x, self.augment
        self.rate.fill_(lr)
        orders = [torch.randperm(len(x), generator=g, device=x.device) for g in gens]
        total = torch.zeros(len(gens), dtype=x.dtype, device=x.device)
        for i in range(0, len(x), batch):
            idx = torch.stack([order[i:i + batch] for order in orders])
            size = idx.shape[1]
            draws = [augment.sample(size, g, x.shape[-2:], device=x.device) for g in gens] if augment.tokens else []
            inputs = [idx, *augment.branch_free_fields(draws)]
            if size not in self._replays:
                self._replays[size] = (Captured(self._sgd, inputs, self.state, option=self.option) if self.capture
                                       else lambda values: self._sgd(*self.state, *values))
            total += self._replays[size](inputs) * size  # the replay's output is overwritten by the next one
        return total / len(x)


def train_captured(template: nn.Module, inits: list[Tensor], x: Tensor, y: Tensor, epochs: int, lr: float,
                   batch: int, augment: Augment, gens: list[torch.Generator],
                   on_epoch: Callable[[], None] | None = None, capture: bool = True,
                   tick: Callable[[], None] | None = None) -> list[Tensor]:
    """`train_together` (one network: `dsa.train_model`) as replays of captured SGD steps (`CapturedSGD`).

    The same draws in the same order, so the result equals plain training up to float rounding; after pass
    `epochs // 2 + 1` the momentum buffers are zeroed and the rate is lr / 10, as when the reference code rebuilds its
    optimiser. `capture=False` runs the same step eagerly (any device: how the CPU tests check it).
    """
    if not capturable(template, len(inits)):
        raise ValueError(f"{type(template).__name__} cannot be trained from captured steps; check capturable() first")
    flats = torch.stack(inits).to(x.device, x.dtype)
    bufs = torch.zeros_like(flats)
    sgd = CapturedSGD(autograd_step(FunctionalModel(template), len(inits)), augment, x, y, flats, bufs, MOMENTUM,
                      WEIGHT_DECAY, capture)
    sgd_schedule(epochs, lr, lambda rate: sgd.epoch(gens, batch, rate), lambda rate: bufs.zero_(), on_epoch, tick)
    return list(flats.clone())
