"""Operators per MTT student step: nn.GroupNorm vs the closed-form InstanceNorm vs its Triton double backward.

At the papers' sizes (CIFAR-10 IPC 1-10, ConvNet-128) the MTT unroll on a GPU is launch-bound: about one small
kernel per compute operator. So the operators one student step costs (its forward, its gradient with create_graph
and its share of the outer backward) stand in for its GPU time where there is no GPU. This counts them with a
TorchDispatchMode on the CPU, as the difference between an N+1-step and an N-step unroll; "compute ops" leaves out
views (no kernel). A Triton launch counts as one compute op; the kernel itself runs in Triton's CPU interpreter
here. Compute-op counts do not depend on the width or the number of images, so the default is small.

    python benchmarks/op_count.py
    python benchmarks/op_count.py --width 128 --images 10
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: its kernels run on the CPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from distillery.augment import Augment  # noqa: E402
from distillery.methods.trajectory import make_plan, unrolled_grad  # noqa: E402
from distillery.models import FunctionalModel, create_model  # noqa: E402
from distillery.models.instancenorm import norm_kernel, triton_missing  # noqa: E402


class Count(TorchDispatchMode):
    """Counts aten operators, and those of them that are not views; not while `paused` (inside a Triton launch,
    where the interpreter copies every argument to the host and back, which the compiled kernel does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.compute = self.launches = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.total += 1
            self.compute += not func.is_view
        return func(*args, **(kwargs or {}))


class CountedKernel:
    """Stands in for the Triton kernel: `kernel[grid](...)` is one launch, with the counter paused inside."""

    def __init__(self, kernel, counter: Count) -> None:
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter.paused = True
            try:
                self.kernel[grid](*args, **kwargs)
            finally:
                self.counter.paused = False
            self.counter.launches += 1
        return launch


def model(width: int, norm: str) -> FunctionalModel:
    """ConvNet (depth 3) for 3x32x32 with distillery's InstanceNorm or the published nn.GroupNorm(C, C)."""
    m = create_model(f"ConvNetW{width}", 3, 10, (32, 32))
    if norm == "nn.GroupNorm":
        for i, layer in enumerate(m.features):
            if isinstance(layer, torch.nn.GroupNorm):
                m.features[i] = torch.nn.GroupNorm(layer.num_channels, layer.num_channels)
    return FunctionalModel(m)


def count(fm: FunctionalModel, kernel: str, images: int, steps: int) -> tuple[int, int]:
    """(all ops, compute ops and Triton launches) of one MTT segment of `steps` student steps, DSA on."""
    from distillery.models import instancenorm_triton

    g = torch.Generator().manual_seed(0)
    theta0 = fm.flatten(fm.module).detach()
    x = torch.randn(images, 3, 32, 32, generator=g)
    y = torch.arange(images) % 10
    augment = Augment()
    plan = make_plan(images, steps, None, augment, g, (32, 32), "cpu")
    counter, real = Count(), instancenorm_triton._double_backward_kernel
    instancenorm_triton._double_backward_kernel = CountedKernel(real, counter)
    try:
        with norm_kernel(kernel), counter:
            unrolled_grad(fm, x, y, torch.tensor(0.01), theta0, theta0 + 0.01, plan, augment)
    finally:
        instancenorm_triton._double_backward_kernel = real
    return counter.total + counter.launches, counter.compute + counter.launches


def main() -> None:
    """Print ops per student step for each norm path, and the ratio to nn.GroupNorm."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="ConvNet width (counts do not depend on it)")
    parser.add_argument("--images", type=int, default=10, help="synthetic images (default 10 = CIFAR-10 IPC 1)")
    parser.add_argument("--steps", type=int, default=3, help="N of the shorter unroll (per step = N+1 minus N)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = [("nn.GroupNorm (published)", "nn.GroupNorm", "torch"), ("InstanceNorm, closed form", "ours", "torch")]
    if triton_missing() is None:
        paths.append(("InstanceNorm, Triton double backward", "ours", "triton"))
    print(f"torch {torch.__version__}, ConvNet-{args.width} depth 3, {args.images} images 3x32x32, DSA on; "
          f"operators per student step (unroll of {args.steps + 1} minus {args.steps})")
    print("| path | ops (+ Triton launches) | compute ops (no views, + Triton launches) | compute vs nn.GroupNorm |")
    print("|---|---|---|---|")
    base = None
    for label, norm, kernel in paths:
        fm = model(args.width, norm)
        (t1, c1), (t0, c0) = (count(fm, kernel, args.images, n) for n in (args.steps + 1, args.steps))
        base = base or (c1 - c0)
        print(f"| {label} | {t1 - t0} | {c1 - c0} | {(c1 - c0) / base:.2f}x |", flush=True)
    if triton_missing() is not None:
        print(f"(Triton row left out: {triton_missing()})")


if __name__ == "__main__":
    main()
