"""RaT-BPTT, Random Truncated Backpropagation Through Time (Feng, Vedantam, Kempe, ICLR 2024; SPEC §6).

One outer step trains a freshly initialised network on the synthetic set and differentiates its loss on a real
batch with respect to the synthetic images (and learned labels):

    warm-up   `start` inner steps on DETACHED images/labels, no graph (SPEC P13)
    window    `window` inner steps that keep the graph, starting from detached warm-up weights and detached optimizer
              moments (the semantics of higher's copy_initial_weights=True, SPEC P16)
    meta-loss cross-entropy of the final weights on the augmented real batch (hard labels), right after the window

The inner gradient is `torch.autograd.grad(..., create_graph=True)` on a flat parameter vector run through
`FunctionalModel` (torch.func.functional_call), and the inner optimizer (`InnerOptimizer`) is Adam or SGD written
with plain tensor ops, so the window is differentiable end to end. Memory grows with the window W, not with the
horizon T; compute grows with start + W. As published, the warm-up runs torch's Adam and the window higher 0.2.1's
DifferentiableAdam, whose eps sits outside the bias correction (`--inner-adam higher`, SPEC P16; `torch`: both
torch's).

Budget (`--epochs`): passes over the real data, ceil(train size / this process's real batch) outer steps each, as
the published `--epochs`. Sets record the `rat` evaluation protocol (the published test(), `distillery.rat_eval`).
`--window-mode plateau` is the published cctype 1 curriculum (`Plateau`), driven by the run loop's evaluations.

Window placement (SPEC §6.4): `start ~ U{m, ..., T-W}` (RaT-BPTT) or `start = T-W` (classic truncated BPTT), drawn
every outer step or once per epoch of the real data as the published code does (SPEC P14). The real batch is a
fresh random subset of the train split every step (the reference walks shuffled epochs); an "epoch" is
ceil(train size / this process's real batch) steps, as in the reference.

Initial images (SPEC §2.3): the reference draws N(0, 1) noise rescaled to unit L2 norm per image, in ZCA space.
`pix_init="auto"` does that for ZCA-whitened data and starts from real training images otherwise (unit-norm noise is
almost a constant image in standardized space); "noise" and "real" force either.

Outer step (SPEC §6.5): Adam on the images (second parameter group for learned labels at lr / label_lr_scale),
the image gradient clipped to twice an EMA of its norm (`EmaClipper`), learned labels clamped to >= 0.

Boost-DD (SPEC §6.8, `BoostSchedule`): blocks of images per class are added one after another; earlier blocks keep
training with their learning rate multiplied by beta (0 = frozen). Images stay ordered class, then block, so the
first k images of every class (`SyntheticSet.prefix(k)`) at a block boundary are a distilled set of their own.

Several processes (`torch.distributed` initialised, e.g. by torchrun; gloo on CPU, nccl on GPU, SPEC §6.7): every
rank draws its own inner networks and synthetic batches and real_batch / world_size real images, the meta-gradients
and losses are averaged with all-reduce, the window start and the initial set come from rank 0. Only rank 0 should
write files (`is_main_process()`).

`--fast on` (CUDA, `GraphedRat`): the same meta-gradient with each warm-up step and the window (with the meta-loss
and its backward) replayed from captured CUDA graphs; every draw is made first, in the plain path's order.

Randomness: every draw comes from a `torch.Generator` seeded from (seed, purpose, rank, step) (`stream_generator`),
so a resumed run, and every rank of a resumed multi-process run, continues exactly as an uninterrupted one without
saving generator states.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..augment import Augment
from ..capture import GraphCache
from ..distributed import all_reduce_mean_, broadcast_, rank_and_world
from ..errors import UserError
from ..models import FunctionalModel, create_model, init_seeded
from ..models.instancenorm import KERNELS, norm_kernel
from ..options import check_options, option
from ..streams import stream_generator
from ..synset import SyntheticSet
from ..validate import check_fast

Augmentation = Callable[[Tensor, torch.Generator], Tensor]
BatchDraw = Callable[[torch.Generator], Tensor]

# Purposes of the random streams (first key after the seed in `stream_generator`).
_INNER, _WINDOW, _INIT = 0, 1, 2


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
def _inner_step(fm: FunctionalModel, optimizer: InnerOptimizer, theta: Tensor, state: dict[str, Tensor],
                images: Tensor, labels: Tensor, draw: BatchDraw, augment: Augmentation | None,
                generator: torch.Generator, create_graph: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """One inner training step on a sampled, augmented synthetic mini-batch."""
    idx = draw(generator)
    x = images[idx]
    if augment is not None:
        x = augment(x, generator)
    if not create_graph:  # a fresh leaf: the gradient w.r.t. theta and nothing else
        theta = theta.detach().requires_grad_(True)
    # Learned labels are (n, C) floats: cross_entropy uses them directly as probability targets (SPEC §6.5).
    loss = F.cross_entropy(fm(theta, x), labels[idx])
    (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
    if not create_graph:
        theta = theta.detach()
    return optimizer.step(theta, grad, state)


def warm_up(fm: FunctionalModel, images: Tensor, labels: Tensor, theta: Tensor, optimizer: InnerOptimizer,
            steps: int, draw: BatchDraw, augment: Augmentation | None,
            generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """Train `steps` inner steps on detached images and labels: no graph reaches the synthetic data (SPEC P13).

    torch's Adam and SGD run as torch.optim's in-place foreach (CUDA: fused) step; the formula is the same as
    `InnerOptimizer.step` up to float rounding (tested), and the state continues into the window unchanged."""
    images, labels, theta = images.detach(), labels.detach(), theta.detach()
    if steps and (optimizer.kind == "sgd" or getattr(optimizer, "adam", "torch") == "torch"):
        return _warm_up_in_place(fm, images, labels, theta, optimizer, steps, draw, augment, generator)
    state = optimizer.init_state(theta)
    for _ in range(steps):
        theta, state = _inner_step(fm, optimizer, theta, state, images, labels, draw, augment, generator, False)
    return theta, state


def _warm_up_in_place(fm: FunctionalModel, images: Tensor, labels: Tensor, theta: Tensor, optimizer: InnerOptimizer,
                      steps: int, draw: BatchDraw, augment: Augmentation | None,
                      generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """`warm_up` with torch.optim's in-place step; same draws in the same order; returns InnerOptimizer's state."""
    theta = theta.clone().requires_grad_(True)
    fast = {"fused": True} if theta.device.type == "cuda" else {"foreach": True}
    if optimizer.kind == "sgd":
        opt = torch.optim.SGD([theta], lr=optimizer.lr, momentum=optimizer.momentum,
                              weight_decay=optimizer.weight_decay, **fast)
    else:
        opt = torch.optim.Adam([theta], lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                               weight_decay=optimizer.weight_decay, **fast)
    for _ in range(steps):
        idx = draw(generator)
        x = images[idx] if augment is None else augment(images[idx], generator)
        (theta.grad,) = torch.autograd.grad(F.cross_entropy(fm(theta, x), labels[idx]), theta)
        opt.step()
    state = {k: torch.as_tensor(v, dtype=theta.dtype, device=theta.device).detach() for k, v in opt.state[theta].items()}
    return theta.detach(), state


def meta_gradient(fm: FunctionalModel, images: Tensor, labels: Tensor, theta0: Tensor, optimizer: InnerOptimizer,
                  start: int, window: int, real_x: Tensor, real_y: Tensor, augment_syn: Augmentation | None,
                  augment_real: Augmentation | None, generator: torch.Generator, *, num_classes: int,
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
    # The window starts from constants: gradients reach neither the warm-up nor the initialisation (SPEC P16).
    theta = theta.detach().requires_grad_(True)
    state = {k: v.detach() for k, v in state.items()}
    window_optimizer = window_optimizer or optimizer
    for _ in range(window):
        theta, state = _inner_step(fm, window_optimizer, theta, state, images, labels, draw, augment_syn, generator,
                                   True)
    if augment_real is not None:
        real_x = augment_real(real_x, generator)
    meta_loss, grad_theta = real_loss_grad(fm, theta, real_x, real_y, real_chunk)
    wrt = [images, labels] if labels.requires_grad else [images]
    grads = torch.autograd.grad(theta, wrt, grad_outputs=grad_theta)  # one backward through the window
    return float(meta_loss), grads[0], grads[1] if labels.requires_grad else None


def real_loss_grad(fm: FunctionalModel, theta: Tensor, x: Tensor, y: Tensor,
                   chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of θ on (x, y) and its gradient w.r.t. θ, `chunk` images at a time, so that only one
    chunk's activations live at once (the 5000-image meta-loss otherwise holds them all). One chunk (chunk None or
    >= len(x)) is bit-identical to differentiating the unchunked loss."""
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


