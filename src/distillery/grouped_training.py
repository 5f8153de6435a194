"""Plain-autograd training for experts and evaluation: one network, or K networks at once as one grouped net.

Why: `torch.func.grad_and_value` runs with grad mode on inside the transform, so GroupNorm takes its
double-differentiable backward; a plain `autograd.grad` uses the fused kernel (the expert epoch cost 1.30x the
published loop with the former). K networks at once use `models.grouped.GroupedConvNet` (one kernel per layer for
all K) instead of `vmap(grad)`. Every network keeps its own generator and draws in the same order as when trained
alone (order, then one DSA draw per minibatch), so the results equal separate training up to float rounding (tested).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import Augment, AugParams
from .background import check_cancelled
from .models import FunctionalModel
from .models.grouped import GroupedConvNet, groupable

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
    fields = {name: torch.cat([getattr(p, name) for p in params]) for name in
              ("brightness", "saturation", "contrast", "translate", "cutout", "flip", "scale", "rotate")
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
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
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
            optimizer = torch.optim.SGD(params, lr=lr * 0.1, momentum=0.9, weight_decay=5e-4)
        if on_epoch is not None:
            on_epoch()
    return list(net.to_flats([p.detach() for p in params]))
