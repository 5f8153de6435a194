"""What MTT and TESLA share (SPEC §4.2-4.3): the step plan, the matching loss, and its exact gradient through N steps.

One outer iteration unrolls N student SGD steps on the synthetic set,

    θ_{i+1} = θ_i − α ∇_θ CE(fm(θ_i, A_i(X[idx_i])), Y[idx_i])        (no momentum, no weight decay)

and scores the end point with L = ‖θ_N − θ*‖² / ‖θ_0 − θ*‖². Everything random about those N steps (minibatch
indices, augmentation parameters) is drawn up front into a `StepPlan`, so every gradient mode, and every recompute
inside one, sees exactly the same batches (RaT-BPTT's inner steps, bptt.py, use the same plans). `StepPlan.packed`
is the same plan as fixed-shape tensors with branch-free DSA (`PackedPlan`): the gradient functions run on either,
and on a packed plan they are what `--fast on` captures (graphed.py). Two exact gradients of L with respect to X, α
(and learned labels) live here:

* `unrolled_grad`: MTT's way, backprop through the whole unroll; autograd memory grows linearly in N (SPEC P3).
* `checkpointed_grad`: the same numbers with memory ~ sqrt(N): keep θ every k steps, then walk the segments
  backwards, recomputing each one with a graph and pushing the adjoint ∂L/∂θ through it.

TESLA's first-order gradient is in `tesla.py`; `SavedTensorBytes` measures what each mode keeps for backward.

Inner gradients use `torch.autograd.grad(..., create_graph=...)`, not `torch.func.grad`: `torch.func.grad` does
compose with an outer autograd graph, but it refuses to run under saved-tensor hooks (the memory meter below, and
`torch.autograd.graph.save_on_cpu` offloading), and `create_graph` lets each mode say exactly which steps keep a
double-backward graph (TESLA's first pass keeps none, SPEC P9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..models import FunctionalModel

if TYPE_CHECKING:
    from ..augment import Augment, AugParams


@dataclass
class StepPlan:
    """The minibatch indices and augmentation parameters of one outer iteration's N student steps."""

    indices: list[Tensor]  # step i trains on X[indices[i]]
    aug: list[AugParams | None]  # and augments it with aug[i] (None: no augmentation)

    @property
    def steps(self) -> int:
        """Number of student steps N."""
        return len(self.indices)

    def batch(self, i: int, images: Tensor, labels: Tensor, augment: Augment | None) -> tuple[Tensor, Tensor]:
        """Step i's (augmented images, labels); a plan drawn with an Augment must be replayed with that Augment."""
        idx, params = self.indices[i], self.aug[i]
        x = images[idx]
        if params is not None:
            x = augment.apply(x, params)
        return x, labels[idx]

    def packed(self, augment: Augment | None) -> PackedPlan:
        """The same steps as fixed-shape tensors with branch-free DSA (`PackedPlan`); no DSA fields when the plan has
        no augmentation (augment None or the identity strategy)."""
        sizes, indices = tuple(len(idx) for idx in self.indices), torch.cat(self.indices)
        if augment is None or not augment.tokens:
            return PackedPlan(sizes, indices, ())
        if any(p is None or p.shared or p.batch != n for p, n in zip(self.aug, sizes)):
            raise ValueError("a packed plan holds per-image DSA draws, one per step, as make_plan draws them")
        return PackedPlan(sizes, indices, augment.branch_free_fields(self.aug))


@dataclass
class PackedPlan:
    """A `StepPlan` as the tensors a CUDA graph takes: every step's indices concatenated, and each branch-free DSA
    field (`Augment.branch_free_fields`) concatenated over the steps, so the ops and shapes are the same whatever
    tokens were drawn. Its `batch` reads nothing back to the host."""

    sizes: tuple[int, ...]  # images per step
    indices: Tensor
    aug: tuple[Tensor, ...]

    @property
    def steps(self) -> int:
        """Number of student steps N."""
        return len(self.sizes)

    def batch(self, i: int, images: Tensor, labels: Tensor, augment: Augment | None) -> tuple[Tensor, Tensor]:
        """Step i's (augmented images, labels), by index_select (its backward is an index_add: no sort, no sync)."""
        start = sum(self.sizes[:i])
        idx = self.indices[start:start + self.sizes[i]]
        x = images.index_select(0, idx)
        if self.aug:
            x = augment.apply_fields(x, [t[start:start + self.sizes[i]] for t in self.aug])
        return x, labels.index_select(0, idx)