# --- the same meta-gradient from captured CUDA graphs (--fast on) ------------------------------------------------
def draw_steps(steps: int, draw: BatchDraw, augment: Augment | None, images: Tensor,
               generator: torch.Generator) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    """Batch indices and branch-free DSA fields (each field over all the steps' images) of `steps` inner steps,
    drawn in the plain steps' order (indices, then augmentation, step after step), so the generator ends alike."""
    indices, draws = [], []
    for _ in range(steps):
        indices.append(draw(generator))
        if augment is not None:
            draws.append(augment.sample(len(indices[-1]), generator, images.shape[-2:], device=images.device))
    return indices, augment.branch_free_fields(draws) if draws else ()


def warm_up_step_static(fm: FunctionalModel, optimizer: InnerOptimizer, augment: Augment | None, images: Tensor,
                        labels: Tensor, theta: Tensor, state: dict[str, Tensor], idx: Tensor,
                        aug: tuple[Tensor, ...]) -> None:
    """One warm-up step updating `theta` and `state` in place (`optimizer`'s formula, bias corrections in the
    dtype of state['step']): static shapes, no host sync, no graph to the images."""
    point = theta.detach().requires_grad_(True)
    batch = _augmented(augment, images.index_select(0, idx), aug)
    (grad,) = torch.autograd.grad(F.cross_entropy(fm(point, batch), labels.index_select(0, idx)), point)
    new_theta, new_state = optimizer.step(theta, grad, state)
    theta.copy_(new_theta)
    for key, value in new_state.items():
        state[key].copy_(value)


