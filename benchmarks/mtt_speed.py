"""Seconds per MTT/TESLA iteration and peak GPU memory on CIFAR-10-sized data (ConvNet-128, no ZCA).

    python benchmarks/mtt_speed.py                 # the issue's table, on CUDA when available
    python benchmarks/mtt_speed.py --width 16 --repeats 1 --rows quick   # a small CPU smoke run
    python benchmarks/mtt_speed.py --rows trajectories --trajectories 1,2  # K segments per iteration (issue 12)

One iteration = draw the N-step plan (minibatches + DSA parameters), compute the gradient of the matching loss
w.r.t. the images and the step size, and take the SGD-momentum steps. Random tensors stand in for images and
expert checkpoints: speed and memory do not depend on their values. Published MTT code on an H100 (issue 3):
IPC1/N50 0.75 s 1.6 GB; IPC10/N30 0.53 s 8.7 GB; IPC50/N30 0.98 s 42.5 GB; IPC10/N20 0.33 s 5.9 GB;
IPC10/N80 1.07 s 22.7 GB.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distillery.augment import Augment
from distillery.methods.tesla import tesla_grad
from distillery.methods.trajectory import checkpointed_grad, make_plan, unrolled_grad
from distillery.models import FunctionalModel
from distillery.models.convnet import ConvNet

GRADS = {"unrolled": unrolled_grad, "checkpointed": checkpointed_grad, "tesla": tesla_grad}
ROWS = {
    "issue": [("unrolled", 1, 50), ("unrolled", 10, 30), ("unrolled", 50, 30), ("unrolled", 10, 20),
              ("unrolled", 10, 80), ("tesla", 10, 20), ("tesla", 10, 40), ("tesla", 10, 80), ("tesla", 50, 30),
              ("checkpointed", 10, 20), ("checkpointed", 10, 80), ("checkpointed", 50, 30)],
    "quick": [("unrolled", 1, 10), ("tesla", 1, 10), ("checkpointed", 1, 10)],
    "trajectories": [("unrolled", 10, 30), ("tesla", 10, 30)],
}


def one_row(mode: str, ipc: int, steps: int, width: int, repeats: int, device: torch.device,
            trajectories: int = 1) -> tuple[float, float]:
    g = torch.Generator(device=device).manual_seed(0)
    fm = FunctionalModel(ConvNet(3, 10, (32, 32), width=width).to(device))
    theta0 = fm.flatten(fm.module).detach()
    target = theta0 + 0.01 * torch.randn(theta0.shape, generator=g, device=device)
    images = torch.randn(10 * ipc, 3, 32, 32, generator=g, device=device).requires_grad_(True)
    labels = torch.arange(10, device=device).repeat_interleave(ipc)
    lr = torch.tensor(0.01, device=device, requires_grad=True)
    opt_img = torch.optim.SGD([images], lr=100, momentum=0.5)
    opt_lr = torch.optim.SGD([lr], lr=1e-5, momentum=0.5)
    augment = Augment()

    def iteration() -> None:  # K segments one after another, gradients averaged, as MTT --trajectories K
        results = [GRADS[mode](fm, images, labels, lr, theta0, target,
                               make_plan(len(images), steps, None, augment, g, (32, 32), device), augment)
                   for _ in range(trajectories)]
        images.grad = sum(res.grad_images for res in results) / trajectories
        lr.grad = sum(res.grad_lr for res in results) / trajectories
        opt_img.step()
        opt_lr.step()

    iteration()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        iteration()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", default="issue", choices=sorted(ROWS))
    p.add_argument("--device", default="auto")
    p.add_argument("--trajectories", default="1", help="comma list of K, expert segments per iteration (e.g. 1,2)")
    args = p.parse_args()
    ks = [int(k) for k in args.trajectories.split(",")]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, ConvNet width {args.width}, median of {args.repeats}")
    out = []
    for mode, ipc, steps in ROWS[args.rows]:
        for k in ks:
            s, gb = one_row(mode, ipc, steps, args.width, args.repeats, device, k)
            out.append((mode, ipc, steps, k, s, gb))
            print(f"  {mode} ipc {ipc} N {steps} K {k}: {s:.3f} s, {gb:.2f} GB", flush=True)
    print(f"\n{'grad':<14}{'IPC':>5}{'N':>5}{'K':>3}{'s/iter':>10}{'peak GB':>10}")
    for mode, ipc, steps, k, s, gb in out:
        print(f"{mode:<14}{ipc:>5}{steps:>5}{k:>3}{s:>10.3f}{gb:>10.2f}")


if __name__ == "__main__":
    main()
