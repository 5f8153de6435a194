"""Seconds per epoch per expert: one expert at a time vs K experts at once with torch.func.vmap.

Trains on a random CIFAR-10-sized tensor (3x32x32, 10 classes) with the real recipe (`train_experts`, DSA on every
batch, snapshots written each epoch) for one epoch per configuration, after a small warm-up run. The result decides
`distillery.experts.DEFAULT_PARALLEL`.

    python benchmarks/expert_speed.py                       # CPU, and CUDA when available
    python benchmarks/expert_speed.py --n 2000 --ks 2 4 --devices cpu --threads 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from types import SimpleNamespace

import torch

from distillery.data.preprocess import Standardize
from distillery.data.registry import get_spec
from distillery.experts import train_experts


def random_cifar(n: int, device: str) -> SimpleNamespace:
    """A dataset object with the `load_dataset` attributes train_experts reads, holding random images."""
    gen = torch.Generator().manual_seed(0)
    spec = get_spec("cifar10")

    def split(m: int) -> SimpleNamespace:
        return SimpleNamespace(x=torch.randn(m, 3, 32, 32, generator=gen).to(device),
                               y=torch.randint(0, 10, (m,), generator=gen).to(device))

    return SimpleNamespace(spec=spec, preprocess=Standardize(spec.mean, spec.std), train=split(n), val=split(100),
                           test=split(100))


def seconds_per_expert_epoch(ds: SimpleNamespace, model: str, k: int, device: str) -> tuple[float, float]:
    """(wall, process CPU) seconds of training k experts for one epoch (parallel=k), divided by k.

    CPU time is what to compare on a machine shared with other jobs, where wall time mostly measures the neighbours.
    """
    with tempfile.TemporaryDirectory() as out:
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        train_experts(ds, model, k, epochs=1, out_dir=out, device=device, parallel=k, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - wall) / k, (time.process_time() - cpu) / k


def main() -> None:
    """Print one table row per device: seconds per epoch per expert for sequential and each vmap width."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="training images (default 5000)")
    parser.add_argument("--model", default="ConvNet", help="model name (default ConvNet: depth 3, width 128)")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="vmap widths to time")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="devices (cuda skipped if absent)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [d for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model}, {args.n} images 3x32x32, batch 256, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, load average {load:.1f}")
    header = f"{'device':8} {'sequential':>15}" + "".join(f" {'vmap K=' + str(k):>15}" for k in args.ks)
    print(header + "   (wall s / CPU s per epoch per expert; lower is better)")
    for device in devices:
        ds = random_cifar(args.n, device)
        seconds_per_expert_epoch(random_cifar(256, device), args.model, 2, device)  # warm-up: imports, kernels
        print(f"{device:8}", end="", flush=True)
        for k in [1, *args.ks]:  # k = 1 is the plain one-at-a-time path
            wall, cpu = seconds_per_expert_epoch(ds, args.model, k, device)
            print(f" {wall:7.2f} /{cpu:6.1f}", end="", flush=True)
        print()


if __name__ == "__main__":
    main()
