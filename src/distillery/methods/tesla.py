"""TESLA (SPEC §5): the trajectory-matching gradient in memory independent of N, and soft labels from an expert.

TESLA's gradient is first-order in the parameter path: it equals the gradient of MTT's loss when each step's gradient
g_i is evaluated at a stop-gradient copy of θ_i, i.e. θ_{i+1} = θ_i − α g_i(sg(θ_i), x_i), so the influence of a
batch on *later* steps through θ is dropped (SPEC §5.2 "Exactness", P9). With θ_N = θ_0 − αG, G = Σ g_i, and
r = θ_N − θ*, D = ‖θ_0 − θ*‖²:

    ∂L/∂x_i = (2/D) ∂/∂x_i [cᵀ g_i(θ_i, x_i)],   c = α(θ* − θ_0) + α² G  (= −α r)
    ∂L/∂α   = −(2/D) rᵀ G

so one pass stores the θ_i and sums G, and a second pass differentiates one step at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import UserError
from ..models import FunctionalModel
from .trajectory import GradResult, PackedPlan, StepPlan, leaf_copies, make_result, step_gradient

if TYPE_CHECKING:
    from ..augment import Augment


def tesla_grads(fm: FunctionalModel, images: Tensor, labels: Tensor, lr: Tensor, theta_start: Tensor,
                theta_target: Tensor, plan: StepPlan | PackedPlan, augment: Augment | None) -> tuple[Tensor, ...]:
    """(L, ∂L/∂X, ∂L/∂α[, ∂L/∂Y]) of TESLA (SPEC §5.2 steps 1-5): autograd memory of one step whatever N; keeps
    the N θ_i vectors. Tensors only, no host read: with a `PackedPlan` it is what `--fast on` captures."""
    x, y, alpha = leaf_copies(images, labels, lr)
    first = tesla_pass1(fm, x, y, alpha, theta_start, theta_target, plan, augment)

    # Pass 2: per step, rebuild g_i at the stored θ_i on the same batch and augmentation (replayed from the plan, so
    # the augmented batch is bit-identical to pass 1) and differentiate (2/D)·cᵀg_i; each graph is freed right away.
    wrt = [x, y] if y.requires_grad else [x]
    totals = [torch.zeros_like(t) for t in wrt]
    for i in range(plan.steps):
        grad = step_gradient(fm, first.thetas[i], x, y, plan, i, augment, create_graph=True)
        for total, part in zip(totals, torch.autograd.grad(2.0 / first.denom * (first.c @ grad), wrt)):
            total += part
    return (first.loss, totals[0], first.grad_alpha, *totals[1:])


def tesla_grad(fm: FunctionalModel, images: Tensor, labels: Tensor, lr: Tensor, theta_start: Tensor,
               theta_target: Tensor, plan: StepPlan | PackedPlan, augment: Augment | None) -> GradResult:
    """TESLA's gradient (`tesla_grads`) as a GradResult."""
    return make_result(*tesla_grads(fm, images, labels, lr, theta_start, theta_target, plan, augment))


@dataclass
class PassOne:
    """What TESLA's first pass leaves for the second: θ_i, c = α(θ* − θ_0) + α²G, D, L and ∂L/∂α."""

    thetas: list[Tensor]
    c: Tensor
    denom: Tensor
    loss: Tensor
    grad_alpha: Tensor


def tesla_pass1(fm: FunctionalModel, x: Tensor, y: Tensor, alpha: Tensor, theta_start: Tensor, theta_target: Tensor,
                plan: StepPlan | PackedPlan, augment: Augment | None) -> PassOne:
    """Pass 1: run the student without any graph between steps (create_graph=False, P9); store θ_i, sum G."""
    a = alpha.detach()
    theta_start, theta_target = theta_start.detach(), theta_target.detach()
    thetas = []
    grad_sum = torch.zeros_like(theta_start)
    theta = theta_start
    for i in range(plan.steps):
        thetas.append(theta)
        grad = step_gradient(fm, theta, x.detach(), y.detach(), plan, i, augment, create_graph=False)
        grad_sum += grad
        theta = theta - a * grad
    residual = theta - theta_target
    denom = (theta_start - theta_target).pow(2).sum()
    c = a * (theta_target - theta_start) + a * a * grad_sum
    grad_alpha = -2.0 / denom * (residual @ grad_sum)  # step 5: G held fixed
    return PassOne(thetas, c, denom, residual.pow(2).sum() / denom, grad_alpha)


@torch.no_grad()
def expert_soft_labels(fm: FunctionalModel, theta: Tensor, images: Tensor, temperature: float = 1.0,
                       chunk: int = 256) -> Tensor:
    """Soft labels softmax(logits / T) of an expert θ on the un-augmented images (SPEC §5.3), any class count."""
    if not temperature > 0:
        raise UserError(f"soft-label temperature must be positive, got {temperature}; use e.g. 1.0")
    return torch.softmax(expert_logits(fm, theta, images, chunk) / temperature, dim=1)


@torch.no_grad()
def expert_logits(fm: FunctionalModel, theta: Tensor, images: Tensor, chunk: int = 256) -> Tensor:
    """Logits of an expert θ on the un-augmented images, `chunk` images at a time, with the model in eval mode."""
    if chunk < 1:
        raise UserError(f"soft-label chunk size must be at least 1, got {chunk}; use e.g. 256")
    was_training = fm.module.training
    fm.module.eval()  # the reference runs the expert in eval mode (matters only for BatchNorm models)
    try:
        return torch.cat([fm(theta.detach(), part) for part in images.detach().split(chunk)])
    finally:
        fm.module.train(was_training)
