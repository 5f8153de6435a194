"""Instance norm with a cheaper double backward: GroupNorm(C, C, affine=True) with a closed-form autograd.Function.

y = (x - μ) · r · w + b per image and channel, μ and r = 1/sqrt(var + eps) over H x W. Forward and first-order
backward call the same fused kernels as `nn.GroupNorm` (`native_group_norm`, `native_group_norm_backward`), so
first-order training is unchanged. When the backward itself is differentiated (MTT/TESLA unroll the student's SGD:
`create_graph=True`), autograd's generic GroupNorm path runs `infinitely_differentiable_native_group_norm_backward`,
a long chain of reshapes and reductions; here the backward is instead the closed form

    x̂ = (x - μ)·r,  ĝ = g·w,  dx = r·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)),  dw = Σ g·x̂,  db = Σ g

written with differentiable torch ops, recomputing μ and r from x so the second derivative flows through them.
The module subclasses `nn.GroupNorm`: same parameters (`weight`, `bias`, shape (C,), that order), same state_dict,
same repr; expert stores and layout hashes do not change.

`norm_kernel("triton")` (`--norm-kernel triton`) runs that double backward as one fused Triton kernel
(`instancenorm_triton.py`) on CUDA tensors. The choice is per thread (a background evaluation keeps its own) and
is read at the forward, then carried to the backward, which CUDA autograd runs on a thread of its own.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


KERNELS = ("torch", "triton")
_chosen = threading.local()  # .kernel: the double backward's kernel for this thread's instance norms (norm_kernel)


@contextmanager
def norm_kernel(name: str) -> Iterator[None]:
    """Instance norms whose forward runs inside, in this thread, use `name` ("torch": closed form, "triton": one
    fused kernel)."""
    if name not in KERNELS:
        raise ValueError(f"norm kernel {name!r} is not one of {KERNELS}")
    previous, _chosen.kernel = _kernel(), name
    try:
        yield
    finally:
        _chosen.kernel = previous


def _kernel() -> str:
    """This thread's choice (torch unless inside `norm_kernel`)."""
    return getattr(_chosen, "kernel", "torch")


def triton_missing() -> str | None:
    """Why `--norm-kernel triton` cannot run here (Triton not importable), or None."""
    try:
        from . import instancenorm_triton  # noqa: F401
    except ImportError as e:
        return f"the triton package does not import ({e})"
    return None


def _fused_backward(grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                    mask: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dw, db) of GroupNorm(C, C) from the fused kernel `nn.GroupNorm` uses, those `mask` asks for."""
    n, c = x.shape[:2]
    return torch.ops.aten.native_group_norm_backward(grad.contiguous(), x.contiguous(), mean, rstd, weight, n, c,
                                                     math.prod(x.shape[2:]), c, mask)


class InstanceNormFunction(torch.autograd.Function):
    """GroupNorm(C, C) forward/backward with fused kernels; a closed-form, differentiable backward under create_graph.

    Returns (y, mean, rstd); only y is differentiable (mean and rstd feed the fused first-order backward).
    """

    generate_vmap_rule = True  # torch.func.vmap over experts: forward and backward are plain (batchable) aten ops

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        n, c = x.shape[:2]
        return torch.native_group_norm(x.contiguous(), weight, bias, n, c, math.prod(x.shape[2:]), c, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.eps = eps
        ctx.kernel = _kernel()

    @staticmethod
    def backward(ctx, grad: Tensor, _mean_grad: Tensor, _rstd_grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not torch.is_grad_enabled():  # first order: the fused kernel nn.GroupNorm uses
            dx, dw, db = _fused_backward(grad, x, weight, mean, rstd, [need_x, need_w, need_b])
            return dx, dw, db, None
        dx, dw, db = _InstanceNormBackward.apply(grad, x, weight, mean, rstd, ctx.kernel)  # create_graph
        return dx, dw, db, None


class _InstanceNormBackward(torch.autograd.Function):
    """The first-order backward as a function of (g, x, w), fused, with its own closed-form backward (the double
    backward of instance norm). Per image and channel, with ⟨·⟩ the mean over H x W, x̂ = (x - μ)·r, ĝ = g·w and
    upstream gradients (u, a, β) of (dx, dw, db):
        ∂/∂g = w·r·P(u) + a·x̂ + β,    ∂/∂w = Σ g·r·P(u),    P(v) = v - ⟨v⟩ - x̂·⟨v·x̂⟩,
        ∂/∂x = r·P(q) - r²·x̂·(⟨u·ĝ⟩ - ⟨u⟩⟨ĝ⟩ - ⟨ĝ·x̂⟩⟨u·x̂⟩),    q = a·g - r·(⟨u·x̂⟩·ĝ + ⟨ĝ·x̂⟩·u).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                kernel: str) -> tuple[Tensor, Tensor, Tensor]:
        return _fused_backward(grad, x, weight, mean, rstd, [True, True, True])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:5])
        ctx.kernel = inputs[5]

    @staticmethod
    @once_differentiable  # a third derivative is refused rather than silently wrong
    def backward(ctx, u: Tensor, a: Tensor, beta: Tensor) -> tuple[Tensor | None, ...]:
        # Every result is c1·u + c2·g + c3·x̂ + c4 with per-(image, channel) coefficients built from five means
        # ⟨u⟩, ⟨g⟩, ⟨u·x̂⟩, ⟨g·x̂⟩, ⟨u·g⟩: about 11 passes over the activations (memory traffic is the cost).
        g, x, weight, mean, rstd = ctx.saved_tensors
        if ctx.kernel == "triton":
            from . import instancenorm_triton
            if instancenorm_triton.usable(x):
                grad_g, dx, grad_w = instancenorm_triton.double_backward(g, x, weight, mean, rstd, u, a, beta)
                return grad_g, dx, grad_w, None, None, None
        shape, m = x.shape, math.prod(x.shape[2:])
        x, g, u = x.flatten(2), g.flatten(2), u.flatten(2)
        r = rstd
        xhat = torch.addcmul((-mean * r)[..., None], x, r[..., None])
        u_m, g_m = u.mean(2), g.mean(2)
        ux, gx, ug = (torch.linalg.vecdot(p, q) / m for p, q in ((u, xhat), (g, xhat), (u, g)))
        w, a, beta = weight[None], a[None], beta[None]
        wr = w * r
        cov = ug - u_m * g_m - gx * ux
        grad_g = torch.addcmul(torch.addcmul((beta - wr * u_m)[..., None], (a - wr * ux)[..., None], xhat),
                               wr[..., None], u)
        grad_w = (r * m * cov).sum(0)
        k1, k2 = a - wr * ux, -wr * gx  # q = k1·g + k2·u
        q_m, qx = k1 * g_m + k2 * u_m, k1 * gx + k2 * ux
        cx = -r * qx - r * wr * cov
        dx = torch.addcmul(torch.addcmul(torch.addcmul((-r * q_m)[..., None], cx[..., None], xhat),
                                         (r * k2)[..., None], u), (r * k1)[..., None], g)
        return grad_g.view(shape), dx.view(shape), grad_w, None, None, None


class InstanceNorm(nn.GroupNorm):
    """`nn.GroupNorm(C, C, affine=True)` (the reference's instance norm) running `InstanceNormFunction`."""

    def __init__(self, num_channels: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__(num_channels, num_channels, eps=eps, affine=True, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise each image's channels over H x W, then scale and shift per channel."""
        return InstanceNormFunction.apply(x, self.weight, self.bias, self.eps)[0]
