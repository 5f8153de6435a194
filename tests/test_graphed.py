"""The CUDA-graph fast path of MTT (methods/graphed.py, `--fast on`) against the plain unrolled gradient.

CPU: the function that gets captured, run eagerly (`unrolled_static` on `pack_plan`'s tensors, branch-free DSA),
equals `trajectory.unrolled_grad` on the same plan (ordinary mode-'S' DSA): float64, rel 1e-9. CUDA (skipped
without a GPU): one captured graph replayed for 3 iterations with different plans, θ_start and labels equals
`unrolled_grad` each time; MTT with fast "on" equals fast "off".
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distillery.augment import Augment
from distillery.methods.graphed import (GraphedTesla, GraphedUnroll, pack_plan, tesla_pass1_static,
                                         tesla_step_static, unrolled_static)
from distillery.methods.tesla import tesla_grad, tesla_pass1
from distillery.methods.trajectory import leaf_copies, make_plan, unrolled_grad
from distillery.models import FunctionalModel, init_seeded

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
CLASSES, IPC, CHANNELS, SIZE = 3, 2, 3, (16, 16)
N_IMAGES = CLASSES * IPC


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def model(dtype: torch.dtype, device: str) -> FunctionalModel:
    """ConvNet width 8, depth 2 on 3x16x16, deterministic init."""
    return FunctionalModel(init_seeded("ConvNetD2W8", CHANNELS, CLASSES, SIZE, seed=0).to(device, dtype))


def problem(fm: FunctionalModel, seed: int, dtype: torch.dtype, device: str, soft: bool = False):
    """Images, labels, α, θ_0 and θ* = θ_0 + a random move."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(N_IMAGES, CHANNELS, *SIZE, generator=gen, dtype=dtype)
    labels = torch.arange(CLASSES).repeat_interleave(IPC)
    if soft:
        labels = torch.softmax(torch.randn(N_IMAGES, CLASSES, generator=gen, dtype=dtype), 1)
    theta0 = fm.flatten(fm.module).detach().cpu() + 0.01 * seed * torch.randn(fm.num_params, generator=gen,
                                                                              dtype=dtype)
    target = theta0 + 0.05 * torch.randn(fm.num_params, generator=gen, dtype=dtype)
    lr = torch.tensor(0.05, dtype=dtype)
    return [t.to(device) for t in (images, labels, lr, theta0, target)]


