"""Instance norm's double backward as one Triton kernel (`--norm-kernel triton`, CUDA).

The closed form of `instancenorm._InstanceNormBackward.backward` costs about 11 passes over the activations and
two dozen kernel launches per layer and inner step. This kernel does the same arithmetic in two passes over
x, g and u per (image, channel) row: one accumulates the five means ⟨u⟩, ⟨g⟩, ⟨u·x̂⟩, ⟨g·x̂⟩, ⟨u·g⟩, the other
writes ∂/∂g and ∂/∂x. Per-row ∂/∂w terms are summed over images in torch. Sums accumulate in float32, or in
float64 for float64 inputs. Tests run the kernel on the CPU through Triton's interpreter (`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCK = 1024  # elements of a row per loop iteration (32x32 CIFAR feature maps: one iteration)


@triton.jit
def _load_block(x_ptr, g_ptr, u_ptr, base, start, M, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Elements [start, start + BLOCK) of one row of x, g and u (zeros past M), their offsets and the mask."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < M
    x = tl.load(x_ptr + base + offs, mask=mask, other=0).to(ACC)
    g = tl.load(g_ptr + base + offs, mask=mask, other=0).to(ACC)
    u = tl.load(u_ptr + base + offs, mask=mask, other=0).to(ACC)
    return x, g, u, offs, mask


@triton.jit
def _double_backward_kernel(x_ptr, g_ptr, u_ptr, mean_ptr, rstd_ptr, w_ptr, a_ptr, beta_ptr,
                            grad_g_ptr, dx_ptr, grad_w_ptr, C, M,
                            BLOCK: tl.constexpr, ACC: tl.constexpr):
    """One program per (image, channel) row of M = H·W elements; the formulas of `_InstanceNormBackward`."""
    row = tl.program_id(0)
    c = row % C
    base = row.to(tl.int64) * M
    mu = tl.load(mean_ptr + row).to(ACC)
    r = tl.load(rstd_ptr + row).to(ACC)
    s_u = tl.zeros([BLOCK], ACC)
    s_g = tl.zeros([BLOCK], ACC)
    s_ux = tl.zeros([BLOCK], ACC)
    s_gx = tl.zeros([BLOCK], ACC)
    s_ug = tl.zeros([BLOCK], ACC)
    for start in range(0, M, BLOCK):
        x, g, u, offs, mask = _load_block(x_ptr, g_ptr, u_ptr, base, start, M, BLOCK, ACC)
        xh = (x - mu) * r  # masked lanes: u = g = 0, so they add nothing to any sum
        s_u += u
        s_g += g
        s_ux += u * xh
        s_gx += g * xh
        s_ug += u * g
    u_m = tl.sum(s_u, 0) / M
    g_m = tl.sum(s_g, 0) / M
    ux = tl.sum(s_ux, 0) / M
    gx = tl.sum(s_gx, 0) / M
    ug = tl.sum(s_ug, 0) / M
    w = tl.load(w_ptr + c).to(ACC)
    a = tl.load(a_ptr + c).to(ACC)
    beta = tl.load(beta_ptr + c).to(ACC)
    wr = w * r
    cov = ug - u_m * g_m - gx * ux
    k1 = a - wr * ux  # q = k1·g + k2·u
    k2 = -wr * gx
    q_m = k1 * g_m + k2 * u_m
    qx = k1 * gx + k2 * ux
    cx = -r * qx - r * wr * cov
    tl.store(grad_w_ptr + row, r * M * cov)
    for start in range(0, M, BLOCK):
        x, g, u, offs, mask = _load_block(x_ptr, g_ptr, u_ptr, base, start, M, BLOCK, ACC)
        xh = (x - mu) * r
        tl.store(grad_g_ptr + base + offs, (beta - wr * u_m) + k1 * xh + wr * u, mask=mask)
        tl.store(dx_ptr + base + offs, -r * q_m + cx * xh + r * k2 * u + r * k1 * g, mask=mask)


# Triton fixes at import whether kernels are compiled or run in its CPU interpreter (TRITON_INTERPRET=1: the tests)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def usable(x: Tensor) -> bool:
    """The kernel runs on plain CUDA tensors (on CPU ones only under the interpreter), not inside torch.func."""
    return ((x.device.type == "cuda" or (x.device.type == "cpu" and INTERPRETED))
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def double_backward(g: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                    u: Tensor, a: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(∂/∂g, ∂/∂x, ∂/∂w) of ⟨u, dx⟩ + ⟨a, dw⟩ + ⟨β, db⟩, with (dx, dw, db) instance norm's backward at (g, x, w)."""
    n, c = x.shape[:2]
    m = x[0, 0].numel()
    x, g, u = x.contiguous(), g.contiguous(), u.contiguous()
    grad_g, dx = torch.empty_like(x), torch.empty_like(x)
    grad_w = torch.empty((n, c), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(m), MAX_BLOCK)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    _double_backward_kernel[(n * c,)](x, g, u, mean.contiguous(), rstd.contiguous(), weight.contiguous(),
                                      a.contiguous(), beta.contiguous(), grad_g, dx, grad_w, c, m,
                                      BLOCK=block, ACC=acc, num_warps=4)
    return grad_g, dx, grad_w.sum(0).to(weight.dtype)