def make_plan(
    n_images: int,
    steps: int,
    batch: int | None,
    augment: Augment | None,
    generator: torch.Generator,
    im_size: tuple[int, int],
    device: torch.device | str,
) -> StepPlan:
    """Draw N steps' batches (chunks of random permutations, SPEC §4.2 step 4) and fresh per-image DSA parameters."""
    if steps < 1:
        raise UserError(f"syn_steps must be at least 1, got {steps}; set a positive number of student steps")
    batch = n_images if batch is None else batch
    if not 1 <= batch <= n_images:
        raise UserError(f"batch_syn={batch} must be between 1 and the {n_images} synthetic images; lower it or use all")
    queue: list[Tensor] = []
    indices: list[Tensor] = []
    aug: list[AugParams | None] = []
    for _ in range(steps):
        if not queue:
            perm = torch.randperm(n_images, generator=generator, device=generator.device).to(device)
            queue = list(torch.split(perm, batch))
        idx = queue.pop(0)
        indices.append(idx)
        aug.append(None if augment is None else augment.sample(len(idx), generator, im_size, device=device))
    return StepPlan(indices, aug)


def match_loss(theta_end: Tensor, theta_start: Tensor, theta_target: Tensor) -> Tensor:
    """Trajectory-matching loss ‖θ_N − θ*‖² / ‖θ_0 − θ*‖² (SPEC §4.3); equals 1 when the student does not move."""
    return (theta_end - theta_target).pow(2).sum() / (theta_start - theta_target).pow(2).sum()


@dataclass
class GradResult:
    """Loss value and gradients of one outer iteration; nothing is written to `.grad` of the inputs."""

    loss: float
    grad_images: Tensor
    grad_lr: Tensor  # 0-d
    grad_labels: Tensor | None  # only when the labels require grad


