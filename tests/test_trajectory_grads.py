"""Trajectory-matching gradients (SPEC §4.2-4.3, §5.2-5.3, P8, P9, §10.2 items 3-5): exactness, equivalences, memory.

Everything runs in float64 on a tiny ConvNet (1x8x8 inputs, width 4, depth 2, ~250 parameters) and a 6-image set.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.augment import Augment
from distillery.errors import UserError
from distillery.methods.tesla import expert_soft_labels, tesla_grad
from distillery.methods.trajectory import (
    SavedTensorBytes,
    checkpointed_grad,
    make_plan,
    match_loss,
    unrolled_grad,
)
from distillery.models import FunctionalModel, init_seeded

IM_SIZE = (8, 8)
CLASSES, IPC = 3, 2
N_IMAGES = CLASSES * IPC
DSA_ALL_OPS = Augment(mode="M")  # every DSA op (color, crop, cutout, flip, scale+rotate warp) at every step


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_model(num_classes: int = CLASSES) -> FunctionalModel:
    """ConvNet width 4, depth 2 on 1x8x8 inputs, float64, deterministic init."""
    return FunctionalModel(init_seeded("ConvNetD2W4", 1, num_classes, IM_SIZE, seed=0).double())


def problem(seed: int = 0, soft_labels: bool = False, lr: float = 0.1):
    """Images, labels, α, θ_0 and θ* = θ_0 + a random move, all float64."""
    fm = tiny_model()
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(N_IMAGES, 1, *IM_SIZE, generator=gen, dtype=torch.float64)
    labels = torch.arange(CLASSES).repeat_interleave(IPC)
    if soft_labels:  # learned labels: a differentiable probability target
        labels = torch.softmax(torch.randn(N_IMAGES, CLASSES, generator=gen, dtype=torch.float64), 1)
        labels.requires_grad_(True)
    theta_start = fm.flatten(fm.module).detach()
    theta_target = theta_start + 0.05 * torch.randn(theta_start.shape, generator=gen, dtype=torch.float64)
    return fm, images, labels, torch.tensor(lr, dtype=torch.float64), theta_start, theta_target


def plan_for(steps: int, augment: Augment | None, batch: int | None = None, seed: int = 1):
    """A step plan over the tiny set from its own generator."""
    return make_plan(N_IMAGES, steps, batch, augment, torch.Generator().manual_seed(seed), IM_SIZE, "cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm())


def rollout_loss(fm, images, labels, lr, theta_start, theta_target, plan, augment) -> float:
    """The matching loss of a plain (no-graph) rollout, written independently of the library's step code."""
    theta = theta_start.clone()
    for idx, params in zip(plan.indices, plan.aug):
        leaf = theta.detach().requires_grad_(True)
        x = augment.apply(images[idx], params) if augment is not None else images[idx]
        (grad,) = torch.autograd.grad(F.cross_entropy(fm(leaf, x), labels[idx]), leaf)
        theta = theta - lr * grad
    return float(match_loss(theta, theta_start, theta_target))


def stop_gradient_reference(fm, images, labels, lr, theta_start, theta_target, plan, augment):
    """SPEC §5.2 reference: MTT's loss with g_i evaluated at sg(θ_i), θ_{i+1} = θ_i − α g_i(sg(θ_i), x_i); autograd."""
    x_leaf = images.detach().requires_grad_(True)
    y_leaf = labels.detach().requires_grad_(labels.requires_grad)
    a_leaf = lr.detach().requires_grad_(True)
    theta = theta_start.detach()
    for idx, params in zip(plan.indices, plan.aug):
        frozen = theta.detach().requires_grad_(True)
        x = augment.apply(x_leaf[idx], params) if augment is not None else x_leaf[idx]
        (grad,) = torch.autograd.grad(F.cross_entropy(fm(frozen, x), y_leaf[idx]), frozen, create_graph=True)
        theta = theta - a_leaf * grad
    loss = match_loss(theta, theta_start, theta_target)
    wrt = [x_leaf, a_leaf, y_leaf] if labels.requires_grad else [x_leaf, a_leaf]
    return torch.autograd.grad(loss, wrt)


