"""The closed-form instance norm equals nn.GroupNorm(C, C, affine=True): forward, grad and grad-of-grad (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from distillery.models import FunctionalModel, create_model
from distillery.models.instancenorm import InstanceNorm, InstanceNormFunction


def pair(c: int = 5) -> tuple[nn.GroupNorm, InstanceNorm]:
    """A GroupNorm(C, C) with random affine parameters and an InstanceNorm loaded from its state_dict."""
    torch.manual_seed(0)
    ref = nn.GroupNorm(c, c, affine=True).double()
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    new = InstanceNorm(c).double()
    new.load_state_dict(ref.state_dict())
    return ref, new


def test_same_parameters_names_and_order() -> None:
    ref, new = pair()
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [(n, p.shape) for n, p in new.named_parameters()]
    assert isinstance(new, nn.GroupNorm) and list(new.state_dict()) == list(ref.state_dict())


def test_forward_grad_and_grad_of_grad_equal_groupnorm() -> None:
    ref, new = pair()
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64, requires_grad=True)

    def derivatives(m: nn.Module) -> list[torch.Tensor]:
        y = m(x)
        first = torch.autograd.grad((y * y.sin()).sum(), [x, m.weight, m.bias], create_graph=True)
        gx, gw, gb = first
        second = torch.autograd.grad(gx.cos().sum() + gw.square().sum() + gb.sum() * gx.sum(), [x, m.weight, m.bias])
        plain = torch.autograd.grad((m(x) * 0.5).square().sum(), [x, m.weight, m.bias])  # first order, no graph
        return [y, *first, *second, *plain]

    for a, b in zip(derivatives(ref), derivatives(new)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def test_gradcheck_and_gradgradcheck() -> None:
    _, new = pair(3)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return InstanceNormFunction.apply(x, w, b, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, (x, new.weight, new.bias))
    assert torch.autograd.gradgradcheck(fn, (x, new.weight, new.bias))


def test_unrolled_convnet_matches_and_vmap_works() -> None:
    """A 2-step differentiable SGD unroll of ConvNetD2 (what MTT runs) gives the same image gradient, and
    vmap(grad) over two parameter vectors (the K-expert path) runs through the Function."""
    ref = create_model("ConvNetD2W8", 1, 3, (8, 8)).double()
    new = create_model("ConvNetD2W8", 1, 3, (8, 8)).double()
    for i, layer in enumerate(new.features):
        if isinstance(layer, nn.GroupNorm):
            new.features[i] = InstanceNorm(layer.num_channels).double()
    new.load_state_dict(ref.state_dict())
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def image_grad(m: nn.Module) -> torch.Tensor:
        fm = FunctionalModel(m)
        theta = fm.flatten(m).detach().requires_grad_(True)
        t = theta
        for _ in range(2):
            (g,) = torch.autograd.grad(nn.functional.cross_entropy(fm(t, x), y), t, create_graph=True)
            t = t - 0.1 * g
        return torch.autograd.grad(t.square().sum(), x)[0]

    torch.testing.assert_close(image_grad(new), image_grad(ref), rtol=1e-8, atol=1e-10)
    fm_ref, fm_new = FunctionalModel(ref), FunctionalModel(new)
    flats = torch.stack([fm_ref.flatten(ref).detach()] * 2)
    xs = torch.stack([x.detach()] * 2)
    loss = lambda fm: lambda f, xb: nn.functional.cross_entropy(fm(f, xb), y)  # noqa: E731
    torch.testing.assert_close(vmap(grad(loss(fm_new)))(flats, xs), vmap(grad(loss(fm_ref)))(flats, xs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float32_matches_groupnorm() -> None:
    ref, new = (m.float().cuda() for m in pair())
    x = torch.randn(4, 5, 8, 8, device="cuda", requires_grad=True)
    outs = []
    for m in (ref, new):
        gx, = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
        outs.append(torch.autograd.grad(gx.sin().sum(), [x, m.weight])[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_first_order_training_is_bit_identical_to_groupnorm() -> None:
    """Experts and evaluation (no create_graph) run the very kernels nn.GroupNorm runs: identical bits, float32."""
    torch.manual_seed(0)
    ref = create_model("ConvNetD2W8", 1, 3, (8, 8))
    for i, layer in enumerate(ref.features):
        if isinstance(layer, InstanceNorm):
            ref.features[i] = nn.GroupNorm(layer.num_channels, layer.num_channels)
    new = create_model("ConvNetD2W8", 1, 3, (8, 8))
    new.load_state_dict(ref.state_dict())
    assert isinstance(new.features[1], InstanceNorm) and type(ref.features[1]) is nn.GroupNorm
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 3
    grads = [torch.autograd.grad(nn.functional.cross_entropy(m(x), y), list(m.parameters())) for m in (ref, new)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
