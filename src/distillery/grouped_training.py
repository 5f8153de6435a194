"""Plain-autograd training for experts and evaluation: one network, or K networks at once as one grouped net.

Why: `torch.func.grad_and_value` runs with grad mode on inside the transform, so GroupNorm takes its
double-differentiable backward; a plain `autograd.grad` uses the fused kernel (the expert epoch cost 1.30x the
published loop with the former). K networks at once use `models.grouped.GroupedConvNet` (one kernel per layer for
all K) instead of `vmap(grad)`. Every network keeps its own generator and draws in the same order as when trained
alone (order, then one DSA draw per minibatch), so the results equal separate training up to float rounding (tested).
`train_captured` (evaluation `fast`) replays that training from one captured CUDA graph per batch size: the SGD step
with branch-free DSA (`sgd_static`), the weights and momentum kept as the graph's state.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import PARAM_FIELDS, Augment, AugParams
from .background import check_cancelled
from .capture import Captured
from .models import FunctionalModel
from .models.grouped import GroupedConvNet, groupable

MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # the evaluation optimiser (SPEC §7): SGD, restarted at the lr decay

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


def plain_step(fm: FunctionalModel) -> Step:
    """The gradient step of ONE expert (K = 1) with plain autograd: `autograd.grad` of its loss w.r.t. the flat θ."""

    def step(flats: Tensor, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        flat = flats[0].detach().requires_grad_(True)
        loss = F.cross_entropy(fm(flat, xs[0]), ys[0])
        (grad,) = torch.autograd.grad(loss, flat)
        return grad[None], loss.detach()[None]

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
                   on_epoch: Callable[[], None] | None = None) -> list[Tensor]:
    """The SPEC §7 evaluation training of R networks at once as one GroupedConvNet; returns R flat vectors.

    Network r starts from inits[r] and draws from gens[r] exactly as `evaluate.train_model` does alone (one order
    per epoch, one DSA draw per minibatch): SGD momentum 0.9, weight decay 5e-4, `epochs + 1` passes, lr / 10 with
    a fresh optimizer after pass `epochs // 2 + 1`. Raises FloatingPointError on a non-finite loss (read once per
    100 epochs). `y` may be class ids or per-image probability vectors.
    """
    net = GroupedConvNet(template, len(inits))
    params = net.from_flats(torch.stack(inits).to(x.dtype))
    optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    finite = torch.ones((), dtype=torch.bool, device=x.device)
    for ep in range(epochs + 1):
        check_cancelled()
        orders = [torch.randperm(len(x), generator=g, device=x.device) for g in gens]
        for i in range(0, len(x), batch):
            idx = [order[i:i + batch] for order in orders]
            with torch.no_grad():
                xs = augment_each(augment, [x[j] for j in idx], gens)
            ys = torch.stack([y[j] for j in idx])
            logits = net(params, xs).flatten(0, 1)
            losses = F.cross_entropy(logits, ys.flatten(0, 1), reduction="none").view(len(idx), -1).mean(1)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
        finite = finite & torch.isfinite(losses).all()
        if (ep % 100 == 99 or ep == epochs) and not finite:
            raise FloatingPointError(f"non-finite training loss by epoch {ep}")
        if ep == epochs // 2 + 1:  # the reference code rebuilds the optimiser, so momentum restarts
            optimizer = torch.optim.SGD(params, lr=lr * 0.1, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        if on_epoch is not None:
            on_epoch()
    return list(net.to_flats([p.detach() for p in params]))


def sgd_static(step: Step, augment: Augment, x: Tensor, y: Tensor, flats: Tensor, momentum: Tensor, rate: Tensor,
               idx: Tensor, aug: tuple[Tensor, ...]) -> Tensor:
    """One SGD step of K networks in place on `flats` and `momentum`, network k on x[idx[k]] with branch-free DSA
    fields `aug`: fixed shapes and no host read, so it can be captured. The update of torch.optim.SGD (momentum,
    weight decay; a zero momentum buffer is its first step). Returns the K losses."""
    k, b = idx.shape
    rows = idx.reshape(-1)
    xs = augment.apply_fields(x.index_select(0, rows), aug).view(k, b, *x.shape[1:])
    ys = y.index_select(0, rows).view(k, b, *y.shape[1:])
    grads, losses = step(flats, xs, ys)
    with torch.no_grad():
        momentum.mul_(MOMENTUM).add_(grads.add(flats, alpha=WEIGHT_DECAY))
        flats.sub_(momentum * rate)
    return losses


def capturable(template: nn.Module, k: int) -> bool:
    """Whether `train_captured` can train k copies of `template`: no buffers (BatchNorm statistics would be updated
    outside the flat state), and groupable when k > 1."""
    return not any(True for _ in template.buffers()) and (k == 1 or groupable(template))


def train_captured(template: nn.Module, inits: list[Tensor], x: Tensor, y: Tensor, epochs: int, lr: float,
                   batch: int, augment: Augment, gens: list[torch.Generator],
                   on_epoch: Callable[[], None] | None = None, capture: bool = True) -> list[Tensor]:
    """`train_together` (one network: `evaluate.train_model`) as replays of one captured SGD step per batch size.

    The same draws in the same order (one order per epoch, one DSA draw per minibatch, per network), so the result
    equals plain training up to float rounding; the momentum buffer is zeroed and the rate set to lr / 10 after pass
    `epochs // 2 + 1`. `capture=False` runs the same step eagerly (any device: how the CPU tests check it).
    """
    if augment.tokens and augment.mode != "S":
        raise ValueError("captured training replays branch-free mode-'S' DSA draws")
    if not capturable(template, len(inits)):
        raise ValueError(f"{type(template).__name__} cannot be trained from captured steps; check capturable() first")
    step = autograd_step(FunctionalModel(template), len(inits))
    flats = torch.stack(inits).to(x.device, x.dtype)
    momentum = torch.zeros_like(flats)
    rate = torch.tensor(lr, dtype=x.dtype, device=x.device)
    state = [flats, momentum, rate]

    def sgd(flats: Tensor, momentum: Tensor, rate: Tensor, idx: Tensor, *aug: Tensor) -> Tensor:
        return sgd_static(step, augment, x, y, flats, momentum, rate, idx, aug)

    replays: dict[int, Callable[[list[Tensor]], Tensor]] = {}  # one graph per batch size (a short last batch: two)
    finite = torch.ones((), dtype=torch.bool, device=x.device)
    for ep in range(epochs + 1):
        check_cancelled()
        orders = [torch.randperm(len(x), generator=g, device=x.device) for g in gens]
        for i in range(0, len(x), batch):
            idx = torch.stack([order[i:i + batch] for order in orders])
            size = idx.shape[1]
            draws = [augment.sample(size, g, x.shape[-2:], device=x.device) for g in gens] if augment.tokens else []
            inputs = [idx, *augment.branch_free_fields(draws)]
            if size not in replays and capture:
                replays[size] = Captured(sgd, inputs, state, option="--eval-fast")
            elif size not in replays:
                replays[size] = lambda values: sgd(*state, *values)
            losses = replays[size](inputs)
        finite = finite & torch.isfinite(losses).all()
        if (ep % 100 == 99 or ep == epochs) and not finite:
            raise FloatingPointError(f"non-finite training loss by epoch {ep}")
        if ep == epochs // 2 + 1:  # the reference code rebuilds the optimiser: momentum restarts
            momentum.zero_()
            rate.fill_(lr * 0.1)
        if on_epoch is not None:
            on_epoch()
    return list(flats.clone())