# --- plan -------------------------------------------------------------------------------------------------------


def test_plan_chunks_are_permutations_and_reproducible():
    plan = plan_for(steps=7, augment=DSA_ALL_OPS, batch=4)
    sizes = [len(i) for i in plan.indices]
    assert sizes == [4, 2, 4, 2, 4, 2, 4]  # chunks of 4 from each permutation of 6, then a fresh permutation
    for first, second in zip(plan.indices[0:6:2], plan.indices[1:6:2]):
        assert sorted(torch.cat([first, second]).tolist()) == list(range(N_IMAGES))
    assert all(p.batch == len(i) for p, i in zip(plan.aug, plan.indices))  # per-image (non-siamese) draws
    again = plan_for(steps=7, augment=DSA_ALL_OPS, batch=4)
    assert all(torch.equal(a, b) for a, b in zip(plan.indices, again.indices))
    assert all(torch.equal(a.rotate, b.rotate) for a, b in zip(plan.aug, again.aug))
    assert plan_for(steps=3, augment=None).aug == [None, None, None]


@pytest.mark.parametrize("steps, batch", [(0, None), (3, 0), (3, N_IMAGES + 1)])
def test_plan_rejects_bad_sizes(steps, batch):
    with pytest.raises(UserError):
        plan_for(steps=steps, augment=None, batch=batch)


# --- SPEC §4.3 sanity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [unrolled_grad, checkpointed_grad, tesla_grad])
def test_loss_is_one_when_lr_is_zero(mode):
    fm, images, labels, _, theta_start, theta_target = problem()
    result = mode(fm, images, labels, torch.tensor(0.0, dtype=torch.float64), theta_start, theta_target,
                  plan_for(3, DSA_ALL_OPS), DSA_ALL_OPS)
    assert result.loss == pytest.approx(1.0, abs=1e-12)


# --- exact MTT gradient -----------------------------------------------------------------------------------------


def test_unrolled_grad_matches_finite_differences():
    fm, images, labels, lr, theta_start, theta_target = problem(soft_labels=True)
    plan = plan_for(steps=4, augment=DSA_ALL_OPS)
    result = unrolled_grad(fm, images, labels, lr, theta_start, theta_target, plan, DSA_ALL_OPS)
    eps = 1e-5
    gen = torch.Generator().manual_seed(7)

    def loss(x=images, y=labels.detach(), a=lr) -> float:
        return rollout_loss(fm, x, y, a, theta_start, theta_target, plan, DSA_ALL_OPS)

    assert result.loss == pytest.approx(loss(), rel=1e-12)
    for _ in range(3):  # directional derivatives along random directions
        v = torch.randn(images.shape, generator=gen, dtype=torch.float64)
        numeric = (loss(x=images + eps * v) - loss(x=images - eps * v)) / (2 * eps)
        assert float((result.grad_images * v).sum()) == pytest.approx(numeric, rel=1e-4)
        w = torch.randn(labels.shape, generator=gen, dtype=torch.float64)
        numeric = (loss(y=labels.detach() + eps * w) - loss(y=labels.detach() - eps * w)) / (2 * eps)
        assert float((result.grad_labels * w).sum()) == pytest.approx(numeric, rel=1e-4)
    numeric = (loss(a=lr + eps) - loss(a=lr - eps)) / (2 * eps)
    assert float(result.grad_lr) == pytest.approx(numeric, rel=1e-4)