def leaf_copies(images: Tensor, labels: Tensor, lr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fresh leaves for X, Y, α so gradient modes return gradients instead of touching the callers' `.grad`."""
    x = images.detach().requires_grad_(True)
    y = labels.detach().requires_grad_(labels.requires_grad)  # hard (int64) labels never require grad
    return x, y, lr.detach().requires_grad_(True)


def make_result(loss: Tensor, grad_images: Tensor, grad_lr: Tensor, grad_labels: Tensor | None = None) -> GradResult:
    """A GradResult from a gradient mode's tensors (the loss read back to the host)."""
    return GradResult(float(loss.detach()), grad_images, grad_lr, grad_labels)


def step_gradient(fm: FunctionalModel, theta: Tensor, images: Tensor, labels: Tensor, plan: StepPlan | PackedPlan,
                  i: int, augment: Augment | None, create_graph: bool) -> Tensor:
    """g_i = ∇_θ CE(fm(θ, A_i(X[idx_i])), Y[idx_i]); with create_graph, g_i stays differentiable in θ, X, Y."""
    if not theta.requires_grad:
        theta = theta.detach().requires_grad_(True)
    x, y = plan.batch(i, images, labels, augment)
    (grad,) = torch.autograd.grad(F.cross_entropy(fm(theta, x), y), theta, create_graph=create_graph)
    return grad


def unrolled_grads(fm: FunctionalModel, images: Tensor, labels: Tensor, lr: Tensor, theta_start: Tensor,
                   theta_target: Tensor, plan: StepPlan | PackedPlan,
                   augment: Augment | None) -> tuple[Tensor, ...]:
    """(L, ∂L/∂X, ∂L/∂α[, ∂L/∂Y]) of the exact MTT gradient: keep the graph of all N steps (incl. double backward)
    and backprop once. Tensors only, no host read: with a `PackedPlan` it is what `--fast on` captures."""
    x, y, alpha = leaf_copies(images, labels, lr)
    theta = theta_start.detach()
    for i in range(plan.steps):
        theta = theta - alpha * step_gradient(fm, theta, x, y, plan, i, augment, create_graph=True)
    loss = match_loss(theta, theta_start.detach(), theta_target.detach())
    wrt = [x, alpha, y] if y.requires_grad else [x, alpha]
    return (loss.detach(), *torch.autograd.grad(loss, wrt))


def unrolled_grad(fm: FunctionalModel, images: Tensor, labels: Tensor, lr: Tensor, theta_start: Tensor,
                  theta_target: Tensor, plan: StepPlan | PackedPlan, augment: Augment | None) -> GradResult:
    """Exact MTT gradient (`unrolled_grads`) as a GradResult."""
    return make_result(*unrolled_grads(fm, images, labels, lr, theta_start, theta_target, plan, augment))


def checkpointed_grad(fm: FunctionalModel, images: Tensor, labels: Tensor, lr: Tensor, theta_start: Tensor,
                      theta_target: Tensor, plan: StepPlan | PackedPlan, augment: Augment | None,
                      every: int | None = None) -> GradResult:
    """Exact MTT gradient in memory ~ sqrt(N): keep θ every `every` steps, recompute segments going backwards."""
    steps = plan.steps
    k = math.ceil(math.sqrt(steps)) if every is None else every
    if k < 1:
        raise UserError(f"checkpoint interval must be at least 1 step, got {k}; leave it unset for ceil(sqrt(N))")
    x, y, alpha = leaf_copies(images, labels, lr)
    theta_start, theta_target = theta_start.detach(), theta_target.detach()

    # Forward without any graph between steps, keeping θ at the start of each segment.
    starts = list(range(0, steps, k))
    checkpoints = []
    theta = theta_start
    for i in range(steps):
        if i % k == 0:
            checkpoints.append(theta)
        theta = theta - alpha.detach() * step_gradient(fm, theta, x.detach(), y.detach(), plan, i, augment,
                                                       create_graph=False)

    theta_end = theta.requires_grad_(True)
    loss = match_loss(theta_end, theta_start, theta_target)
    (adjoint,) = torch.autograd.grad(loss, theta_end)  # ∂L/∂θ_N

    # Backward: for each segment, last first, rebuild its graph from the stored θ and pull the adjoint through it.
    wrt_inputs = [x, alpha, y] if y.requires_grad else [x, alpha]
    totals = [torch.zeros_like(t) for t in wrt_inputs]
    for start, theta_seg in zip(reversed(starts), reversed(checkpoints)):
        theta_seg = theta_seg.detach().requires_grad_(True)
        theta = theta_seg
        for i in range(start, min(start + k, steps)):
            theta = theta - alpha * step_gradient(fm, theta, x, y, plan, i, augment, create_graph=True)
        adjoint, *grads = torch.autograd.grad(theta, [theta_seg, *wrt_inputs], grad_outputs=adjoint)
        for total, grad in zip(totals, grads):
            total += grad
    return make_result(loss, *totals)


class SavedTensorBytes:
    """Context manager measuring the peak bytes autograd holds saved for backward (each storage counted once).

    Every tensor autograd saves while the context is active (forward graphs and create_graph double-backward graphs)
    is tracked until its graph is freed; `peak` is the largest total of distinct live storages. Tensors the caller
    keeps itself (e.g. TESLA's stored θ_i) are not saved-for-backward and are not counted unless autograd saves them.
    """

    def __init__(self) -> None:
        """Start with nothing live."""
        self.peak = 0
        self._live: dict[int, list[int]] = {}  # storage data_ptr -> [references, bytes]
        self._current = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedTensorBytes:
        """Install the saved-tensor hooks."""
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        """Remove the hooks (graphs still alive keep being tracked until they are freed)."""
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: Tensor) -> _Saved:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._live:
            self._live[key][0] += 1
        else:
            self._live[key] = [1, storage.nbytes()]
            self._current += storage.nbytes()
            self.peak = max(self.peak, self._current)
        return _Saved(self, key, tensor.detach())  # detached: holding an output with its grad_fn would be a cycle

    @staticmethod
    def _unpack(saved: _Saved) -> Tensor:
        return saved.tensor

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self._current -= entry[1]
            del self._live[key]


class _Saved:
    """A saved tensor plus the bookkeeping that tells the meter when autograd lets go of it."""

    def __init__(self, meter: SavedTensorBytes, key: int, tensor: Tensor) -> None:
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self) -> None:
        self.meter._release(self.key)
