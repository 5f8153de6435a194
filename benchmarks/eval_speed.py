"""Time to train one ConvNet for 300 epochs on a 10-IPC CIFAR-10-sized set (the SPEC §7 protocol), CPU and GPU.

    python benchmarks/eval_speed.py [--epochs 300] [--threads N]

Random tensors stand in for the images (speed does not depend on their values); DSA is on, as in evaluation.
"""

from __future__ import annotations

import argparse
import time

import torch

from distillery.evaluate import train_model


def bench(device: torch.device, epochs: int) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, 32, 32, generator=g).to(device)
    y = torch.arange(10).repeat_interleave(10).to(device)
    train_model("ConvNet", x, y, 3, 10, epochs=2, lr=0.01, strategy="color_crop_cutout_flip_scale_rotate")  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    train_model("ConvNet", x, y, 3, 10, epochs=epochs, lr=0.01, strategy="color_crop_cutout_flip_scale_rotate")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = [(d, bench(d, args.epochs)) for d in devices]
    print(f"\nConvNet-128 (320,010 params), 100 images 3x32x32, batch 256, DSA on, {args.epochs}+1 epochs")
    print(f"{'device':<28}{'seconds':>10}{'ms/epoch':>10}")
    for d, s in rows:
        name = torch.cuda.get_device_name(d) if d.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        print(f"{name:<28}{s:>10.1f}{1000 * s / (args.epochs + 1):>10.1f}")


if __name__ == "__main__":
    main()
