"""RaT-BPTT's chunked real-batch meta-gradient equals the unchunked one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillery.methods.bptt import InnerOptimizer, meta_gradient, real_loss_grad
from distillery.models import FunctionalModel, create_model


def setup() -> tuple[FunctionalModel, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    fm = FunctionalModel(create_model("ConvNetD2W8", 1, 3, (8, 8)).double())
    theta0 = fm.flatten(fm.module).detach()
    images = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.arange(3).repeat_interleave(2)
    real_x = torch.randn(50, 1, 8, 8, generator=g, dtype=torch.float64)
    return fm, theta0, images, labels, real_x, torch.randint(0, 3, (50,), generator=g)


def test_chunked_meta_gradient_equals_unchunked() -> None:
    fm, theta0, images, labels, real_x, real_y = setup()

    def run(chunk: int | None) -> tuple[float, torch.Tensor]:
        loss, grad, _ = meta_gradient(fm, images, labels, theta0, InnerOptimizer("adam", 1e-2), 1, 2, real_x, real_y,
                                      None, None, torch.Generator().manual_seed(1), num_classes=3, real_chunk=chunk)
        return loss, grad

    whole_loss, whole = run(None)
    for chunk in (7, 16, 50):
        loss, grad = run(chunk)
        assert abs(loss - whole_loss) < 1e-12
        torch.testing.assert_close(grad, whole, rtol=1e-10, atol=1e-13)
    assert whole.abs().sum() > 0


def test_one_chunk_is_bit_identical_to_the_direct_gradient() -> None:
    fm, theta0, images, _, real_x, real_y = setup()
    theta = theta0 + 0.01 * images.sum()  # depends on the images, like the window's output
    direct = torch.autograd.grad(F.cross_entropy(fm(theta, real_x), real_y), images, retain_graph=True)[0]
    _, grad_theta = real_loss_grad(fm, theta, real_x, real_y, None)
    assert torch.equal(torch.autograd.grad(theta, images, grad_outputs=grad_theta)[0], direct)


def test_in_place_warm_up_equals_the_formula() -> None:
    """The torch.optim (foreach) warm-up equals InnerOptimizer.step's formula: parameters and state, float64."""
    from functools import partial

    from distillery.methods.bptt import draw_plan, sample_batch, warm_up, warm_up_step

    fm, theta0, images, labels, _, _ = setup()
    draw = partial(sample_batch, 3, 2, 3, 2)
    for opt in (InnerOptimizer("adam", 1e-2), InnerOptimizer("sgd", 1e-2)):
        theta, state = warm_up(fm, images, labels, theta0, opt, 4, draw, None, torch.Generator().manual_seed(2))
        ref, ref_state = theta0.clone(), opt.init_state(theta0)
        plan = draw_plan(4, draw, None, images, torch.Generator().manual_seed(2))
        for i in range(4):
            warm_up_step(fm, opt, images.detach(), labels, ref, ref_state, plan, i, None)
        # torch.optim keeps Adam's step count in float32, so its bias corrections are float32: ~1e-8 relative
        torch.testing.assert_close(theta, ref, rtol=1e-7, atol=1e-9)
        assert state.keys() == ref_state.keys()
        for key in state:
            torch.testing.assert_close(state[key], ref_state[key], rtol=1e-7, atol=1e-9)
        assert not torch.allclose(theta, theta0)


def test_one_cpu_thread_at_32x32_runs_the_real_batch_in_cached_chunks(monkeypatch) -> None:
    """On one CPU thread the 32x32 meta-loss runs `cpu_chunk` images at a time: the same loss and gradient (float64,
    to rounding) as one chunk, which is what several threads run."""
    import distillery.methods.bptt as bptt

    g = torch.Generator().manual_seed(0)
    fm = FunctionalModel(create_model("ConvNetD1W8", 3, 3, (32, 32)).double())
    theta = fm.flatten(fm.module).detach()
    x, y = torch.randn(70, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 3, (70,), generator=g)
    seen, ce = [], F.cross_entropy
    monkeypatch.setattr(bptt.F, "cross_entropy", lambda out, *a, **k: seen.append(len(out)) or ce(out, *a, **k))
    loss, grad = real_loss_grad(fm, theta, x, y, 1000)
    assert torch.get_num_threads() == 1 and seen == [32, 32, 6]
    seen.clear()
    monkeypatch.setattr(bptt, "cpu_chunk", lambda x: None)  # several threads: the whole batch at once
    whole_loss, whole = real_loss_grad(fm, theta, x, y, 1000)
    assert seen == [70]
    torch.testing.assert_close(loss, whole_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, whole, rtol=1e-10, atol=1e-14)