@pytest.mark.parametrize("every", [1, 2, 3, 7, None])  # N = 7: k = 2 and 3 leave a short last segment
def test_checkpointed_equals_unrolled(every):
    fm, images, labels, lr, theta_start, theta_target = problem(soft_labels=True)
    plan = plan_for(steps=7, augment=DSA_ALL_OPS, batch=4)
    ref = unrolled_grad(fm, images, labels, lr, theta_start, theta_target, plan, DSA_ALL_OPS)
    got = checkpointed_grad(fm, images, labels, lr, theta_start, theta_target, plan, DSA_ALL_OPS, every=every)
    assert got.loss == pytest.approx(ref.loss, rel=1e-12)
    assert rel(got.grad_images, ref.grad_images) < 1e-6
    assert rel(got.grad_labels, ref.grad_labels) < 1e-6
    assert float(got.grad_lr) == pytest.approx(float(ref.grad_lr), rel=1e-6)


def test_checkpointed_rejects_zero_interval():
    fm, images, labels, lr, theta_start, theta_target = problem()
    with pytest.raises(UserError):
        checkpointed_grad(fm, images, labels, lr, theta_start, theta_target, plan_for(3, None), None, every=0)


@pytest.mark.parametrize("mode", [unrolled_grad, checkpointed_grad, tesla_grad])
def test_modes_leave_no_grad_on_inputs(mode):
    fm, images, labels, lr, theta_start, theta_target = problem(soft_labels=True)
    images.requires_grad_(True)
    lr.requires_grad_(True)
    result = mode(fm, images, labels, lr, theta_start, theta_target, plan_for(3, DSA_ALL_OPS), DSA_ALL_OPS)
    assert images.grad is None and lr.grad is None and labels.grad is None
    assert not result.grad_images.requires_grad and result.grad_lr.dim() == 0
    assert result.grad_labels is not None and result.grad_labels.shape == labels.shape


def test_hard_labels_give_no_label_gradient():
    fm, images, labels, lr, theta_start, theta_target = problem()
    for mode in (unrolled_grad, checkpointed_grad, tesla_grad):
        result = mode(fm, images, labels, lr, theta_start, theta_target, plan_for(3, None), None)
        assert result.grad_labels is None


# --- TESLA (SPEC §5.2, P9) --------------------------------------------------------------------------------------


@pytest.mark.parametrize("augment", [None, DSA_ALL_OPS, Augment()], ids=["no-aug", "dsa-all-ops", "dsa-default"])
def test_tesla_equals_stop_gradient_reference(augment):
    fm, images, labels, lr, theta_start, theta_target = problem(soft_labels=True)
    plan = plan_for(steps=6, augment=augment, batch=4)  # images recur across steps: their gradients accumulate
    got = tesla_grad(fm, images, labels, lr, theta_start, theta_target, plan, augment)
    ref_images, ref_lr, ref_labels = stop_gradient_reference(fm, images, labels, lr, theta_start, theta_target,
                                                             plan, augment)
    assert rel(got.grad_images, ref_images) < 1e-6
    assert rel(got.grad_labels, ref_labels) < 1e-6
    assert float(got.grad_lr) == pytest.approx(float(ref_lr), rel=1e-6)
    assert got.loss == pytest.approx(rollout_loss(fm, images, labels.detach(), lr, theta_start, theta_target,
                                                  plan, augment), rel=1e-12)


def test_tesla_is_not_the_exact_mtt_gradient():
    fm, images, labels, lr, theta_start, theta_target = problem()
    plan = plan_for(steps=6, augment=DSA_ALL_OPS)
    tesla = tesla_grad(fm, images, labels, lr, theta_start, theta_target, plan, DSA_ALL_OPS)
    exact = unrolled_grad(fm, images, labels, lr, theta_start, theta_target, plan, DSA_ALL_OPS)
    assert tesla.loss == pytest.approx(exact.loss, rel=1e-12)  # same forward
    assert rel(tesla.grad_images, exact.grad_images) > 1e-3  # but first-order in the parameter path (P9)
    assert abs(float(tesla.grad_lr - exact.grad_lr)) > 1e-3 * abs(float(exact.grad_lr))


