"""Time DSA per call on a 256×3×32×32 batch: modes S and M, composed vs sequential warps, CPU and CUDA if present."""

from __future__ import annotations

import argparse
import time

import torch

from distillery.augment import Augment


def time_call(
    aug: Augment, x: torch.Tensor, generator: torch.Generator, backward: bool, rounds: int, calls: int
) -> float:
    """Milliseconds per sample+apply (+ backward to x): median over rounds of the mean of `calls` calls.

    Averaging within a round covers mode S's mix of tokens; the median over rounds ignores rounds slowed by other
    processes on a shared machine."""

    def sync() -> None:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    def round_ms() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            y = aug(x, generator)
            if backward:
                y.sum().backward()
        sync()
        return 1000 * (time.perf_counter() - start) / calls

    round_ms()  # warm-up
    times = sorted(round_ms() for _ in range(rounds))
    return times[len(times) // 2]


def main() -> None:
    """Print one table row per (device, mode, warp); forward and forward+backward milliseconds."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=12, help="calls per timed round")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    configs = [("S", True, "—"), ("M", True, "composed"), ("M", False, "sequential")]
    print(f"DSA '{Augment().strategy}', batch {args.batch}×3×{args.size}×{args.size}, median over {args.rounds} "
          f"rounds of {args.calls} calls (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    print(f"{'device':<6} {'mode':<4} {'warp':<10} {'fwd ms':>8} {'fwd+bwd ms':>11}")
    for device in devices:
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device, generator=generator)
        x.requires_grad_()
        for mode, compose, label in configs:
            aug = Augment(mode=mode, compose=compose)
            fwd = time_call(aug, x.detach(), generator, backward=False, rounds=args.rounds, calls=args.calls)
            bwd = time_call(aug, x, generator, backward=True, rounds=args.rounds, calls=args.calls)
            print(f"{device.type:<6} {mode:<4} {label:<10} {fwd:>8.2f} {bwd:>11.2f}")


if __name__ == "__main__":
    main()