def window_static(fm: FunctionalModel, optimizer: InnerOptimizer, augment_syn: Augment | None,
                  augment_real: Augment | None, real_chunk: int | None, learn_labels: bool, images: Tensor,
                  labels: Tensor, theta: Tensor, state: dict[str, Tensor], indices: Tensor, aug: tuple[Tensor, ...],
                  real_x: Tensor, real_y: Tensor, real_aug: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """`meta_gradient` after the warm-up, from fixed-shape tensors (`indices` (W, b), the fields of `draw_steps`):
    (meta-loss, ∂/∂images[, ∂/∂labels]). The leaves are made here, so a capture holds no outside autograd node."""
    x = images.detach().requires_grad_(True)
    y = labels.detach().requires_grad_(learn_labels)
    theta = theta.detach().requires_grad_(True)
    state = {key: value.detach().to(theta.dtype) for key, value in state.items()}
    b = indices.shape[1]
    for s, idx in enumerate(indices):
        batch = _augmented(augment_syn, x.index_select(0, idx), tuple(t[s * b:(s + 1) * b] for t in aug))
        loss = F.cross_entropy(fm(theta, batch), y.index_select(0, idx))
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta, state = optimizer.step(theta, grad, state)
    meta_loss, grad_theta = real_loss_grad(fm, theta, _augmented(augment_real, real_x, real_aug), real_y, real_chunk)
    return (meta_loss, *torch.autograd.grad(theta, [x, y] if learn_labels else [x], grad_outputs=grad_theta))


def _augmented(augment: Augment | None, x: Tensor, aug: tuple[Tensor, ...]) -> Tensor:
    """x with branch-free DSA fields applied (x itself when there are none)."""
    return augment.apply_fields(x, aug) if aug else x


class GraphedRat:
    """`meta_gradient` replayed from captured CUDA graphs (`--fast on`): one graph for a warm-up step, replayed
    `start` times, and one for the window with the meta-loss and the backward through the window.

    The draws are made first, eagerly and in the plain path's order; the set, θ and the optimizer moments live in
    static buffers (copied in once per call, not per replay). A new shape (a Boost-DD block, other labels) recaptures.
    """

    def __init__(self, fm: FunctionalModel, optimizer: InnerOptimizer, window_optimizer: InnerOptimizer,
                 augment_syn: Augment | None, augment_real: Augment | None, real_chunk: int | None,
                 warmup: int = 3) -> None:
        """Nothing is captured until the first call."""
        self.fm, self.optimizer, self.window_optimizer = fm, optimizer, window_optimizer
        self.augment_syn, self.augment_real, self.real_chunk = augment_syn, augment_real, real_chunk
        self._key: tuple | None = None
        self._static: tuple | None = None
        self._graphs = GraphCache(warmup)

    def __call__(self, images: Tensor, labels: Tensor, theta0: Tensor, start: int, window: int, real_x: Tensor,
                 real_y: Tensor, generator: torch.Generator, *, num_classes: int, task_sampler_nc: int | None = None,
                 batch_per_class: int | None = None) -> tuple[float, Tensor, Tensor | None]:
        """Same result and draws as `meta_gradient` with this object's optimizers, augmentations and real_chunk."""
        ipc = len(images) // num_classes
        draw = partial(sample_batch, num_classes, ipc, task_sampler_nc or num_classes, batch_per_class or ipc)
        warm_idx, warm_aug = draw_steps(start, draw, self.augment_syn, images, generator)
        win_idx, win_aug = draw_steps(window, draw, self.augment_syn, images, generator)
        real_aug = () if self.augment_real is None else self.augment_real.branch_free_fields(
            [self.augment_real.sample(len(real_x), generator, real_x.shape[-2:], device=real_x.device)])
        learn = labels.requires_grad
        images_buf, labels_buf, theta_buf, moments = self._buffers(images, labels, theta0, learn, window, real_x,
                                                                   real_y)
        keys = list(moments)
        buffers = [images_buf, labels_buf, theta_buf, *moments.values()]  # each graph's state, read in place
        b = len(win_idx[0])
        for s, idx in enumerate(warm_idx):
            self._graphs.replay("warm-up", partial(self._warm_up, keys),
                                [idx, *(t[s * b:(s + 1) * b] for t in warm_aug)], buffers)
        outputs = self._graphs.replay("window", partial(self._window, keys, learn, len(win_aug)),
                                      [torch.stack(win_idx), *win_aug, real_x.detach(), real_y, *real_aug], buffers)
        loss, grad_x, *grad_y = (t.clone() for t in outputs)  # the next replay overwrites the outputs
        return float(loss), grad_x, grad_y[0] if learn else None

    def _buffers(self, images: Tensor, labels: Tensor, theta0: Tensor, learn: bool, window: int, real_x: Tensor,
                 real_y: Tensor) -> tuple:
        """(images, labels, θ, optimizer state) static buffers holding this call's set, θ_0 and zero moments; a new
        signature drops the old graphs first (their memory pools with them)."""
        key = (learn, window, *((t.shape, t.dtype, t.device) for t in (images, labels, theta0, real_x, real_y)))
        if key != self._key:
            self._graphs.clear()
            state = self.optimizer.init_state(theta0)
            if "step" in state:  # the warm-up's bias corrections in float64, as torch's foreach Adam (Python floats)
                state["step"] = state["step"].double()
            self._static = (torch.empty_like(images), torch.empty_like(labels), torch.empty_like(theta0), state)
            self._key = key
        images_buf, labels_buf, theta_buf, state = self._static
        images_buf.copy_(images.detach())
        labels_buf.copy_(labels.detach())
        theta_buf.copy_(theta0.detach())
        for value in state.values():
            value.zero_()
        return self._static

    @property
    def captures(self) -> int:
        """How many graphs were captured (a warm-up step and a window per set shape)."""
        return self._graphs.captures

    def _warm_up(self, keys: list[str], images: Tensor, labels: Tensor, theta: Tensor, *rest: Tensor) -> None:
        state, (idx, *aug) = dict(zip(keys, rest)), rest[len(keys):]
        warm_up_step_static(self.fm, self.optimizer, self.augment_syn, images, labels, theta, state, idx, tuple(aug))

    def _window(self, keys: list[str], learn: bool, n_aug: int, images: Tensor, labels: Tensor, theta: Tensor,
                *rest: Tensor) -> tuple[Tensor, ...]:
        state, (indices, *rest) = dict(zip(keys, rest)), rest[len(keys):]
        aug, (real_x, real_y, *real_aug) = tuple(rest[:n_aug]), rest[n_aug:]
        return window_static(self.fm, self.window_optimizer, self.augment_syn, self.augment_real, self.real_chunk,
                             learn, images, labels, theta, state, indices, aug, real_x, real_y, tuple(real_aug))


# --- outer optimisation pieces ----------------------------------------------------------------------------------------
class EmaClipper:
    """SPEC §6.5: e <- e - (1 - coef)(e - ||g||) (the first norm initialises e), then clip ||g|| to 2e."""

    def __init__(self, coef: float = 0.9):
        self.coef = coef
        self.ema: float | None = None

    def __call__(self, grad: Tensor) -> tuple[Tensor, float]:
        """The clipped gradient and the norm before clipping (clip_grad_norm_ arithmetic, eps 1e-6)."""
        norm = float(grad.norm())
        self.ema = norm if self.ema is None else self.ema - (1 - self.coef) * (self.ema - norm)
        return grad * min(1.0, 2 * self.ema / (norm + 1e-6)), norm

    def state_dict(self) -> dict[str, Any]:
        """The EMA (None before the first call) and the coefficient."""
        return {"coef": self.coef, "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output."""
        self.coef, self.ema = state["coef"], state["ema"]


def unit_noise(n: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """N(0, 1) images with every image rescaled to unit L2 norm (RaT-BPTT's `project`, SPEC §2.3)."""
    x = torch.randn(n, math.prod(shape), generator=generator, device=generator.device)
    return (x / x.norm(dim=1, keepdim=True)).reshape(n, *shape)


def append_block(x: Tensor, new: Tensor, num_classes: int) -> Tensor:
    """Append per-class blocks `new` to the class-blocked `x`, keeping it ordered class, then block."""
    old = x.reshape(num_classes, -1, *x.shape[1:])
    new = new.reshape(num_classes, -1, *new.shape[1:])
    return torch.cat([old, new], dim=1).reshape(-1, *x.shape[1:])


@dataclass(frozen=True)
class BoostSchedule:
    """Boost-DD (SPEC §6.8): distil `blocks[0]` images per class; every `steps_per_block` outer steps append the next
    block; earlier blocks keep training at learning rate x `beta` (0 = frozen), the newest at the full rate.

    Unverified (SPEC §6.8/§11, ✱/?): the paper's beta values, block sizes and schedule. These defaults are ours.
    """

    blocks: tuple[int, ...]
    beta: float = 0.0
    steps_per_block: int = 1000

    def __post_init__(self) -> None:
        if not self.blocks or min(self.blocks) < 1:
            raise UserError(f"--boost-blocks {self.blocks} needs positive block sizes, e.g. 1,1,2")
        if not 0.0 <= self.beta <= 1.0:
            raise UserError(f"--boost-beta {self.beta} must be in [0, 1] (0 freezes earlier blocks)")
        if self.steps_per_block < 1:
            raise UserError(f"--boost-every {self.steps_per_block} must be at least 1")

    def stage(self, it: int) -> int:
        """Index of the newest block at outer step `it`."""
        return min(it // self.steps_per_block, len(self.blocks) - 1)

    def ipc(self, stage: int) -> int:
        """Images per class once block `stage` is added; every such value is a valid prefix size."""
        return sum(self.blocks[:stage + 1])

    def lr_multipliers(self, stage: int, num_classes: int) -> Tensor:
        """Per-image learning-rate factors (n,) in class-then-block order: beta for earlier blocks, 1 for the newest."""
        old = self.ipc(stage) - self.blocks[stage]
        row = torch.tensor([self.beta] * old + [1.0] * self.blocks[stage])
        return row.repeat(num_classes)


class Plateau:
    """RaT-BPTT's cctype 1 curriculum (published `base.py` main loop, SPEC §6.4): the window start begins at m; when
    the evaluation loss has not improved for `patience` epochs it moves by W, capped at T-W; a further plateau at
    the cap stops the run."""

    def __init__(self, start: int, cap: int, window: int, patience: int):
        self.start, self.cap, self.window, self.patience = start, cap, window, patience
        self.best_loss, self.best_epoch = math.inf, 0

    def observe(self, epoch: int, loss: float) -> bool:
        """Record the evaluation loss at `epoch`; True when the run should stop."""
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, epoch
        elif epoch >= self.best_epoch + self.patience:
            self.best_epoch = epoch
            if self.start == self.cap:
                return True
            self.start = min(self.cap, self.start + self.window)
        return False

    def state_dict(self) -> dict[str, float]:
        """Window start and the best loss so far, for an exact resume."""
        return {"start": self.start, "best_loss": self.best_loss, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore `state_dict()` output."""
        self.start, self.best_loss, self.best_epoch = int(state["start"]), state["best_loss"], int(state["best_epoch"])


# --- the method object ------------------------------------------------------------------------------------------------
@dataclass
class RaTBPTTConfig:
    """Hyperparameters of SPEC §6 (reference flag in brackets). Defaults: the CIFAR-10 IPC10 row of §6.9."""

    ipc: int = option(10, low=1, help="images per class")
    model: str | None = option(None, help="distillation model (default: the dataset's ConvNet) [--arch]")
    horizon: int = option(200, low=1, help="T: inner steps per outer step [--totwindow]")
    window: int = option(60, low=1, help="W: inner steps that keep the graph, <= horizon [--window]")
    min_start: int = option(0, low=0, help="m: earliest window start, <= horizon - window [--minwindow]")
    window_mode: str = option("random", choices=("random", "last", "plateau"),
                              help="random: start ~ U{m..T-W} (cctype 2) | last: start = T-W (cctype 0) | "
                                   "plateau: start = m, += W on an evaluation-loss plateau (cctype 1)")
    window_resample: str = option("step", choices=("step", "epoch"),
                                  help="draw the window start every step [--complete_random] or every epoch (P14)")
    inner_opt: str = option("adam", choices=("adam", "sgd"),
                            help="inner optimizer: adam | sgd (momentum 0.9, weight decay 5e-4) [--inner_optim]")
    inner_lr: float = option(1e-3, low=0, low_open=True, help="inner learning rate")
    lr: float = option(1e-3, low=0, low_open=True, help="outer Adam learning rate of the images")
    label_lr_scale: float = option(1.0, low=0, low_open=True, help="learned labels use lr / label_lr_scale")
    real_batch: int = option(5000, low=1, help="real images per outer step over all processes (capped at train size)")
    batch_per_class: int | None = option(None, low=1, help="images per class in an inner batch (none: all ipc)")
    task_sampler_nc: int | None = option(None, low=1, help="classes in an inner batch (none: all classes)")
    learn_labels: bool = option(False, help="learn soft labels too [--train_y]")
    clip_coef: float = option(0.9, low=0, high=1, help="EMA coefficient of the gradient-norm clip")
    syn_strategy: str = option("flip_rotate", help="augmentation of the synthetic batches: flip_rotate, rotate, none")
    real_strategy: str = option("flip_rotate", help="augmentation of the real batches: flip_rotate, rotate, none")
    pix_init: str = option("auto", choices=("auto", "noise", "real"),
                           help="initial images: auto (noise for ZCA data, as the reference; else real) | noise | real")
    boost_blocks: str | None = option(None, help="Boost-DD block sizes per class, e.g. 1,1,2 (must sum to ipc)")
    boost_beta: float = option(0.0, low=0, high=1, help="Boost-DD: learning-rate factor of earlier blocks (0 freezes)")
    boost_every: int = option(1000, low=1, help="Boost-DD: outer steps per block; the last block runs to the end")
    inner_adam: str = option("higher", choices=("higher", "torch"),
                             help="Adam formula in the differentiable window: higher (0.2.1's DifferentiableAdam, "
                                  "as published; the warm-up uses torch's) or torch (both torch's)")
    epochs: int | None = option(None, low=1, none_ok=True,
                                help="budget in passes over the real data (the published --epochs): iterations = "
                                     "epochs x ceil(train size / this process's real batch); none: --iterations")
    rat_eval_steps: str = option("300,600,1000,3000",
                                 help="the rat evaluation protocol's cumulative step counts, one chosen on "
                                      "validation (published test(): 300,600,1000,3000)")
    plateau_patience: int = option(60, low=1, help="--window-mode plateau (cctype 1): epochs without a lower "
                                                   "evaluation loss before the window start moves by W")
    real_chunk: int | None = option(1000, low=1, none_ok=True,
                                    help="real images per chunk of the meta-loss gradient (memory; none: all at once)")
    fast: str = option("off", choices=("off", "on"),
                       help="on: each warm-up step and the window with its meta-loss replay captured CUDA graphs "
                            "(CUDA only); off until benchmarks/gpu_suite.py has measured it")
    norm_kernel: str = option("torch", choices=KERNELS,
                              help="instance norm's double backward in the window: torch (closed form) or triton "
                                   "(one fused kernel; CUDA with the triton package); torch until "
                                   "benchmarks/gpu_suite.py has measured it")
    seed: int = option(0, low=0, help="seed of every random draw")


@dataclass
class _Setup:
    """Derived constants of a run (not hyperparameters)."""

    num_classes: int
    image_shape: tuple[int, ...]
    real_batch: int                   # this process's share
    steps_per_epoch: int
    rank: int
    boost: BoostSchedule | None


class RaTBPTT:
    """The RaT-BPTT method object for the shared run loop (`distillery.run`)."""

    name = "ratbptt"

    def __init__(self, dataset, cfg: RaTBPTTConfig):
        self.ds, self.cfg = dataset, cfg
        spec = dataset.spec
        self.device = dataset.train.x.device
        check_window(cfg.horizon, cfg.window, cfg.min_start)
        self._check(cfg, spec.num_classes)
        rank, world = rank_and_world()
        n_train = len(dataset.train.y)
        real_batch = min(cfg.real_batch, n_train) // world
        if real_batch < 1:
            raise UserError(f"--real-batch {cfg.real_batch} is smaller than the {world} processes; raise it")
        boost = None
        if cfg.boost_blocks:
            boost = BoostSchedule(_parse_blocks(cfg.boost_blocks), cfg.boost_beta, cfg.boost_every)
            if sum(boost.blocks) != cfg.ipc:
                raise UserError(f"--boost-blocks {cfg.boost_blocks} sum to {sum(boost.blocks)}, not --ipc {cfg.ipc}; "
                                "make the block sizes add up to the ipc")
        self.setup = _Setup(spec.num_classes, (spec.channels, *spec.im_size), real_batch,
                            math.ceil(n_train / real_batch), rank, boost)
        self.model_name = cfg.model or spec.default_model
        self.fm = FunctionalModel(create_model(self.model_name, spec.channels, spec.num_classes, spec.im_size)
                                  .to(self.device))
        self.inner_opt = InnerOptimizer(cfg.inner_opt, cfg.inner_lr)   # the warm-up: torch's Adam, as published
        self.window_opt = self.inner_opt.with_adam(cfg.inner_adam)
        self.plateau = Plateau(cfg.min_start, cfg.horizon - cfg.window, cfg.window, cfg.plateau_patience)
        self.augment_syn = _augmentation(cfg.syn_strategy)
        self.augment_real = _augmentation(cfg.real_strategy)
        self.clipper = EmaClipper(cfg.clip_coef)
        check_fast(asdict(cfg), self.device)  # --fast on and --norm-kernel triton: CUDA only
        self.graphed = GraphedRat(self.fm, self.inner_opt, self.window_opt, self.augment_syn, self.augment_real,
                                  cfg.real_chunk) if cfg.fast == "on" else None
        self.stage = 0
        k = boost.blocks[0] if boost else cfg.ipc
        self.images = broadcast_(self._init_images(k, stage=0)).requires_grad_(True)
        labels = torch.arange(spec.num_classes, device=self.device).repeat_interleave(k)
        self.labels = F.one_hot(labels, spec.num_classes).float().requires_grad_(True) if cfg.learn_labels else labels
        self.opt = self._make_optimizer()

    @staticmethod
    def _check(cfg: RaTBPTTConfig, num_classes: int) -> None:
        """UserError for option values that cannot work: the declared ranges, then what depends on the data."""
        check_options(cfg)
        parse_steps(cfg.rat_eval_steps)
        if cfg.task_sampler_nc is not None and cfg.task_sampler_nc > num_classes:
            raise UserError(f"--task-sampler-nc {cfg.task_sampler_nc} must be between 1 and {num_classes} classes")

    def _init_images(self, k: int, stage: int) -> Tensor:
        """k new images per class, class-blocked: unit-norm noise or real training images (SPEC §2.3)."""
        gen = stream_generator(self.cfg.seed, _INIT, stage, device=self.device)
        mode = self.cfg.pix_init
        if mode == "auto":
            mode = "noise" if self.ds.spec.rat_noise_init or self.ds.preprocess.meta()["kind"][:3] == "zca" else "real"
        if mode == "noise":
            return unit_noise(k * self.setup.num_classes, self.setup.image_shape, gen)
        return torch.cat([self.ds.sample_real(c, k, gen) for c in range(self.setup.num_classes)]).detach().clone()

    def _make_optimizer(self) -> torch.optim.Adam:
        """Outer Adam (SPEC §6.5): images at lr, learned labels at lr / label_lr_scale."""
        groups = [{"params": [self.images]}]
        if self.cfg.learn_labels:
            groups.append({"params": [self.labels], "lr": self.cfg.lr / self.cfg.label_lr_scale})
        return torch.optim.Adam(groups, lr=self.cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)

    def _grow(self) -> None:
        """Boost-DD: append the next block (fresh init) to every class; the outer Adam and the EMA start afresh."""
        self.stage += 1
        num_classes, k = self.setup.num_classes, self.setup.boost.blocks[self.stage]
        new = broadcast_(self._init_images(k, self.stage))
        self.images = append_block(self.images.detach(), new, num_classes).requires_grad_(True)
        if self.cfg.learn_labels:
            new_labels = F.one_hot(torch.arange(num_classes, device=self.device).repeat_interleave(k), num_classes)
            self.labels = append_block(self.labels.detach(), new_labels.float(), num_classes).requires_grad_(True)
        else:
            ipc = len(self.images) // num_classes
            self.labels = torch.arange(num_classes, device=self.device).repeat_interleave(ipc)
        self.opt = self._make_optimizer()
        self.clipper = EmaClipper(self.cfg.clip_coef)

    def _window_start(self, it: int) -> int:
        """This step's window start, drawn (per step or per epoch) on rank 0 and broadcast."""
        cfg = self.cfg
        if cfg.window_mode == "last":
            return cfg.horizon - cfg.window
        if cfg.window_mode == "plateau":  # moved only by observe_eval, on rank 0, and broadcast
            return int(broadcast_(torch.tensor(self.plateau.start, device=self.device)))
        period = window_period(it, cfg.window_resample, self.setup.steps_per_epoch)
        start = window_start(cfg.min_start, cfg.horizon, cfg.window, stream_generator(cfg.seed, _WINDOW, period))
        return int(broadcast_(torch.tensor(start, device=self.device)))

    def step(self, it: int) -> dict[str, float]:
        """One outer iteration: fresh network, warm-up, differentiable window, meta-loss on real data, image update."""
        cfg, setup = self.cfg, self.setup
        while setup.boost is not None and self.stage < setup.boost.stage(it):
            self._grow()
        start = self._window_start(it)
        gen = stream_generator(cfg.seed, _INNER, setup.rank, it, device=self.device)
        net_seed = int(torch.randint(2 ** 62, (1,), generator=gen, device=self.device))
        spec = self.ds.spec
        net = init_seeded(self.model_name, spec.channels, spec.num_classes, spec.im_size, net_seed)
        theta0 = self.fm.flatten(net).detach().to(self.device)
        idx = torch.randperm(len(self.ds.train.y), generator=gen, device=self.device)[:setup.real_batch]
        real_x, real_y = self.ds.train.x[idx], self.ds.train.y[idx]
        sampling = {"num_classes": setup.num_classes, "task_sampler_nc": cfg.task_sampler_nc,
                    "batch_per_class": cfg.batch_per_class}
        with norm_kernel(cfg.norm_kernel):
            if self.graphed is not None:
                loss, grad_x, grad_y = self.graphed(self.images, self.labels, theta0, start, cfg.window, real_x,
                                                    real_y, gen, **sampling)
            else:
                loss, grad_x, grad_y = meta_gradient(
                    self.fm, self.images, self.labels, theta0, self.inner_opt, start, cfg.window, real_x, real_y,
                    self.augment_syn, self.augment_real, gen, window_optimizer=self.window_opt,
                    real_chunk=cfg.real_chunk, **sampling)
        loss = float(all_reduce_mean_(torch.tensor(loss, device=self.device)))
        grad_x, norm = self.clipper(all_reduce_mean_(grad_x))
        self.images.grad = grad_x
        if grad_y is not None:
            self.labels.grad = all_reduce_mean_(grad_y)
        self._outer_update()
        ipc = len(self.images) // setup.num_classes
        return {"loss": loss, "grad_norm": norm, "window_start": float(start), "ipc": float(ipc)}

    def _outer_update(self) -> None:
        """Adam step; Boost-DD scales each image's update by its learning-rate factor; learned labels clamped >= 0."""
        boosting = self.setup.boost is not None and self.stage > 0
        params = [p for group in self.opt.param_groups for p in group["params"]]
        before = [p.detach().clone() for p in params] if boosting else []
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if boosting:  # Adam's update is linear in lr (no weight decay): scaling it = a per-image learning rate
                mult = self.setup.boost.lr_multipliers(self.stage, self.setup.num_classes).to(self.device)
                for p, p0 in zip(params, before):
                    p.copy_(p0 + mult.view(-1, *[1] * (p.dim() - 1)) * (p - p0))
            if self.cfg.learn_labels:
                self.labels.clamp_(min=0)

    def synset(self) -> SyntheticSet:
        """The current distilled set (hard or learned labels; no learned step size)."""
        spec, cfg = self.ds.spec, self.cfg
        meta = {"method": self.name, "dataset": spec.name, "ipc": len(self.images) // spec.num_classes,
                "num_classes": spec.num_classes, "class_names": list(spec.class_names), "model": self.model_name,
                "inner_opt": repr(self.inner_opt), "config": asdict(cfg), "seed": cfg.seed,
                # the evaluation it was distilled for: the published test() (distillery.rat_eval)
                "protocol": "rat", "rat_eval": {"inner_opt": cfg.inner_opt, "inner_lr": cfg.inner_lr,
                                                "strategy": cfg.syn_strategy, "task_sampler_nc": cfg.task_sampler_nc,
                                                "batch_per_class": cfg.batch_per_class,
                                                "steps": list(parse_steps(cfg.rat_eval_steps))}}
        if self.setup.boost is not None:  # prefix sizes that are distilled sets of their own
            meta["boost_prefix_ipcs"] = [self.setup.boost.ipc(s) for s in range(self.stage + 1)]
        preprocess = {"tensors": self.ds.preprocess.tensors(), "meta": self.ds.preprocess.meta()}
        return SyntheticSet(self.images.detach().clone(), self.labels.detach().clone(),
                            "learned" if cfg.learn_labels else "hard", None, preprocess, meta)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume (randomness is derived from (seed, rank, step), nothing to save)."""
        return {"images": self.images.detach().cpu(), "labels": self.labels.detach().cpu(), "stage": self.stage,
                "opt": self.opt.state_dict(), "clipper": self.clipper.state_dict(),
                "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output (also mid-boost, when the set has grown)."""
        self.stage = state["stage"]
        self.images = state["images"].to(self.device).clone().requires_grad_(True)
        self.labels = state["labels"].to(self.device).clone().requires_grad_(self.cfg.learn_labels)
        self.opt = self._make_optimizer()
        lrs = [group["lr"] for group in self.opt.param_groups]  # the config's: --resume may change them
        self.opt.load_state_dict(state["opt"])
        for group, lr in zip(self.opt.param_groups, lrs):
            group["lr"] = lr
        self.clipper.load_state_dict(state["clipper"])
        if "plateau" in state:
            self.plateau.load_state_dict(state["plateau"])

    @property
    def wants_eval_train_loss(self) -> bool:
        """cctype 1 needs the evaluation nets' loss on the real train split (the published plateau signal)."""
        return self.cfg.window_mode == "plateau"

    def observe_eval(self, it: int, train_loss: float | None) -> bool:
        """cctype 1: feed the evaluation loss of iteration `it` to the plateau curriculum; True = stop the run."""
        if self.cfg.window_mode != "plateau" or train_loss is None:
            return False
        return self.plateau.observe(it // self.setup.steps_per_epoch, train_loss)

    def init_from(self, s: SyntheticSet) -> None:
        """Start from a saved set (the published --ckptname): its images, and its labels when both learn labels."""
        if tuple(s.images.shape) != tuple(self.images.shape):
            raise UserError(f"--init-from set has images {tuple(s.images.shape)}, this run needs "
                            f"{tuple(self.images.shape)}; use a set of the same dataset and ipc")
        with torch.no_grad():
            self.images.copy_(s.images.to(self.device))
            if self.cfg.learn_labels and s.labels.ndim == 2:
                self.labels.copy_(s.labels.to(self.device))


def parse_steps(text: str) -> tuple[int, ...]:
    """'300,600,1000,3000' -> increasing positive step counts of the rat evaluation protocol."""
    try:
        steps = tuple(int(b) for b in str(text).split(","))
    except ValueError:
        steps = ()
    if not steps or steps[0] < 1 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise UserError(f"--rat-eval-steps '{text}' must be increasing positive step counts, e.g. 300,600,1000,3000")
    return steps


def _parse_blocks(text: str) -> tuple[int, ...]:
    """'1,1,2' -> (1, 1, 2)."""
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise UserError(f"--boost-blocks '{text}' is not a comma-separated list of integers, e.g. 1,1,2") from None


def _augmentation(strategy: str) -> Augmentation | None:
    """RaT-BPTT augmentation (SPEC §3.5: one token per call, per-image, align_corners=False); None for 'none'."""
    if strategy in ("none", "None", ""):
        return None
    return Augment(strategy, mode="S", align_corners=False)
