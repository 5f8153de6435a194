"""SGD of one network's flat parameters, eager or replayed from captured CUDA graphs: the trainer experts and fast
evaluation share, and the SPEC §7 schedule every evaluation trainer runs.

Why plain autograd: `torch.func.grad_and_value` runs with grad mode on inside the transform, so GroupNorm takes its
double-differentiable backward; a plain `autograd.grad` uses the fused kernel (the expert epoch cost 1.30x the
published loop with the former). `FlatSGD` runs the epochs: one order per epoch, then one DSA draw per minibatch from
the network's own generator, and torch.optim.SGD's update on the flat vector. With `capture` every minibatch step is
replayed from one captured CUDA graph per batch size (`train_captured` for evaluation, `--eval-fast on`; experts,
`--fast on`): the same step with branch-free DSA (`sgd_static`), the weights and momentum buffer kept as the graph's
state, equal to the eager epochs up to float rounding.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import Augment
from ..capture import Captured
from ..models import FunctionalModel

MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # the evaluation optimiser (SPEC §7): SGD, restarted at the lr decay
CHECK_EVERY = 100  # passes between host reads of the on-device finite flag (a read is a sync on CUDA)
CPU_CHUNK = 32  # images per forward/backward of one CPU training step (plain_step); 16-32 measured fastest
CHUNK_MIN_PIXELS = 3 * 32 * 32  # smaller images fit the cache whole: no chunks (and the same numbers as before)

# step(flat (P,), images (B, C, H, W), labels (B, ...)) -> (grad (P,), mean loss ())
Step = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def sgd_schedule(epochs: int, lr: float, epoch: Callable[[float], Tensor], restart: Callable[[float], None],
                 on_epoch: Callable[[], None] | None = None, tick: Callable[[], None] | None = None) -> None:
    """The SPEC §7 schedule every evaluation trainer runs (module or flat, eager or captured): `epochs + 1` passes,
    `epoch(rate)` each (it returns the pass's loss, left on the device), the rate lr until pass epochs // 2 + 1
    and lr / 10 after it, where `restart(lr / 10)` restarts the momentum (the reference code rebuilds its optimiser).
    `tick()` before and `on_epoch()` after every pass. FloatingPointError on a non-finite loss, read on the host once
    per 100 passes and after the last."""
    finite: Tensor | None = None  # on the device: no host read until it is checked
    for ep in range(epochs + 1):
        if tick is not None:  # a background evaluation's cancellation check
            tick()
        ok = torch.isfinite(epoch(lr if ep <= epochs // 2 + 1 else lr * 0.1)).all()
        finite = ok if finite is None else finite & ok
        if (ep % CHECK_EVERY == CHECK_EVERY - 1 or ep == epochs) and not finite:
            raise FloatingPointError(f"non-finite training loss by epoch {ep}")
        if ep == epochs // 2 + 1:
            restart(lr * 0.1)
        if on_epoch is not None:
            on_epoch()


def cpu_chunk(x: Tensor) -> int | None:
    """CPU_CHUNK where a whole batch's activations would spill the cache (one CPU thread, images of 32x32 and
    larger), else None: the batch runs at once."""
    one_thread = x.device.type == "cpu" and torch.get_num_threads() == 1
    return CPU_CHUNK if one_thread and x[0].numel() >= CHUNK_MIN_PIXELS else None


def plain_step(fm: FunctionalModel, chunk: int | None = None) -> Step:
    """The gradient step of one network with plain autograd: `autograd.grad` of its mean loss w.r.t. the flat θ.

    On one CPU thread, for images of 32x32 and larger, the batch runs `chunk` images at a time (default CPU_CHUNK),
    gradients summed: the same gradient (float rounding), but each chunk's activations stay in cache; a whole batch
    of 256 at 32x32 spends ~40 % of its time moving 128 MB activations through memory (benchmarks/cpu_hot_path.py,
    measured at one thread). Elsewhere (CUDA, several threads, small images) the whole batch runs at once."""

    def step(flat: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        flat = flat.detach().requires_grad_(True)
        size = chunk or cpu_chunk(x) or len(x)
        grad, loss = None, None
        for i in range(0, len(x), size):  # the mean loss as a sum of chunk sums / batch, each chunk's graph freed
            part = F.cross_entropy(fm(flat, x[i:i + size]), y[i:i + size], reduction="sum") / len(x)
            (g,) = torch.autograd.grad(part, flat)
            grad, loss = (g, part.detach()) if grad is None else (grad.add_(g), loss.add_(part.detach()))
        return grad, loss

    return step


@torch.no_grad()
def sgd_update(flat: Tensor, buf: Tensor | None, grad: Tensor, rate: float | Tensor, momentum: float,
               weight_decay: float) -> None:
    """torch.optim.SGD's update of `flat` in place (dampening 0): g += wd·θ, buf = momentum·buf + g, θ -= rate·buf;
    `buf` (updated in place) is None without momentum."""
    if weight_decay:
        grad = grad.add(flat, alpha=weight_decay)
    if buf is not None:
        grad = buf.mul_(momentum).add_(grad)
    flat.sub_(grad * rate)


def sgd_static(step: Step, augment: Augment, x: Tensor, y: Tensor, flat: Tensor, buf: Tensor | None, rate: Tensor,
               idx: Tensor, aug: tuple[Tensor, ...], momentum: float = MOMENTUM,
               weight_decay: float = WEIGHT_DECAY) -> Tensor:
    """One SGD step in place on `flat` (and momentum buffer `buf`) on x[idx] with branch-free DSA fields `aug`: fixed
    shapes and no host read, so it can be captured. Returns the minibatch's mean loss."""
    xb = augment.apply_fields(x.index_select(0, idx), aug)
    grad, loss = step(flat, xb, y.index_select(0, idx))
    sgd_update(flat, buf, grad, rate, momentum, weight_decay)
    return loss


