"""Time to train one ConvNet for 300 epochs on a 10-IPC CIFAR-10-sized set (the SPEC §7 protocol), CPU and GPU:
the published evaluate_synset loop (a port, benchmarks/reference_loops.py) beside distillery's, alternating rounds.

    python benchmarks/eval_speed.py [--epochs 300] [--rounds 3] [--threads N]

Random tensors stand in for the images (speed does not depend on their values); DSA is on, as in evaluation.
"""

from __future__ import annotations

import argparse

import torch
from reference_loops import HEADER, alternate, published_evaluate, row

from distillery.evaluation.dsa import train_model


def bench(device: torch.device, epochs: int, rounds: int) -> dict:
    """min / median / max seconds and peak memory: published loop port vs ours, alternating, same process."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, 32, 32, generator=g).to(device)
    y = torch.arange(10).repeat_interleave(10).to(device)
    dsa = "color_crop_cutout_flip_scale_rotate"
    return alternate({"published loop (evaluate_synset port)": lambda: published_evaluate(x, y, 3, 10, epochs, dsa),
                      "distillery train_model": lambda: train_model("ConvNet", x, y, 3, 10, epochs=epochs, lr=0.01,
                                                                    strategy=dsa)}, rounds, device.type)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"ConvNet-128 (320,010 params), 100 images 3x32x32, batch 256, DSA on, {args.epochs}+1 epochs, "
          f"{args.rounds} alternating rounds after a warm-up")
    for d in devices:
        name = torch.cuda.get_device_name(d) if d.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        print(f"\n{name}\n{HEADER}")
        for what, st in bench(d, args.epochs, args.rounds).items():
            print(row(what, st, "— (not published)"))


if __name__ == "__main__":
    main()
