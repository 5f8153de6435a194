"""Captured CUDA graphs of the meta-gradients (`--fast on`): thin wrappers around their one implementation.

Each captured function is the plain gradient code (trajectory.py, tesla.py, bptt.py) run on a
`trajectory.PackedPlan`: the step plan as fixed-shape tensors with branch-free DSA (augment.py `branch_free_fields`),
so the ops and shapes do not depend on which token a step drew and one graph serves every iteration. Those functions
read nothing back to the host and make their leaves (X, α, θ) themselves, so a capture holds no autograd node from
an earlier (warm-up) call. A wrapper draws and packs a call's plan eagerly, replays (`capture.GraphCache`: the first
call with a new signature captures) and clones the outputs, which the next replay overwrites. The CPU tests swap
`capture.Captured` for an eager stand-in, which runs the wrappers uncaptured against the exact gradients.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor

from ..augment import Augment
from ..capture import GraphCache
from ..models import FunctionalModel
from .bptt import InnerOptimizer, draw_plan, sample_batch, warm_up_step, window_grads
from .trajectory import GradResult, PackedPlan, StepPlan, make_result

# (fm, images, labels, lr, theta_start, theta_target, plan, augment) -> (L, ∂L/∂X, ∂L/∂α[, ∂L/∂Y])
TrajectoryGrads = Callable[..., tuple[Tensor, ...]]


class GraphedGrad:
    """An MTT gradient mode (`trajectory.unrolled_grads`, `tesla.tesla_grads`) for a fixed model and augmentation,
    one captured CUDA graph per step pattern, replayed per iteration. Hard or fixed soft labels only."""

    def __init__(self, grads: TrajectoryGrads, fm: FunctionalModel, augment: Augment | None) -> None:
        """Nothing is captured until the first call (which needs the shapes)."""
        self.grads, self.fm, self.augment = grads, fm, augment
        self._graphs = GraphCache()

    @property
    def captures(self) -> int:
        """How many graphs were captured (one per step pattern and input signature)."""
        return self._graphs.captures

    def __call__(self, images: Tensor, labels: Tensor, lr: Tensor, theta_start: Tensor, theta_target: Tensor,
                 plan: StepPlan) -> GradResult:
        """Same result as `grads(fm, images, labels, lr, theta_start, theta_target, plan, augment)`, up to the float
        rounding of branch-free DSA."""
        if labels.requires_grad:
            raise ValueError("the graphed gradients do not differentiate the labels; use the plain gradient modes")
        packed = plan.packed(self.augment)

        def run(images, labels, lr, theta_start, theta_target, indices, *aug) -> tuple[Tensor, ...]:
            return self.grads(self.fm, images, labels, lr, theta_start, theta_target,
                              PackedPlan(packed.sizes, indices, aug), self.augment)

        inputs = [t.detach() for t in (images, labels, lr, theta_start, theta_target, packed.indices, *packed.aug)]
        outputs = self._graphs.replay(f"{self.grads.__name__} {packed.sizes}", run, inputs)
        return make_result(*(t.clone() for t in outputs))


class GraphedRat:
    """`bptt.meta_gradient` replayed from captured CUDA graphs: `warm_up_step` (the optimizer's formula, bias
    corrections in float64 as torch's foreach Adam) replayed `start` times, and `window_grads` once.

    Every draw is made first, eagerly and in the plain path's order (`draw_plan`); the real batch is augmented
    eagerly too. The set, θ and the optimizer moments live in static buffers (copied in once per call, not per
    replay). A new shape (a Boost-DD block, other labels) recaptures.
    """

    def __init__(self, fm: FunctionalModel, optimizer: InnerOptimizer, window_optimizer: InnerOptimizer,
                 augment_syn: Augment | None, augment_real: Augment | None, real_chunk: int | None) -> None:
        """Nothing is captured until the first call."""
        self.fm, self.optimizer, self.window_optimizer = fm, optimizer, window_optimizer
        self.augment_syn, self.augment_real, self.real_chunk = augment_syn, augment_real, real_chunk
        self._key: tuple | None = None
        self._static: tuple | None = None
        self._graphs = GraphCache()

    @property
    def captures(self) -> int:
        """How many graphs were captured (a warm-up step and a window per set shape)."""
        return self._graphs.captures

    def __call__(self, images: Tensor, labels: Tensor, theta0: Tensor, start: int, window: int, real_x: Tensor,
                 real_y: Tensor, generator: torch.Generator, *, num_classes: int, task_sampler_nc: int | None = None,
                 batch_per_class: int | None = None) -> tuple[float, Tensor, Tensor | None]:
        """Same result and draws as `meta_gradient` with this object's optimizers, augmentations and real_chunk."""
        ipc = len(images) // num_classes
        draw = partial(sample_batch, num_classes, ipc, task_sampler_nc or num_classes, batch_per_class or ipc)
        warm = draw_plan(start, draw, self.augment_syn, images, generator)
        win = draw_plan(window, draw, self.augment_syn, images, generator).packed(self.augment_syn)
        if self.augment_real is not None:
            real_x = self.augment_real(real_x, generator)
        learn = labels.requires_grad
        images_buf, labels_buf, theta_buf, moments = self._buffers(images, labels, theta0, learn, window, real_x,
                                                                   real_y)
        keys = list(moments)
        state = [images_buf, labels_buf, theta_buf, *moments.values()]  # each graph's state, read in place

        def warm_up_graph(images, labels, theta, *rest) -> None:
            idx, *aug = rest[len(keys):]
            warm_up_step(self.fm, self.optimizer, images, labels, theta, dict(zip(keys, rest)),
                         PackedPlan((len(idx),), idx, tuple(aug)), 0, self.augment_syn)

        def window_graph(images, labels, theta, *rest) -> tuple[Tensor, ...]:
            indices, *aug, real_x, real_y = rest[len(keys):]
            return window_grads(self.fm, self.window_optimizer, images, labels, learn, theta, dict(zip(keys, rest)),
                                PackedPlan(win.sizes, indices, tuple(aug)), self.augment_syn, real_x, real_y,
                                self.real_chunk)

        for idx, params in zip(warm.indices, warm.aug):
            step = StepPlan([idx], [params]).packed(self.augment_syn)
            self._graphs.replay("warm-up", warm_up_graph, [step.indices, *step.aug], state)
        outputs = self._graphs.replay(f"window {win.sizes}", window_graph,
                                      [win.indices, *win.aug, real_x.detach(), real_y], state)
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

