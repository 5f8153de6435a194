"""`--norm-kernel triton`: the fused Triton double backward equals the closed form (torch ops), on the CPU through
Triton's interpreter and, where there is a GPU, compiled on CUDA."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from distillery.augment import Augment  # noqa: E402
from distillery.methods.mtt import GRADS  # noqa: E402
from distillery.methods.trajectory import make_plan  # noqa: E402
from distillery.models import FunctionalModel, create_model  # noqa: E402
from distillery.models import instancenorm_triton  # noqa: E402
from distillery.models.instancenorm import InstanceNormFunction, norm_kernel  # noqa: E402


@pytest.fixture
def interpreter():
    """Triton kernels run on CPU tensors in its interpreter (conftest.py sets it up where there is no GPU)."""
    if not instancenorm_triton.INTERPRETED:
        pytest.skip("Triton compiles for the GPU here; the CUDA test covers the kernel")


def second_derivatives(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                       kernel: str | None) -> list[torch.Tensor]:
    """d/d(x, w, b) of a loss on instance norm's first derivatives (create_graph), all three upstream terms used;
    with `kernel` None, under the caller's (this thread's) choice."""
    x, w, b = (t.detach().requires_grad_(True) for t in (x, w, b))
    with norm_kernel(kernel) if kernel else contextlib.nullcontext():
        y = InstanceNormFunction.apply(x, w, b, 1e-5)[0]
    gx, gw, gb = torch.autograd.grad((y * y.sin()).sum(), [x, w, b], create_graph=True)
    return list(torch.autograd.grad(gx.cos().sum() + gw.square().sum() + gb.sum() * gx.sum(), [x, w, b]))


@pytest.mark.parametrize("shape", [(3, 5, 6, 7), (2, 3, 40, 40), (4, 2, 1, 1)],
                         ids=["odd-row", "rows-longer-than-a-block", "one-pixel"])
def test_kernel_equals_closed_form_float64(interpreter, shape) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    w, b = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    ref, new = second_derivatives(x, w, b, "torch"), second_derivatives(x, w, b, "triton")
    for a, c in zip(ref, new):
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-10)


def test_kernel_runs_when_chosen_and_not_otherwise(counted) -> None:
    calls = counted
    x, w, b = torch.randn(2, 3, 4, 4), torch.randn(3), torch.randn(3)
    second_derivatives(x, w, b, "torch")
    assert calls == []
    second_derivatives(x, w, b, "triton")
    assert calls == [1]
    with pytest.raises(ValueError, match="not one of"):
        with norm_kernel("cuda"):
            pass


def test_the_choice_is_per_thread(counted) -> None:
    """A background evaluation thread keeps the torch path while the main thread distils with the kernel."""
    import threading

    calls = counted
    x, w, b = torch.randn(2, 3, 4, 4), torch.randn(3), torch.randn(3)
    with norm_kernel("triton"):
        other = threading.Thread(target=second_derivatives, args=(x, w, b, None))
        other.start()
        other.join()
        assert calls == []
        second_derivatives(x, w, b, None)
    assert calls == [1]


def test_not_used_inside_torch_func_or_on_the_cpu_when_compiled(interpreter, monkeypatch) -> None:
    assert instancenorm_triton.usable(torch.zeros(2, 2, 2, 2))
    monkeypatch.setattr(instancenorm_triton, "INTERPRETED", False)
    assert not instancenorm_triton.usable(torch.zeros(2, 2, 2, 2))  # compiled Triton: the closed form on the CPU
    monkeypatch.setattr(instancenorm_triton, "INTERPRETED", True)
    seen = []
    torch.func.vmap(lambda t: seen.append(instancenorm_triton.usable(t)) or t)(torch.zeros(3, 2, 2, 2, 2))
    assert seen == [False]


def mtt_gradient(kernel: str, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """One unrolled MTT segment (ConvNet, DSA, 3 student steps): the image and step-size gradients."""
    torch.manual_seed(0)
    model = create_model("ConvNetD2W8", 3, 4, (12, 12)).to(device, dtype)
    fm = FunctionalModel(model)
    theta_start = fm.flatten(model).detach()
    theta_target = theta_start + 0.01 * torch.randn_like(theta_start)
    images = torch.randn(8, 3, 12, 12, device=device, dtype=dtype)
    labels = torch.arange(8, device=device) % 4
    lr = torch.tensor(0.01, device=device, dtype=dtype)
    augment = Augment("color_crop_cutout_flip_scale_rotate")
    plan = make_plan(8, 3, 4, augment, torch.Generator(device).manual_seed(1), (12, 12), device)
    with norm_kernel(kernel):
        res = GRADS["unrolled"](fm, images, labels, lr, theta_start, theta_target, plan, augment)
    return [res.grad_images, res.grad_lr, torch.tensor(res.loss)]


def test_mtt_unroll_gradient_equal(interpreter) -> None:
    for a, c in zip(mtt_gradient("torch", "cpu", torch.float64), mtt_gradient("triton", "cpu", torch.float64)):
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_kernel_equals_closed_form() -> None:
    torch.manual_seed(0)
    for shape in [(10, 128, 32, 32), (10, 128, 16, 16), (7, 3, 5, 9), (2, 4, 64, 64)]:
        x = torch.randn(*shape, device="cuda", dtype=torch.float64)
        w, b = torch.randn(shape[1], device="cuda", dtype=torch.float64), torch.randn(shape[1], device="cuda",
                                                                                       dtype=torch.float64)
        for a, c in zip(second_derivatives(x, w, b, "torch"), second_derivatives(x, w, b, "triton")):
            torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-10)
    for a, c in zip(mtt_gradient("torch", "cuda", torch.float32), mtt_gradient("triton", "cuda", torch.float32)):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


@pytest.fixture
def counted(interpreter, monkeypatch):
    """Counts the fused kernel's calls (on the CPU: the interpreter)."""
    calls = []
    real = instancenorm_triton.double_backward
    monkeypatch.setattr(instancenorm_triton, "double_backward", lambda *a: calls.append(1) or real(*a))
    return calls


