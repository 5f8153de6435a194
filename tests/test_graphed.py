"""The CUDA-graph fast path of MTT and TESLA (methods/graphed.py `GraphedGrad`, `--fast on`) against the plain
gradients.

CPU: `GraphedGrad` with `capture.Captured` replaced by an eager stand-in that keeps CUDA's replay semantics
(conftest `replay_on_cpu`): the one gradient implementation on the packed plan (branch-free DSA) equals it on the
plan itself (ordinary mode-'S' DSA), float64 rel 1e-9, for several plans through one capture; MTT with fast "on"
trains like fast "off". CUDA (skipped without a GPU): real captures replayed for 3 iterations with different plans,
θ_start and labels; MTT with fast "on" equals fast "off".
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import distillery.capture as capture
from distillery.augment import Augment
from distillery.methods.graphed import GraphedGrad
from distillery.methods.tesla import tesla_grad, tesla_grads
from distillery.methods.trajectory import make_plan, unrolled_grad, unrolled_grads
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


@pytest.fixture
def on_cpu(monkeypatch, replay_on_cpu):
    """Captures replayed eagerly on the CPU (conftest `replay_on_cpu`)."""
    monkeypatch.setattr(capture, "Captured", replay_on_cpu)


@pytest.mark.parametrize("strategy", ["color_crop_cutout_flip_scale_rotate", "color_crop_cutout_scale_rotate",
                                      "none"])
@pytest.mark.parametrize("batch", [None, 4])  # 4 of 6: steps of 4 and 2 images (a static pattern per step)
@pytest.mark.parametrize("grads,reference", [(unrolled_grads, unrolled_grad), (tesla_grads, tesla_grad)])
def test_graphed_equals_the_plain_gradient(on_cpu, strategy, batch, grads, reference):
    fm = model(torch.float64, "cpu")
    augment = Augment(strategy)
    graphed = GraphedGrad(grads, fm, augment)
    drawn = set()
    for seed in range(4):  # several plans through the same captures: different tokens per step
        images, labels, lr, theta0, target = problem(fm, seed, torch.float64, "cpu", soft=seed % 2 == 1)
        plan = plan_for(augment, seed, 5, batch, "cpu")
        drawn.update(p.tokens for p in plan.aug)
        ref = reference(fm, images, labels, lr, theta0, target, plan, augment)
        assert_close(graphed(images, labels, lr, theta0, target, plan), ref, 1e-9)
    assert strategy == "none" or len(drawn) >= 4  # the plans exercised most tokens
    assert graphed.captures == 2  # hard and soft labels: two input signatures


def test_graphed_float32_matches_to_float_rounding(on_cpu):
    fm = model(torch.float32, "cpu")
    augment = Augment()
    images, labels, lr, theta0, target = problem(fm, 1, torch.float32, "cpu")
    plan = plan_for(augment, 1, 4, None, "cpu")
    ref = unrolled_grad(fm, images, labels, lr, theta0, target, plan, augment)
    assert_close(GraphedGrad(unrolled_grads, fm, augment)(images, labels, lr, theta0, target, plan), ref, 1e-3)


def test_packed_plan_has_static_shapes_across_plans():
    augment = Augment()
    shapes = set()
    for seed in range(5):
        packed = plan_for(augment, seed, 5, 4, "cpu").packed(augment)
        shapes.add((packed.sizes, tuple(packed.indices.shape), tuple((tuple(t.shape), t.dtype) for t in packed.aug)))
    assert len(shapes) == 1


def test_graphed_refuses_cpu_tensors_and_learned_labels():
    fm = model(torch.float64, "cpu")
    images, labels, lr, theta0, target = problem(fm, 0, torch.float64, "cpu")
    plan = plan_for(Augment(), 0, 2, None, "cpu")
    with pytest.raises(ValueError, match="cuda device"):
        GraphedGrad(unrolled_grads, fm, Augment())(images, labels, lr, theta0, target, plan)
    soft = torch.rand(N_IMAGES, CLASSES, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="do not differentiate the labels"):
        GraphedGrad(unrolled_grads, fm, Augment())(images, soft, lr, theta0, target, plan)


@pytest.mark.parametrize("grad", ["unrolled", "tesla"])
def test_mtt_fast_on_trains_like_fast_off_on_cpu(on_cpu, tmp_path, grad):
    """MTT's --fast on hook (captures replayed eagerly): the same gradients as fast off, to float32 rounding."""
    from distillery.data import load_dataset
    from distillery.experts import train_experts
    from distillery.methods.mtt import MTT, MTTConfig

    ds = load_dataset("digits")
    store = train_experts(ds, "ConvNetD2W8", 1, epochs=2, out_dir=tmp_path / "store", progress=False)
    cfg = MTTConfig(ipc=1, model="ConvNetD2W8", syn_steps=3, expert_epochs=1, max_start_epoch=1, trajectories=2,
                    grad=grad)
    off, on = MTT(ds, store, cfg), MTT(ds, store, dataclasses.replace(cfg, fast="on"))
    for it in range(2):
        assert_close(on.gradient(it)[0], off.gradient(it)[0], 1e-3)
    assert on.graphed.captures == 1


@CUDA
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
@pytest.mark.parametrize("grads,reference", [(unrolled_grads, unrolled_grad), (tesla_grads, tesla_grad)])
def test_captured_graphs_replay_different_iterations(dtype, rtol, grads, reference):
    """Different plans (tokens), θ_start, θ* and labels through one captured graph (steps of 4 and 2 images)."""
    fm = model(dtype, "cuda")
    augment = Augment()
    graphed = GraphedGrad(grads, fm, augment)
    for seed in range(3):
        images, labels, lr, theta0, target = problem(fm, seed, dtype, "cuda", soft=True)
        plan = plan_for(augment, seed, 5, 4, "cuda")
        ref = reference(fm, images, labels, lr, theta0, target, plan, augment)
        assert_close(graphed(images, labels, lr, theta0, target, plan), ref, rtol)
    assert graphed.captures == 1


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
    assert on.graphed.captures == 1


def test_fast_is_off_by_default_and_refused_for_checkpointed_and_on_cpu():
    from distillery.distill import resolve_config
    from distillery.errors import UserError
    from distillery.methods.mtt import MTTConfig
    from distillery.config.validate import check_fast

    assert MTTConfig().fast == "off" and resolve_config("mtt", {"dataset": "digits"})["fast"] == "off"
    with pytest.raises(UserError, match="not --grad checkpointed"):  # MTT.check_config
        resolve_config("mtt", {"dataset": "digits", "fast": "on", "grad": "checkpointed"})
    with pytest.raises(UserError, match="--fast on replays captured CUDA graphs but the device is cpu"):
        check_fast(resolve_config("mtt", {"dataset": "digits", "fast": "on"}), "cpu")
