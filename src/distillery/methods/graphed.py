"""MTT's unrolled iteration as ONE CUDA graph (`--fast on`): N student steps with double backward, then ∂L/∂(X, α).

`unrolled_static` is `trajectory.unrolled_grad` written for capture: every input is a tensor of a fixed shape (the
plan's indices and branch-free DSA parameters packed step after step by `pack_plan`), nothing reads a value back
to the host, and the leaves X and α are made inside the function, so a capture holds no autograd node from an
earlier (warm-up) call and no stream from outside the capture. It runs eagerly on any device, which is how the
CPU tests check it against `unrolled_grad`.

`GraphedUnroll` captures it once per input signature (`capture.Captured`: warm-up on a side stream first, as
the PyTorch CUDA-graph notes ask) and then replays: copy the iteration's tensors into the static buffers,
`graph.replay()`, clone the three outputs. One graph serves every iteration because branch-free DSA runs the same
ops whatever token a step drew (augment.py `apply_branch_free`). Only hard or fixed soft labels: labels that
require grad are not captured.

`GraphedTesla` does the same for TESLA: the first pass (`tesla_pass1_static`: N first-order steps, θ_i stacked, c, D,
L, ∂L/∂α) as one graph, the second (`tesla_step_static`: one step's ∂[(2/D)·cᵀg_i]/∂X) as one graph per step size
replayed N times.

`GraphedRat` is RaT-BPTT's `bptt.meta_gradient` the same way: one graph for a warm-up step
(`warm_up_step_static`), replayed `start` times, and one for the window with the meta-loss and its backward
(`window_static`); every draw is made first, eagerly, in the plain path's order (`draw_steps`).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from ..augment import Augment
from ..capture import Captured, GraphCache
from ..models import FunctionalModel
from .bptt import BatchDraw, InnerOptimizer, real_loss_grad, sample_batch
from .tesla import pass1_summary
from .trajectory import GradResult, StepPlan, match_loss


def pack_plan(plan: StepPlan, augment: Augment | None) -> tuple[tuple[int, ...], Tensor, tuple[Tensor, ...]]:
    """(step sizes, indices of all steps concatenated, each full DSA field concatenated over steps); no DSA fields
    when the plan has no augmentation (augment None or the identity strategy)."""
    sizes = tuple(len(idx) for idx in plan.indices)
    indices = torch.cat(plan.indices)
    if augment is None or not augment.tokens:
        return sizes, indices, ()
    for idx, params in zip(plan.indices, plan.aug):
        if params is None or params.shared or params.batch != len(idx):
            raise ValueError("the graphed unroll replays per-image DSA draws, one per step, as make_plan draws them")
    return sizes, indices, augment.branch_free_fields(plan.aug)


def unrolled_static(fm: FunctionalModel, augment: Augment | None, sizes: tuple[int, ...], images: Tensor,
                    labels: Tensor, lr: Tensor, theta_start: Tensor, theta_target: Tensor, indices: Tensor,
                    aug: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """(∂L/∂X, ∂L/∂α, L) of one unrolled MTT iteration from `pack_plan`'s tensors: static shapes, no host
    sync."""
    x = images.detach().requires_grad_(True)
    alpha = lr.detach().requires_grad_(True)
    theta_start, theta_target = theta_start.detach(), theta_target.detach()
    y = labels.detach()
    theta = theta_start
    offset = 0
    for size in sizes:
        batch = _step_batch(augment, x, indices[offset:offset + size], aug, offset)
        idx = indices[offset:offset + size]
        offset += size
        point = theta if theta.requires_grad else theta.detach().requires_grad_(True)
        loss = F.cross_entropy(fm(point, batch), y.index_select(0, idx))
        (grad,) = torch.autograd.grad(loss, point, create_graph=True)
        theta = theta - alpha * grad
    loss = match_loss(theta, theta_start, theta_target)
    grad_images, grad_lr = torch.autograd.grad(loss, [x, alpha])
    return grad_images, grad_lr, loss.detach()


def _step_batch(augment: Augment | None, x: Tensor, idx: Tensor, aug: tuple[Tensor, ...], offset: int) -> Tensor:
    """X[idx] augmented with the branch-free DSA fields of the step that starts at `offset` in the packed plan."""
    batch = x.index_select(0, idx)  # backward: index_add (no sort, no host sync), unlike x[idx]
    return augment.apply_fields(batch, [t[offset:offset + len(idx)] for t in aug]) if aug else batch


def tesla_pass1_static(fm: FunctionalModel, augment: Augment | None, sizes: tuple[int, ...], images: Tensor,
                       labels: Tensor, lr: Tensor, theta_start: Tensor, theta_target: Tensor, indices: Tensor,
                       aug: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`tesla.tesla_pass1` from `pack_plan`'s tensors: (θ_0..θ_{N-1} stacked (N, P), c, D, L, ∂L/∂α); static
    shapes, no host sync, first-order (no graph between steps)."""
    x, y, a = images.detach(), labels.detach(), lr.detach()
    theta_start, theta_target = theta_start.detach(), theta_target.detach()
    thetas, grad_sum, theta, offset = [], torch.zeros_like(theta_start), theta_start, 0
    for size in sizes:
        thetas.append(theta)
        idx = indices[offset:offset + size]
        batch = _step_batch(augment, x, idx, aug, offset)
        offset += size
        point = theta.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(fm(point, batch), y.index_select(0, idx)), point)
        grad_sum = grad_sum + grad
        theta = theta - a * grad
    return (torch.stack(thetas), *pass1_summary(theta, theta_start, theta_target, grad_sum, a))