# --- soft labels (SPEC §5.3, P8) --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 3, 7])
def test_soft_labels_are_distributions_for_any_class_count(num_classes):
    fm = tiny_model(num_classes)
    theta = fm.flatten(fm.module).detach().requires_grad_(True)
    images = torch.randn(5, 1, *IM_SIZE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    soft = expert_soft_labels(fm, theta, images)
    assert soft.shape == (5, num_classes) and not soft.requires_grad
    assert torch.allclose(soft.sum(1), torch.ones(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(soft, torch.softmax(fm(theta, images), 1), atol=1e-12)
    assert torch.allclose(expert_soft_labels(fm, theta, images, chunk=2), soft, atol=1e-12)
    sharp = expert_soft_labels(fm, theta, images, temperature=0.5)
    assert torch.equal(sharp.argmax(1), soft.argmax(1)) and (sharp.max(1).values >= soft.max(1).values).all()
    uniform = expert_soft_labels(fm, theta, images, temperature=math.inf)
    assert torch.allclose(uniform, torch.full_like(uniform, 1.0 / num_classes), atol=1e-12)
    assert fm.module.training  # the template's mode is restored


def test_soft_labels_drive_the_gradient_modes():
    fm, images, _, lr, theta_start, theta_target = problem()
    soft = expert_soft_labels(fm, theta_target, images)
    plan = plan_for(steps=3, augment=DSA_ALL_OPS)
    for mode in (unrolled_grad, tesla_grad):
        result = mode(fm, images, soft, lr, theta_start, theta_target, plan, DSA_ALL_OPS)
        assert math.isfinite(result.loss) and result.grad_labels is None


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan])
def test_soft_labels_reject_bad_temperature(temperature):
    fm, images, _, _, theta_start, _ = problem()
    with pytest.raises(UserError):
        expert_soft_labels(fm, theta_start, images, temperature=temperature)


# --- memory (SPEC P3, P9, §10.2 item 5 on CPU: bytes autograd saves for backward) ---------------------------------


def saved_peak(mode, steps: int, **kwargs) -> int:
    """Peak bytes saved for backward during one gradient computation with N = steps (full batch)."""
    fm, images, labels, lr, theta_start, theta_target = problem()
    plan = plan_for(steps=steps, augment=DSA_ALL_OPS)
    with SavedTensorBytes() as meter:
        mode(fm, images, labels, lr, theta_start, theta_target, plan, DSA_ALL_OPS, **kwargs)
    assert meter._current == 0  # every saved tensor was released: no graph outlives the call
    return meter.peak


def test_saved_bytes_unrolled_grows_linearly():
    assert saved_peak(unrolled_grad, 16) > 3.0 * saved_peak(unrolled_grad, 4)


def test_saved_bytes_checkpointed_grows_like_sqrt():
    small, large = saved_peak(checkpointed_grad, 4), saved_peak(checkpointed_grad, 16)  # k = 2 and 4
    assert large <= 2.5 * small
    assert large < 0.5 * saved_peak(unrolled_grad, 16)


def test_saved_bytes_tesla_independent_of_steps():
    small, large = saved_peak(tesla_grad, 5), saved_peak(tesla_grad, 20)
    assert abs(large - small) <= 0.05 * small
    assert small < saved_peak(unrolled_grad, 5) / 3


def test_meter_does_not_change_the_gradients():
    fm, images, labels, lr, theta_start, theta_target = problem(soft_labels=True)
    plan = plan_for(steps=4, augment=DSA_ALL_OPS)
    for mode in (unrolled_grad, checkpointed_grad, tesla_grad):
        plain = mode(fm, images, labels, lr, theta_start, theta_target, plan, DSA_ALL_OPS)
        with SavedTensorBytes():
            metered = mode(fm, images, labels, lr, theta_start, theta_target, plan, DSA_ALL_OPS)
        assert torch.equal(plain.grad_images, metered.grad_images)
        assert torch.equal(plain.grad_labels, metered.grad_labels)
        assert torch.equal(plain.grad_lr, metered.grad_lr)
