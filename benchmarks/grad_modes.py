"""CPU micro-benchmark of the trajectory-matching gradient modes: seconds per gradient and bytes saved for backward.

Setting: a ConvNet (depth 3, instance norm) on a CIFAR-sized 10-IPC synthetic set (100 images, 3x32x32, 10 classes),
full batch, default DSA, float32; one outer-iteration gradient per (mode, N). "saved MiB" is the peak of what autograd
holds for backward (`SavedTensorBytes`); "kept MiB" is what the mode keeps itself outside autograd: the θ checkpoints
(checkpointed, every ceil(sqrt(N)) steps) or the N stored θ_i (TESLA).

    python benchmarks/grad_modes.py                      # ConvNet-128: ~0.3 GB saved per unrolled step, slow on CPU
    python benchmarks/grad_modes.py --width 16 --threads 1
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from distillery.augment import Augment
from distillery.methods.tesla import tesla_grad
from distillery.methods.trajectory import SavedTensorBytes, checkpointed_grad, make_plan, unrolled_grad
from distillery.models import FunctionalModel, init_seeded

MODES = {"unrolled": unrolled_grad, "checkpointed": checkpointed_grad, "tesla": tesla_grad}
MIB = 2**20


def kept_bytes(mode: str, steps: int, num_params: int, element_size: int) -> int:
    """Bytes of parameter vectors a mode stores itself (not saved-for-backward)."""
    if mode == "checkpointed":
        return math.ceil(steps / math.ceil(math.sqrt(steps))) * num_params * element_size
    if mode == "tesla":
        return steps * num_params * element_size
    return 0


def main() -> None:
    """Parse flags, run every (mode, N) once after a warm-up, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128, help="ConvNet width (128 = the SPEC ConvNet)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40], help="numbers of student steps N")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    fm = FunctionalModel(init_seeded(f"ConvNetW{args.width}", 3, 10, (32, 32), seed=0))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(100, 3, 32, 32, generator=gen)
    labels = torch.arange(10).repeat_interleave(10)
    theta_start = fm.flatten(fm.module).detach()
    theta_target = theta_start + 0.01 * torch.randn(theta_start.shape, generator=gen)
    lr = torch.tensor(0.01)
    augment = Augment()

    def run(mode: str, steps: int) -> tuple[float, int]:
        plan = make_plan(len(images), steps, None, augment, gen, (32, 32), "cpu")
        with SavedTensorBytes() as meter:
            start = time.perf_counter()
            MODES[mode](fm, images, labels, lr, theta_start, theta_target, plan, augment)
            seconds = time.perf_counter() - start
        return seconds, meter.peak

    print(f"ConvNet width {args.width}: {fm.num_params:,} parameters; 100 images 3x32x32; {torch.get_num_threads()} "
          f"threads; torch {torch.__version__}")
    for mode in args.modes:  # warm-up: first calls pay one-off allocation and dispatch costs
        run(mode, 1)
    print(f"{'mode':<13}{'N':>4}{'s/grad':>9}{'s/step':>8}{'saved MiB':>11}{'kept MiB':>10}")
    for steps in args.steps:
        for mode in args.modes:
            seconds, saved = run(mode, steps)
            kept = kept_bytes(mode, steps, fm.num_params, theta_start.element_size())
            print(f"{mode:<13}{steps:>4}{seconds:>9.2f}{seconds / steps:>8.3f}{saved / MIB:>11.1f}{kept / MIB:>10.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
