"""Instance norm: nn.GroupNorm(C, C) vs distillery's closed-form InstanceNorm, same process, alternating rounds.

Two workloads on ConvNet-128 (3x32x32, 10 classes): an MTT-style unroll (N student SGD steps with create_graph,
then the double backward to the images), and a first-order training step (forward + backward, as experts and
evaluation run). Prints min / median / max per workload and the ratio of medians (InstanceNorm / GroupNorm). On
CUDA with Triton the unroll also runs with the double backward as one Triton kernel (`--norm-kernel triton`).

    python benchmarks/instancenorm_speed.py --threads 1
    python benchmarks/instancenorm_speed.py --device cuda --images 100 --steps 30
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from reference_loops import HEADER, alternate, row

from distillery.models import FunctionalModel, create_model
from distillery.models.instancenorm import InstanceNorm, norm_kernel, triton_missing


def with_norm(fast: bool, device: str) -> FunctionalModel:
    """ConvNet-128 for CIFAR-sized input with distillery's InstanceNorm (fast) or plain nn.GroupNorm(C, C)."""
    model = create_model("ConvNet", 3, 10, (32, 32))
    for i, layer in enumerate(model.features):
        if isinstance(layer, torch.nn.GroupNorm):
            c = layer.num_channels
            model.features[i] = InstanceNorm(c) if fast else torch.nn.GroupNorm(c, c)
    return FunctionalModel(model.to(device))


def unroll(fm: FunctionalModel, images: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    """N differentiable SGD steps of a student on `images`, then the gradient of a matching-style loss to them."""
    images = images.detach().requires_grad_(True)
    start = fm.flatten(fm.module).detach()
    theta = start.clone().requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(fm(theta, images), labels)
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - 0.01 * g
    torch.autograd.grad((theta - start).square().sum(), images)


def train_step(fm: FunctionalModel, images: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    """`steps` first-order forward + backward passes of the template module."""
    for _ in range(steps):
        fm.module.zero_grad(set_to_none=True)
        F.cross_entropy(fm.module(images), labels).backward()


def main() -> None:
    """Alternate GroupNorm / InstanceNorm rounds for each workload and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10, help="synthetic images in the unroll (default 10 = IPC 1)")
    parser.add_argument("--steps", type=int, default=5, help="student steps in the unroll (default 5)")
    parser.add_argument("--batch", type=int, default=256, help="batch of the first-order step (default 256)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x_small = torch.randn(args.images, 3, 32, 32, generator=gen).to(args.device)
    y_small = torch.randint(0, 10, (args.images,), generator=gen).to(args.device)
    x_big = torch.randn(args.batch, 3, 32, 32, generator=gen).to(args.device)
    y_big = torch.randint(0, 10, (args.batch,), generator=gen).to(args.device)
    fms = {False: with_norm(False, args.device), True: with_norm(True, args.device)}
    unroll_name = f"unroll N={args.steps}, {args.images} images (double backward)"
    work = {unroll_name: lambda fm: unroll(fm, x_small, y_small, args.steps),
            f"train step x3, batch {args.batch} (first order)": lambda fm: train_step(fm, x_big, y_big, 3)}
    triton = args.device.startswith("cuda") and triton_missing() is None
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; seconds per call")
    print(HEADER)
    for name, fn in work.items():
        variants = [("nn.GroupNorm", False, "torch"), ("InstanceNorm", True, "torch")]
        if triton and name == unroll_name:
            variants.append(("InstanceNorm, Triton double backward", True, "triton"))

        def call(fm: FunctionalModel, kernel: str, fn=fn) -> None:
            with norm_kernel(kernel):
                fn(fm)

        stats = alternate({f"{name}, {label}": (lambda fm=fms[fast], kernel=kernel: call(fm, kernel))
                           for label, fast, kernel in variants}, args.rounds, args.device)
        for label, st in stats.items():
            print(row(label, st))
        ref, *news = stats.values()
        key = "median" if args.device == "cuda" else "cpu_median"
        for (label, _, _), new in zip(variants[1:], news):
            print(f"{name}: {label} / nn.GroupNorm = {new[key] / ref[key]:.3f} ({key.replace('_', ' ')}s)")


if __name__ == "__main__":
    main()