def plan_for(augment: Augment | None, seed: int, steps: int, batch: int | None, device: str):
    """A plan drawn on a generator of `device` (as MTT draws it)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return make_plan(N_IMAGES, steps, batch, augment, gen, SIZE, device)


def assert_close(got, ref, rtol: float) -> None:
    """Gradients of X and α and the loss agree to `rtol` of their scale."""
    for name, a, b in (("images", got.grad_images, ref.grad_images), ("lr", got.grad_lr, ref.grad_lr)):
        scale = b.abs().max().item()
        assert scale > 0 and (a - b).abs().max().item() <= rtol * scale, (name, (a - b).abs().max().item(), scale)
    assert abs(got.loss - ref.loss) <= rtol * abs(ref.loss), (got.loss, ref.loss)


def eager(fm, augment, images, labels, lr, theta0, target, plan):
    """The captured function, run without capture; packed as a GradResult-like triple."""
    sizes, indices, aug = pack_plan(plan, augment)
    gx, ga, loss = unrolled_static(fm, augment, sizes, images, labels, lr, theta0, target, indices, aug)
    return type("R", (), {"grad_images": gx, "grad_lr": ga, "loss": float(loss)})


@pytest.mark.parametrize("strategy", ["color_crop_cutout_flip_scale_rotate", "color_crop_cutout_scale_rotate",
                                      "none"])
@pytest.mark.parametrize("batch", [None, 4])  # 4 of 6: steps of 4 and 2 images (a static pattern per step)
def test_eager_static_equals_unrolled_grad(strategy, batch):
    fm = model(torch.float64, "cpu")
    augment = Augment(strategy)
    drawn = set()
    for seed in range(4):  # several plans: different tokens per step
        images, labels, lr, theta0, target = problem(fm, seed, torch.float64, "cpu", soft=seed % 2 == 1)
        plan = plan_for(augment, seed, 5, batch, "cpu")
        drawn.update(p.tokens for p in plan.aug)
        ref = unrolled_grad(fm, images, labels, lr, theta0, target, plan, augment)
        assert_close(eager(fm, augment, images, labels, lr, theta0, target, plan), ref, 1e-9)
    assert strategy == "none" or len(drawn) >= 4  # the plans exercised most tokens


def test_eager_static_float32_matches_to_float_rounding():
    fm = model(torch.float32, "cpu")
    augment = Augment()
    images, labels, lr, theta0, target = problem(fm, 1, torch.float32, "cpu")
    plan = plan_for(augment, 1, 4, None, "cpu")
    ref = unrolled_grad(fm, images, labels, lr, theta0, target, plan, augment)
    assert_close(eager(fm, augment, images, labels, lr, theta0, target, plan), ref, 1e-3)


def eager_tesla(fm, augment, images, labels, lr, theta0, target, plan):
    """TESLA as the two functions that get captured (pass 1 whole, pass 2 per step), run without capture."""
    sizes, indices, aug = pack_plan(plan, augment)
    thetas, c, denom, loss, grad_alpha = tesla_pass1_static(fm, augment, sizes, images, labels, lr, theta0, target,
                                                            indices, aug)
    total, offset = torch.zeros_like(images), 0
    for size, theta in zip(sizes, thetas):
        total += tesla_step_static(fm, augment, images, labels, theta, 2.0 / denom * c,
                                   indices[offset:offset + size], tuple(t[offset:offset + size] for t in aug))
        offset += size
    return type("R", (), {"grad_images": total, "grad_lr": grad_alpha, "loss": float(loss)})


def test_eager_tesla_pass1_equals_tesla_pass1():
    """The captured first pass keeps what `tesla_pass1` keeps: θ_i, c, D, L and ∂L/∂α (float64)."""
    fm = model(torch.float64, "cpu")
    augment = Augment()
    images, labels, lr, theta0, target = problem(fm, 2, torch.float64, "cpu")
    plan = plan_for(augment, 2, 5, 4, "cpu")
    x, y, alpha = leaf_copies(images, labels, lr)
    ref = tesla_pass1(fm, x, y, alpha, theta0, target, plan, augment)
    sizes, indices, aug = pack_plan(plan, augment)
    thetas, c, denom, loss, grad_alpha = tesla_pass1_static(fm, augment, sizes, images, labels, lr, theta0, target,
                                                            indices, aug)
    pairs = ((thetas, torch.stack(ref.thetas)), (c, ref.c), (denom, ref.denom), (loss, ref.loss),
             (grad_alpha, ref.grad_alpha))
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy", ["color_crop_cutout_flip_scale_rotate", "none"])
def test_eager_tesla_step_equals_tesla_grad(strategy):
    fm = model(torch.float64, "cpu")
    augment = Augment(strategy)
    for seed in range(3):
        images, labels, lr, theta0, target = problem(fm, seed, torch.float64, "cpu", soft=seed == 1)
        plan = plan_for(augment, seed, 5, 4, "cpu")
        ref = tesla_grad(fm, images, labels, lr, theta0, target, plan, augment)
        assert_close(eager_tesla(fm, augment, images, labels, lr, theta0, target, plan), ref, 1e-9)


def test_pack_plan_has_static_shapes_across_plans():
    augment = Augment()
    shapes = set()
    for seed in range(5):
        sizes, indices, aug = pack_plan(plan_for(augment, seed, 5, 4, "cpu"), augment)
        shapes.add((sizes, tuple(indices.shape), tuple((tuple(t.shape), t.dtype) for t in aug)))
    assert len(shapes) == 1


def test_graphed_unroll_refuses_cpu_tensors():
    fm = model(torch.float64, "cpu")
    images, labels, lr, theta0, target = problem(fm, 0, torch.float64, "cpu")
    with pytest.raises(ValueError, match="CUDA graph"):
        GraphedUnroll(fm, Augment())(images, labels, lr, theta0, target, plan_for(Augment(), 0, 2, None, "cpu"))


@CUDA
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
@pytest.mark.parametrize("graphed_cls,reference,captures", [(GraphedUnroll, unrolled_grad, 1),
                                                            (GraphedTesla, tesla_grad, 3)])
def test_captured_graphs_replay_different_iterations(dtype, rtol, graphed_cls, reference, captures):
    """Different plans (tokens), θ_start, θ* and labels through the same captures: MTT's one graph; TESLA's pass 1
    and one pass-2 graph per step size (steps of 4 and 2 images)."""
    fm = model(dtype, "cuda")
    augment = Augment()
    graphed = graphed_cls(fm, augment)
    for seed in range(3):
        images, labels, lr, theta0, target = problem(fm, seed, dtype, "cuda", soft=True)
        plan = plan_for(augment, seed, 5, 4, "cuda")
        ref = reference(fm, images, labels, lr, theta0, target, plan, augment)
        assert_close(graphed(images, labels, lr, theta0, target, plan), ref, rtol)
    assert graphed.captures == captures


@CUDA
@pytest.mark.parametrize("grad", ["unrolled", "tesla"])
def test_mtt_fast_on_equals_off(tmp_path, grad):
    from distillery.data import load_dataset
    from distillery.experts import train_experts
    from distillery.methods.mtt import MTT, MTTConfig

    ds = load_dataset("digits", device="cuda")
    store = train_experts(ds, "ConvNetD2W8", 1, epochs=3, out_dir=tmp_path / "store", device="cuda", progress=False)
    cfg = MTTConfig(ipc=2, model="ConvNetD2W8", syn_steps=4, expert_epochs=1, max_start_epoch=2, trajectories=2,
                    grad=grad)
    off, on = MTT(ds, store, cfg), MTT(ds, store, dataclasses.replace(cfg, fast="on"))
    for it in range(2):
        a, b = off.gradient(it)[0], on.gradient(it)[0]
        assert_close(b, a, 1e-3)
    assert on.graphed.captures == (1 if grad == "unrolled" else 2)  # tesla: pass 1 + one pass-2 (whole-set steps)


def test_fast_is_off_by_default_and_refused_on_cpu():
    from distillery.data import load_dataset
    from distillery.distill import resolve_config
    from distillery.errors import UserError
    from distillery.methods.mtt import MTT, MTTConfig

    assert MTTConfig().fast == "off" and resolve_config("mtt", {"dataset": "digits"})["fast"] == "off"
    ds = load_dataset("digits")  # on the CPU: the library path refuses too, before experts are read
    with pytest.raises(UserError, match="--fast on replays captured CUDA graphs but the device is cpu"):
        MTT(ds, None, MTTConfig(fast="on"))
    with pytest.raises(UserError, match="not --grad checkpointed"):
        MTT(ds, None, MTTConfig(fast="on", grad="checkpointed"))
