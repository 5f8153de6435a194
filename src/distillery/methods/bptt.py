"""The RaT-BPTT meta-gradient (SPEC §6.2): a fresh network trained on the synthetic set, its loss on a real batch
differentiated with respect to the synthetic images (and learned labels).

    warm-up   `start` inner steps on DETACHED images/labels, no graph (SPEC P13)
    window    `window` inner steps that keep the graph, starting from detached warm-up weights and detached optimizer
              moments (the semantics of higher's copy_initial_weights=True, SPEC P16)
    meta-loss cross-entropy of the final weights on the augmented real batch (hard labels), right after the window

The inner gradient is `torch.autograd.grad(..., create_graph=True)` on a flat parameter vector run through
`FunctionalModel` (torch.func.functional_call), and the inner optimizer (`InnerOptimizer`) is Adam or SGD written
with plain tensor ops, so the window is differentiable end to end. Memory grows with the window W, not with the
horizon T; compute grows with start + W. As published, the warm-up runs torch's Adam and the window higher 0.2.1's
DifferentiableAdam, whose eps sits outside the bias correction (`--inner-adam higher`, SPEC P16; `torch`: both
torch's). Window placement (`window_start`, SPEC §6.4) and inner batches (`sample_batch`, SPEC §6.3) are here too;
the method object around them is `ratbptt.RaTBPTT`, the captured-graph version `graphed.GraphedRat`.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..evaluation.training import cpu_chunk
from ..models import FunctionalModel
from .trajectory import PackedPlan, StepPlan

if TYPE_CHECKING:
    from ..augment import Augment, AugParams

BatchDraw = Callable[[torch.Generator], Tensor]


# --- inner optimizer -------------------------------------------------------------------------------------------------
class InnerOptimizer:
    """Adam or SGD on a flat parameter vector, written with plain tensor ops so unrolled steps stay differentiable.

    Same update as torch.optim.Adam (PyTorch bias correction, weight decay 0 by default) and torch.optim.SGD
    (momentum 0.9, dampening 0, weight decay 5e-4 by default, as the RaT-BPTT code). The state is a dict of tensors.
    `adam="higher"` is higher 0.2.1's DifferentiableAdam instead (SPEC P16), the optimiser the published code
    differentiates: denom = sqrt(v) + eps and step lr * sqrt(bc2) / bc1, i.e. eps / sqrt(bc2) in torch's terms
    (31.6x torch's eps at step 1, converging to it as the step count grows).
    """

    def __init__(self, kind: str = "adam", lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, momentum: float = 0.9, weight_decay: float | None = None, adam: str = "torch"):
        if kind not in ("adam", "sgd"):
            raise UserError(f"unknown inner optimizer '{kind}'; use adam or sgd")
        if adam not in ("torch", "higher"):
            raise UserError(f"unknown --inner-adam '{adam}'; use higher or torch")
        self.kind, self.lr, self.betas, self.eps, self.momentum, self.adam = kind, lr, betas, eps, momentum, adam
        self.weight_decay = (0.0 if kind == "adam" else 5e-4) if weight_decay is None else weight_decay

    def __repr__(self) -> str:
        """Constructor-style description for logs."""
        adam = f", adam={self.adam!r}" if self.kind == "adam" else ""
        return f"InnerOptimizer(kind={self.kind!r}, lr={self.lr}, weight_decay={self.weight_decay}{adam})"

    def with_adam(self, adam: str) -> "InnerOptimizer":
        """The same optimiser with the other Adam formula (torch or higher)."""
        return InnerOptimizer(self.kind, self.lr, self.betas, self.eps, self.momentum, self.weight_decay, adam)

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        """Zero moments (and step count) for parameters shaped like `theta`."""
        if self.kind == "sgd":
            return {"momentum_buffer": torch.zeros_like(theta)}
        return {"step": torch.zeros((), dtype=theta.dtype, device=theta.device),
                "exp_avg": torch.zeros_like(theta), "exp_avg_sq": torch.zeros_like(theta)}

    def step(self, theta: Tensor, grad: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """New parameters and state after one update; differentiable when `grad` carries a graph."""
        if self.weight_decay:
            grad = grad + self.weight_decay * theta
        if self.kind == "sgd":  # torch sets the buffer to grad on the first step: the same as momentum * 0 + grad
            buf = self.momentum * state["momentum_buffer"] + grad
            return theta - self.lr * buf, {"momentum_buffer": buf}
        beta1, beta2 = self.betas
        step = state["step"] + 1
        exp_avg = beta1 * state["exp_avg"] + (1 - beta1) * grad
        exp_avg_sq = beta2 * state["exp_avg_sq"] + (1 - beta2) * grad * grad
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        if self.adam == "higher":  # higher 0.2.1 optim.py DifferentiableAdam._update
            theta = theta - self.lr * torch.sqrt(bc2) / bc1 * exp_avg / (_sqrt_zero_grad(exp_avg_sq) + self.eps)
        else:
            theta = theta - self.lr / bc1 * exp_avg / (_sqrt_zero_grad(exp_avg_sq) / torch.sqrt(bc2) + self.eps)
        return theta, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _sqrt_zero_grad(v: Tensor) -> Tensor:
    """sqrt(v) whose derivative is 0 where v == 0 (plain sqrt gives inf * 0 = NaN for parameters with zero grad)."""
    positive = v > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))), torch.zeros_like(v))


# --- sampling ---------------------------------------------------------------------------------------------------------
def sample_batch(num_classes: int, ipc: int, task_sampler_nc: int, batch_per_class: int,
                 generator: torch.Generator) -> Tensor:
    """Indices of one inner mini-batch of a class-blocked set (SPEC §6.3), on the generator's device.

    All classes, or `task_sampler_nc` random classes (sorted) when fewer; from each, min(ipc, batch_per_class)
    distinct random images, in increasing index order like the reference `subsample`.
    """
    device = generator.device
    if task_sampler_nc >= num_classes:
        classes = torch.arange(num_classes, device=device)
    else:
        classes = torch.randperm(num_classes, generator=generator, device=device)[:task_sampler_nc].sort().values
    k = min(ipc, batch_per_class)
    picks = torch.rand(len(classes), ipc, generator=generator, device=device).argsort(dim=1)[:, :k]
    return (picks.sort(dim=1).values + classes[:, None] * ipc).reshape(-1)


def check_window(horizon: int, window: int, min_start: int) -> None:
    """UserError unless 1 <= W <= T and 0 <= m <= T - W."""
    if not 1 <= window <= horizon:
        raise UserError(f"--window {window} must be between 1 and --horizon {horizon}; "
                        "lower --window or raise --horizon")
    if not 0 <= min_start <= horizon - window:
        raise UserError(f"--min-start {min_start} must be between 0 and horizon - window = {horizon - window}; "
                        "lower --min-start or raise --horizon")


def window_start(min_start: int, horizon: int, window: int, generator: torch.Generator) -> int:
    """Start of the differentiable window, uniform on {m, ..., T-W} inclusive (SPEC §6.4, cctype 2)."""
    check_window(horizon, window, min_start)
    return int(torch.randint(min_start, horizon - window + 1, (1,), generator=generator, device=generator.device))


def window_period(it: int, resample: str, steps_per_epoch: int) -> int:
    """Which draw of the window start outer step `it` uses: one per step, or one per epoch of real data (P14)."""
    if resample == "step":
        return it
    if resample == "epoch":
        return it // steps_per_epoch
    raise UserError(f"unknown --window-resample '{resample}'; use step or epoch")


# --- the meta-gradient ------------------------------------------------------------------------------------------------
def draw_plan(steps: int, draw: BatchDraw, augment: Augment | None, images: Tensor,
              generator: torch.Generator) -> StepPlan:
    """`steps` inner steps' batch indices and per-image DSA draws, in the reference's order (indices, then
    augmentation, step after step); drawing them ahead of the steps leaves every draw as it was."""
    indices: list[Tensor] = []
    aug: list[AugParams | None] = []
    for _ in range(steps):
        indices.append(draw(generator))
        aug.append(None if augment is None else
                   augment.sample(len(indices[-1]), generator, images.shape[-2:], device=images.device))
    return StepPlan(indices, aug)


def warm_up_step(fm: FunctionalModel, optimizer: InnerOptimizer, images: Tensor, labels: Tensor, theta: Tensor,
                 state: dict[str, Tensor], plan: StepPlan | PackedPlan, i: int, augment: Augment | None) -> None:
    """Inner step i of `plan` with `optimizer`'s formula, updating `theta` and `state` in place: first-order, no
    graph to the images, no host read (with a `PackedPlan`, what `--fast on` captures and replays per step)."""
    point = theta.detach().requires_grad_(True)
    x, y = plan.batch(i, images, labels, augment)
    (grad,) = torch.autograd.grad(F.cross_entropy(fm(point, x), y), point)
    new_theta, new_state = optimizer.step(theta, grad, state)
    theta.copy_(new_theta)
    for key, value in new_state.items():
        state[key].copy_(value)


def warm_up(fm: FunctionalModel, images: Tensor, labels: Tensor, theta: Tensor, optimizer: InnerOptimizer,
            steps: int, draw: BatchDraw, augment: Augment | None,
            generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """Train `steps` inner steps on detached images and labels: no graph reaches the synthetic data (SPEC P13).

    torch's Adam and SGD run as torch.optim's in-place foreach (CUDA: fused) step; the formula is the same as
    `InnerOptimizer.step` up to float rounding (tested), and the state continues into the window unchanged."""
    images, labels, theta = images.detach(), labels.detach(), theta.detach()
    plan = draw_plan(steps, draw, augment, images, generator)
    if steps and (optimizer.kind == "sgd" or optimizer.adam == "torch"):
        return _warm_up_in_place(fm, images, labels, theta, optimizer, plan, augment)
    theta, state = theta.clone(), optimizer.init_state(theta)
    for i in range(steps):
        warm_up_step(fm, optimizer, images, labels, theta, state, plan, i, augment)
    return theta, state


def _warm_up_in_place(fm: FunctionalModel, images: Tensor, labels: Tensor, theta: Tensor, optimizer: InnerOptimizer,
                      plan: StepPlan, augment: Augment | None) -> tuple[Tensor, dict[str, Tensor]]:
    """`warm_up` with torch.optim's in-place step; returns InnerOptimizer's state."""
    theta = theta.clone().requires_grad_(True)
    fast = {"fused": True} if theta.device.type == "cuda" else {"foreach": True}
    if optimizer.kind == "sgd":
        opt = torch.optim.SGD([theta], lr=optimizer.lr, momentum=optimizer.momentum,
                              weight_decay=optimizer.weight_decay, **fast)
    else:
        opt = torch.optim.Adam([theta], lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                               weight_decay=optimizer.weight_decay, **fast)
    for i in range(plan.steps):
        x, y = plan.batch(i, images, labels, augment)
        (theta.grad,) = torch.autograd.grad(F.cross_entropy(fm(theta, x), y), theta)
        opt.step()
    state = {k: torch.as_tensor(v, dtype=theta.dtype, device=theta.device).detach() for k, v in opt.state[theta].items()}
    return theta.detach(), state


def window_grads(fm: FunctionalModel, optimizer: InnerOptimizer, images: Tensor, labels: Tensor, learn_labels: bool,
                 theta: Tensor, state: dict[str, Tensor], plan: StepPlan | PackedPlan, augment: Augment | None,
                 real_x: Tensor, real_y: Tensor, real_chunk: int | None) -> tuple[Tensor, ...]:
    """(meta-loss, ∂/∂images[, ∂/∂labels]) of the window: `plan`'s inner steps with a graph, from θ and optimizer
    state taken as constants (gradients reach neither the warm-up nor the initialisation, SPEC P16), the meta-loss
    on the (augmented) real batch, one backward through the window. Tensors only, no host read: with a `PackedPlan`
    it is what `--fast on` captures."""
    x = images.detach().requires_grad_(True)
    y = labels.detach().requires_grad_(learn_labels)
    theta = theta.detach().requires_grad_(True)
    state = {key: value.detach().to(theta.dtype) for key, value in state.items()}
    for i in range(plan.steps):
        # Learned labels are (n, C) floats: cross_entropy uses them directly as probability targets (SPEC §6.5).
        batch, target = plan.batch(i, x, y, augment)
        (grad,) = torch.autograd.grad(F.cross_entropy(fm(theta, batch), target), theta, create_graph=True)
        theta, state = optimizer.step(theta, grad, state)
    meta_loss, grad_theta = real_loss_grad(fm, theta, real_x, real_y, real_chunk)
    return (meta_loss, *torch.autograd.grad(theta, [x, y] if learn_labels else [x], grad_outputs=grad_theta))


def meta_gradient(fm: FunctionalModel, images: Tensor, labels: Tensor, theta0: Tensor, optimizer: InnerOptimizer,
                  start: int, window: int, real_x: Tensor, real_y: Tensor, augment_syn: Augment | None,
                  augment_real: Augment | None, generator: torch.Generator, *, num_classes: int,
                  task_sampler_nc: int | None = None, batch_per_class: int | None = None,
                  window_optimizer: InnerOptimizer | None = None,
                  real_chunk: int | None = None) -> tuple[float, Tensor, Tensor | None]:
    """RaT-BPTT meta-loss and its gradient w.r.t. the images (and the labels if they require grad), SPEC §6.2.

    `images`/`labels` are the whole class-blocked synthetic set; `theta0` the initial flat parameters. Draws from
    `generator`, in order: for each of the start + window inner steps the batch indices then its augmentation,
    finally the real batch's augmentation. `.grad` of the inputs is not touched. The warm-up uses `optimizer`, the
    window `window_optimizer` (default: the same), as the published code runs torch's Adam, then higher's.
    The real-batch meta-loss is differentiated `real_chunk` images at a time (`real_loss_grad`).
    """
    ipc = len(images) // num_classes
    draw = partial(sample_batch, num_classes, ipc, task_sampler_nc or num_classes, batch_per_class or ipc)
    theta, state = warm_up(fm, images, labels, theta0, optimizer, start, draw, augment_syn, generator)
    plan = draw_plan(window, draw, augment_syn, images, generator)
    if augment_real is not None:
        real_x = augment_real(real_x, generator)
    learn = labels.requires_grad
    meta_loss, *grads = window_grads(fm, window_optimizer or optimizer, images, labels, learn, theta, state, plan,
                                     augment_syn, real_x, real_y, real_chunk)
    return float(meta_loss), grads[0], grads[1] if learn else None


def real_loss_grad(fm: FunctionalModel, theta: Tensor, x: Tensor, y: Tensor,
                   chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of θ on (x, y) and its gradient w.r.t. θ, `chunk` images at a time, so that only one
    chunk's activations live at once (the 5000-image meta-loss otherwise holds them all). On one CPU thread at 32x32
    and above, chunks of at most `cpu_chunk` images keep the activations in cache (a CIFAR-10 step 1.2x faster).
    One chunk (chunk None or >= len(x)) is bit-identical to differentiating the unchunked loss."""
    cache = cpu_chunk(x)
    if cache is not None:
        chunk = cache if chunk is None else min(chunk, cache)
    leaf = theta.detach().requires_grad_(True)
    if chunk is None or chunk >= len(x):
        loss = F.cross_entropy(fm(leaf, x), y)
        return loss.detach(), torch.autograd.grad(loss, leaf)[0]
    total, grad = leaf.new_zeros(()), torch.zeros_like(leaf)
    for i in range(0, len(x), chunk):
        loss = F.cross_entropy(fm(leaf, x[i:i + chunk]), y[i:i + chunk], reduction="sum") / len(x)
        grad += torch.autograd.grad(loss, leaf)[0]
        total += loss.detach()
    return total, grad