def tesla_step_static(fm: FunctionalModel, augment: Augment | None, images: Tensor, labels: Tensor, theta: Tensor,
                      weight: Tensor, indices: Tensor, aug: tuple[Tensor, ...]) -> Tensor:
    """∂(weightᵀ g)/∂X with g = ∇_θ CE at θ on one step's batch (TESLA pass 2, weight = 2c/D): static shapes."""
    x = images.detach().requires_grad_(True)
    point = theta.detach().requires_grad_(True)
    batch = _step_batch(augment, x, indices, aug, 0)
    loss = F.cross_entropy(fm(point, batch), labels.detach().index_select(0, indices))
    (grad,) = torch.autograd.grad(loss, point, create_graph=True)
    (grad_images,) = torch.autograd.grad(weight.detach() @ grad, x)
    return grad_images


def _check_inputs(images: Tensor, labels: Tensor) -> None:
    if images.device.type != "cuda":
        raise ValueError(f"the graphed gradients capture a CUDA graph; images are on {images.device}")
    if labels.requires_grad:
        raise ValueError("the graphed gradients do not differentiate the labels; use the plain gradient modes")


class GraphedTesla:
    """`tesla_grad` with both passes replayed: pass 1 as one graph, pass 2 from one graph per step size (N replays)."""

    def __init__(self, fm: FunctionalModel, augment: Augment | None, warmup: int = 3) -> None:
        """Nothing is captured until the first call."""
        self.fm, self.augment = fm, augment
        self._graphs = GraphCache(warmup)

    def __call__(self, images: Tensor, labels: Tensor, lr: Tensor, theta_start: Tensor, theta_target: Tensor,
                 plan: StepPlan) -> GradResult:
        """Same result as `tesla_grad(fm, images, labels, lr, theta_start, theta_target, plan, augment)`."""
        _check_inputs(images, labels)
        sizes, indices, aug = pack_plan(plan, self.augment)
        x, y = images.detach(), labels.detach()
        inputs = [x, y, lr.detach(), theta_start.detach(), theta_target.detach(), indices, *aug]

        def pass1(images, labels, lr, theta_start, theta_target, indices, *aug):
            return tesla_pass1_static(self.fm, self.augment, sizes, images, labels, lr, theta_start, theta_target,
                                      indices, aug)

        thetas, c, denom, loss, grad_alpha = self._graphs.replay(f"pass 1 {sizes}", pass1, inputs)
        weight = 2.0 / denom * c  # computed now: the next replay of pass 1 overwrites its outputs
        total = torch.zeros_like(x)
        offset = 0
        for size, theta in zip(sizes, thetas):
            step_aug = [t[offset:offset + size] for t in aug]
            inputs = [x, y, theta, weight, indices[offset:offset + size], *step_aug]
            offset += size
            total += self._graphs.replay("pass 2", self._step, inputs)
        return GradResult(float(loss), total, grad_alpha.clone(), None)

    @property
    def captures(self) -> int:
        """How many graphs were captured (pass 1 per step pattern, pass 2 per step size)."""
        return self._graphs.captures

    def _step(self, images: Tensor, labels: Tensor, theta: Tensor, weight: Tensor, indices: Tensor,
              *aug: Tensor) -> Tensor:
        return tesla_step_static(self.fm, self.augment, images, labels, theta, weight, indices, aug)


class GraphedUnroll:
    """`unrolled_grad` for a fixed model and augmentation, captured as one CUDA graph and replayed per iteration."""

    def __init__(self, fm: FunctionalModel, augment: Augment | None, warmup: int = 3) -> None:
        """Nothing is captured until the first call (which needs the shapes)."""
        self.fm, self.augment, self.warmup = fm, augment, warmup
        self.captures = 0  # how many times a graph was captured (a new input signature recaptures)
        self._key: tuple | None = None
        self._graph: Captured | None = None

    def __call__(self, images: Tensor, labels: Tensor, lr: Tensor, theta_start: Tensor, theta_target: Tensor,
                 plan: StepPlan) -> GradResult:
        """Same result as `unrolled_grad(fm, images, labels, lr, theta_start, theta_target, plan, augment)`."""
        _check_inputs(images, labels)
        sizes, indices, aug = pack_plan(plan, self.augment)
        inputs = [t.detach() for t in (images, labels, lr, theta_start, theta_target, indices, *aug)]
        key = (sizes, tuple((t.shape, t.dtype, t.device) for t in inputs))
        if key != self._key:
            self._graph = None  # free the old graph's pool before capturing the new one

            def run(images, labels, lr, theta_start, theta_target, indices, *aug) -> tuple[Tensor, Tensor, Tensor]:
                return unrolled_static(self.fm, self.augment, sizes, images, labels, lr, theta_start, theta_target,
                                       indices, aug)

            self._graph = Captured(run, inputs, warmup=self.warmup)
            self._key = key
            self.captures += 1
        grad_images, grad_lr, loss = (t.clone() for t in self._graph(inputs))  # the next replay overwrites them
        return GradResult(float(loss), grad_images, grad_lr, None)


# --- RaT-BPTT: bptt.meta_gradient from captured CUDA graphs (--fast on) -----------------------------------------
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