def test_mtt_and_tesla_use_the_kernel_they_are_given(counted, tmp_path) -> None:
    """--norm-kernel reaches the unroll (MTT) and TESLA's pass 2: same gradient as torch, kernel called only then."""
    import dataclasses

    from distillery.data import load_dataset
    from distillery.experts import train_experts
    from distillery.methods.mtt import MTT, MTTConfig

    ds = load_dataset("digits")
    store = train_experts(ds, "ConvNetD2W8", num_experts=1, epochs=2, lr=0.05, batch=256, seed=1,
                          out_dir=tmp_path / "e", progress=False)
    base = MTTConfig(ipc=1, model="ConvNetD2W8", syn_steps=2, expert_epochs=1, max_start_epoch=1, seed=2)
    for cfg in (base, dataclasses.replace(base, grad="tesla")):
        ref, _ = MTT(ds, store, cfg).gradient(0)
        assert counted == []
        new, _ = MTT(ds, store, dataclasses.replace(cfg, norm_kernel="triton")).gradient(0)
        assert len(counted) > 0
        counted.clear()
        torch.testing.assert_close(new.grad_images, ref.grad_images, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(new.grad_lr, ref.grad_lr, rtol=1e-4, atol=1e-7)


def test_ratbptt_window_uses_the_kernel_it_is_given(counted) -> None:
    from test_ratbptt import fake_dataset, small_config

    from distillery.methods.ratbptt import RaTBPTT

    images = []
    for kernel in ("torch", "triton"):
        m = RaTBPTT(fake_dataset(), small_config(norm_kernel=kernel))
        m.step(0)
        images.append(m.images.detach())
        assert (len(counted) > 0) == (kernel == "triton")
    torch.testing.assert_close(images[1], images[0], rtol=1e-5, atol=1e-6)


def test_captured_function_with_the_kernel_equals_the_plain_path(counted) -> None:
    """What `--fast on --norm-kernel triton` captures for MTT (`unrolled_grads` on a packed plan), run eagerly with
    the kernel, equals the plain path with the torch closed form (float64)."""
    from test_graphed import assert_close as assert_mtt_close
    from test_graphed import model, plan_for, problem

    from distillery.methods.trajectory import unrolled_grad

    fm, augment = model(torch.float64, "cpu"), Augment()
    images, labels, lr, theta0, target = problem(fm, 1, torch.float64, "cpu")
    plan = plan_for(augment, 1, 3, 4, "cpu")
    ref = unrolled_grad(fm, images, labels, lr, theta0, target, plan, augment)
    with norm_kernel("triton"):
        got = unrolled_grad(fm, images, labels, lr, theta0, target, plan.packed(augment), augment)
    assert len(counted) > 0
    assert_mtt_close(got, ref, 1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_the_kernel() -> None:
    """`--fast on --norm-kernel triton`: the Triton launches are captured in MTT's graph and replay correctly."""
    from test_graphed import assert_close as assert_mtt_close
    from test_graphed import model, plan_for, problem

    from distillery.methods.graphed import GraphedGrad
    from distillery.methods.trajectory import unrolled_grad, unrolled_grads

    fm, augment = model(torch.float64, "cuda"), Augment()
    graphed = GraphedGrad(unrolled_grads, fm, augment)
    for seed in range(3):
        images, labels, lr, theta0, target = problem(fm, seed, torch.float64, "cuda")
        plan = plan_for(augment, seed, 5, 4, "cuda")
        ref = unrolled_grad(fm, images, labels, lr, theta0, target, plan, augment)
        with norm_kernel("triton"):
            got = graphed(images, labels, lr, theta0, target, plan)
        assert_mtt_close(got, ref, 1e-9)
    assert graphed.captures == 1


def test_op_count_benchmark_orders_the_three_paths() -> None:
    """benchmarks/op_count.py runs, and a student step costs fewer compute operators with the closed form than with
    nn.GroupNorm, and fewer again with the Triton kernel (counts, not times: they hold on any machine)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "op_count.py"
    out = subprocess.run([sys.executable, str(script), "--width", "4", "--images", "2", "--steps", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = re.findall(r"^\| (nn.GroupNorm|InstanceNorm, closed form|InstanceNorm, Triton)[^|]* \| (\d+) \| (\d+) \|",
                      out, re.M)
    compute = [int(c) for _, _, c in rows]
    assert len(compute) == 3 and compute[0] > compute[1] > compute[2] > 0, out
