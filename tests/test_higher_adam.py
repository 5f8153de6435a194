"""RaT-BPTT's window optimiser `--inner-adam higher` against a port of higher 0.2.1's DifferentiableAdam (SPEC P16).

The published code warms up with torch.optim.Adam and differentiates the window with higher 0.2.1, whose Adam puts
eps outside the bias correction: denom = sqrt(v) + eps, step = lr * sqrt(1 - b2^t) / (1 - b1^t) (read in the
higher-0.2.1 wheel's higher/optim.py; later GitHub revisions switched to torch's formula). The port below follows
that code line by line: a real nn.Module trained by torch.optim.Adam for the warm-up, then per-parameter tensors
with the moments copied from torch's optimiser state (copy_initial_weights=True), masking the gradient of v where
v == 0 as higher's `_maybe_mask` does.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from distillery.augment import Augment
from distillery.methods.bptt import InnerOptimizer, meta_gradient, sample_batch
from distillery.models import FunctionalModel
from distillery.models.convnet import ConvNet

C, IPC, LR = 3, 2, 0.01
D = torch.float64
AUG = Augment("flip_rotate", mode="S", align_corners=False)


def _masked(v: torch.Tensor) -> torch.Tensor:
    """higher's `_maybe_mask(exp_avg_sq, exp_avg_sq == 0)`: no gradient flows into v where v == 0."""
    mask = v == 0
    if v.requires_grad:
        v.register_hook(lambda g: torch.where(mask, torch.zeros_like(g), g))
    return v


def published_port(net, images, labels, start, window, real_x, real_y, seed):
    """Warm-up with torch.optim.Adam, window with higher 0.2.1's DifferentiableAdam, meta-loss; grad w.r.t. images."""
    net = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    for _ in range(start):  # base.py / distill_higher.py warm-up on the (detached) data
        opt.zero_grad()
        idx = sample_batch(C, IPC, C, IPC, gen)
        F.cross_entropy(net(AUG(images.detach()[idx], gen)), labels[idx]).backward()
        opt.step()
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in net.parameters()]  # copy_initial_weights=True
    state = []
    for p in net.parameters():
        s = opt.state.get(p, {})
        state.append({"step": float(s["step"]) if s else 0.0,
                      "exp_avg": s["exp_avg"].clone() if s else torch.zeros_like(p),
                      "exp_avg_sq": s["exp_avg_sq"].clone() if s else torch.zeros_like(p)})
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for _ in range(window):
        idx = sample_batch(C, IPC, C, IPC, gen)
        out = functional_call(net, dict(zip(names, params)), (AUG(images[idx], gen),))
        grads = torch.autograd.grad(F.cross_entropy(out, labels[idx]), params, create_graph=True)
        new = []
        for p, g, s in zip(params, grads, state):  # higher 0.2.1 optim.py, DifferentiableAdam._update
            s["step"] += 1
            s["exp_avg"] = exp_avg = s["exp_avg"] * beta1 + (1 - beta1) * g
            s["exp_avg_sq"] = exp_avg_sq = _masked(s["exp_avg_sq"] * beta2 + (1 - beta2) * g * g)
            denom = exp_avg_sq.sqrt() + eps
            bias_correction1 = 1 - beta1 ** s["step"]
            bias_correction2 = 1 - beta2 ** s["step"]
            step_size = LR * math.sqrt(bias_correction2) / bias_correction1
            new.append(torch.addcdiv(p, exp_avg, denom, value=-step_size))
        params = new
    out = functional_call(net, dict(zip(names, params)), (AUG(real_x, gen),))
    return torch.autograd.grad(F.cross_entropy(out, real_y), images)[0]


def setting():
    torch.manual_seed(0)  # test code only
    net = ConvNet(channels=1, num_classes=C, im_size=(8, 8), width=4, depth=2).double()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(C * IPC, 1, 8, 8, generator=g, dtype=D).requires_grad_(True)
    labels = torch.arange(C).repeat_interleave(IPC)
    real_x, real_y = torch.randn(12, 1, 8, 8, generator=g, dtype=D), torch.randint(C, (12,), generator=g)
    return net, images, labels, real_x, real_y


def ours(net, images, labels, real_x, real_y, start, window, adam):
    fm = FunctionalModel(net)
    warm = InnerOptimizer("adam", lr=LR)
    _, gx, _ = meta_gradient(fm, images, labels, fm.flatten(net).detach(), warm, start, window, real_x, real_y,
                             AUG, AUG, torch.Generator().manual_seed(5), num_classes=C,
                             window_optimizer=warm.with_adam(adam))
    return gx


@pytest.mark.parametrize("start,window", [(0, 3), (2, 3)])
def test_higher_adam_window_matches_the_published_port(start, window):
    net, images, labels, real_x, real_y = setting()
    ref = published_port(net, images, labels, start, window, real_x, real_y, seed=5)
    got = ours(net, images, labels, real_x, real_y, start, window, "higher")
    assert float((got - ref).abs().max()) < 1e-10 * float(ref.abs().max())
    torch_adam = ours(net, images, labels, real_x, real_y, start, window, "torch")
    # torch's formula gives another meta-gradient, so the comparison above can fail (most of all from step 0)
    assert float((torch_adam - ref).abs().max()) > 1e-6 * float(ref.abs().max())


def test_higher_and_torch_adam_formulas_differ_by_the_eps_placement():
    theta, grad = torch.zeros(4, dtype=D), torch.tensor([1e-6, 1e-4, 1e-2, 1.0], dtype=D)
    higher = InnerOptimizer("adam", lr=1.0, adam="higher")
    torch_ = InnerOptimizer("adam", lr=1.0, adam="torch")
    step_h = -higher.step(theta, grad, higher.init_state(theta))[0]
    step_t = -torch_.step(theta, grad, torch_.init_state(theta))[0]
    # step 1: torch gives g / (|g| + eps), higher gives g / (|g| + eps / sqrt(1 - 0.999)) (eps 31.6x larger)
    assert torch.allclose(step_t, grad / (grad.abs() + 1e-8), rtol=1e-12)
    assert torch.allclose(step_h, grad / (grad.abs() + 1e-8 / math.sqrt(1e-3)), rtol=1e-12)
