"""Seconds per RaT-BPTT outer step and peak GPU memory at the published CIFAR-10 IPC10 setting (SPEC §6.9).

    python benchmarks/ratbptt_speed.py                       # ConvNet-128, W=60, T=200, real batch 5000, Adam 1e-3
    python benchmarks/ratbptt_speed.py --width 16 --horizon 20 --window 5 --real-batch 256 --repeats 1   # CPU smoke

The window start is drawn uniformly in [0, T-W] per step, so the warm-up length (and the time) varies from step to
step: we report the median and the mean over `--repeats` steps. Random tensors stand in for CIFAR-10. The
published code on an H100 (issue 5): 1.4 to 3.3 s per step (about 2.5 on average) and 42.8 GB.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distillery.augment import Augment
from distillery.methods.bptt import InnerOptimizer, meta_gradient, window_start
from distillery.methods.ratbptt import EmaClipper
from distillery.models import FunctionalModel, init_seeded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--window", type=int, default=60)
    p.add_argument("--real-batch", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    model = f"ConvNetW{args.width}"
    images = torch.randn(10 * args.ipc, 3, 32, 32, generator=g, device=device).requires_grad_(True)
    labels = torch.arange(10, device=device).repeat_interleave(args.ipc)
    real_x = torch.randn(args.real_batch, 3, 32, 32, generator=g, device=device)
    real_y = torch.randint(10, (args.real_batch,), generator=g, device=device)
    outer = torch.optim.Adam([images], lr=1e-3)
    clip = EmaClipper(0.9)
    inner = InnerOptimizer("adam", lr=1e-3)
    aug = Augment.rat()
    times, starts = [], []
    for r in range(args.repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fm = FunctionalModel(init_seeded(model, 3, 10, (32, 32), seed=r).to(device))
        theta0 = fm.flatten(fm.module).detach()
        start = window_start(0, args.horizon, args.window, torch.Generator().manual_seed(r))
        _, gx, _ = meta_gradient(fm, images, labels, theta0, inner, start, args.window, real_x, real_y, aug, aug, g,
                                 num_classes=10)
        images.grad, _ = clip(gx)
        outer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if r == 0:  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            continue
        times.append(time.perf_counter() - t)
        starts.append(start)
    cuda = device.type == "cuda"
    memory = (f"{torch.cuda.max_memory_allocated() / 1e9:.2f} / {torch.cuda.max_memory_reserved() / 1e9:.2f}"
              if cuda else "n/a (CPU)")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"\n{name}, torch {torch.__version__}, ConvNet width {args.width}, IPC {args.ipc}, T={args.horizon}, "
          f"W={args.window}, real batch {args.real_batch}, {args.repeats} steps (window starts {starts})")
    print("| s/step min / median / max | mean | peak GB allocated / reserved | published (H100) |\n|---|---|---|---|")
    print(f"| {min(times):.3f} / {statistics.median(times):.3f} / {max(times):.3f} | {statistics.mean(times):.3f} | "
          f"{memory} | 1.4-3.3 s (about 2.5), 42.8 GB |")


if __name__ == "__main__":
    main()