def capturable(template: nn.Module) -> bool:
    """Whether `template` can train from captured steps: no buffers (BatchNorm statistics would be updated outside
    the flat state)."""
    return not any(True for _ in template.buffers())


class FlatSGD:
    """SGD epochs of one network's flat parameters `flat` (P,), updated in place with its momentum buffer `buf` (None
    without momentum): eager, or (`capture`) each minibatch step replayed from a captured `sgd_static` graph, one per
    batch size, whose state are the weights and the buffer.

    Draws come from the network's generator in the reference order: one order per epoch, then one DSA draw per
    minibatch. `option` is the flag a failed capture names."""

    def __init__(self, step: Step, augment: Augment, x: Tensor, y: Tensor, flat: Tensor, buf: Tensor | None,
                 momentum: float, weight_decay: float, capture: bool = False, option: str = "--eval-fast") -> None:
        if capture and augment.tokens and augment.mode != "S":
            raise ValueError("captured training replays branch-free mode-'S' DSA draws")
        self.step, self.augment, self.x, self.y = step, augment, x, y
        self.flat, self.buf, self.momentum, self.weight_decay = flat, buf, momentum, weight_decay
        self.capture, self.option = capture, option
        self.rate = torch.zeros((), dtype=flat.dtype, device=flat.device)
        self.state = [t for t in (flat, buf, self.rate) if t is not None]
        self._replays: dict[int, Captured] = {}  # a short last batch: a second graph

        def sgd(*tensors: Tensor) -> Tensor:  # Captured passes `state` (these very tensors), then the inputs
            idx, *aug = tensors[len(self.state):]
            return sgd_static(step, augment, x, y, flat, buf, self.rate, idx, tuple(aug), momentum, weight_decay)

        self._sgd = sgd

    def epoch(self, gen: torch.Generator, batch: int, lr: float) -> Tensor:
        """One pass over x at step size `lr`; the mean training loss (on the device)."""
        x = self.x
        order = torch.randperm(len(x), generator=gen, device=x.device)
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        self.rate.fill_(lr)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = self._captured_step(idx, gen) if self.capture else self._eager_step(idx, gen, lr)
            total += loss * len(idx)  # a replay's output is overwritten by the next one
        return total / len(x)

    def _eager_step(self, idx: Tensor, gen: torch.Generator, lr: float) -> Tensor:
        """One SGD step on x[idx] with ordinary DSA drawn from `gen`; the minibatch's mean loss."""
        with torch.no_grad():
            xb = self.augment(self.x[idx], gen)
        grad, loss = self.step(self.flat, xb, self.y[idx])
        sgd_update(self.flat, self.buf, grad, lr, self.momentum, self.weight_decay)
        return loss.detach()

    def _captured_step(self, idx: Tensor, gen: torch.Generator) -> Tensor:
        """One replay of the captured step for this batch size (captured on first use); the minibatch's mean loss."""
        x, augment = self.x, self.augment
        draws = [augment.sample(len(idx), gen, x.shape[-2:], device=x.device)] if augment.tokens else []
        inputs = [idx, *augment.branch_free_fields(draws)]
        if len(idx) not in self._replays:
            self._replays[len(idx)] = Captured(self._sgd, inputs, self.state, option=self.option)
        return self._replays[len(idx)](inputs)


def train_captured(template: nn.Module, init: Tensor, x: Tensor, y: Tensor, epochs: int, lr: float, batch: int,
                   augment: Augment, gen: torch.Generator, on_epoch: Callable[[], None] | None = None,
                   capture: bool = True, tick: Callable[[], None] | None = None) -> Tensor:
    """`dsa.train_model` as flat SGD (`FlatSGD`) from `init`, each step replayed from a captured CUDA graph; the
    final flat parameters.

    The same draws in the same order, so the result equals `train_model` up to float rounding; after pass
    `epochs // 2 + 1` the momentum buffer is zeroed and the rate is lr / 10, as when the reference code rebuilds its
    optimiser. `capture=False` runs the eager steps (any device: how the CPU tests check it).
    """
    if not capturable(template):
        raise ValueError(f"{type(template).__name__} cannot be trained from captured steps; check capturable() first")
    flat = init.to(x.device, x.dtype).clone()
    buf = torch.zeros_like(flat)
    sgd = FlatSGD(plain_step(FunctionalModel(template)), augment, x, y, flat, buf, MOMENTUM, WEIGHT_DECAY, capture)
    sgd_schedule(epochs, lr, lambda rate: sgd.epoch(gen, batch, rate), lambda rate: buf.zero_(), on_epoch, tick)
    return flat
