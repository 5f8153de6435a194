"""The CPU hot path at CIFAR-10 size beside the published loops' ports, in one process, and beside its arithmetic floor.

    python benchmarks/cpu_hot_path.py                       # MTT IPC 1 N 50, expert epoch (2560 images), RaT-BPTT
    python benchmarks/cpu_hot_path.py --rows mtt --steps 10 --rounds 2   # a short check

Rows, ConvNet-128 (depth 3, instance norm) on random 3x32x32 tensors (speed does not depend on the values):
  * MTT iteration (CIFAR-10 IPC 1, the published N = 50, DSA): the port of distill.py's iteration
    (`reference_loops.published_mtt_iteration`: nn.GroupNorm, DSA op by op) against `unrolled_grad`, on the same
    step plan; their image and step-size gradients are compared (equal results).
  * TESLA iteration, same setting (ours; no published port).
  * expert epoch (batch 256, DSA, SGD lr 0.01): the port of buffer.py's loop against the experts' `FlatSGD` epoch with the
    plain step, from the same init and generator; their parameters after one epoch are compared.
  * RaT-BPTT outer step (ours; `--rat-*` set its size, smaller than the published 200-step horizon by default).
Runs alternate (published, ours, published, ...) so the shared machine's load falls on both; the ratio is of
process CPU seconds (medians), what a CPU shared with other jobs measures fairly. The floor is FLOPs counted by
`torch.utils.flop_counter` (convolutions and matmuls: forward, backward and, for MTT, double backward) divided by
the measured GFLOP/s of a 2048^3 float32 matmul on one thread: the CPU seconds the arithmetic needs at that peak.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch
from reference_loops import alternate, published_convnet, published_expert_epoch, published_mtt_iteration
from torch.utils.flop_counter import FlopCounterMode

from distillery.augment import Augment
from distillery.data.registry import get_spec
from distillery.evaluation.training import FlatSGD, plain_step
from distillery.methods.bptt import InnerOptimizer, meta_gradient
from distillery.methods.tesla import tesla_grad
from distillery.methods.trajectory import make_plan, unrolled_grad
from distillery.models import FunctionalModel, init_seeded

SIZE = (32, 32)


def matmul_gflops(threads: int, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of an n^3 float32 matmul on `threads` threads (the machine's practical peak)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.process_time() if threads == 1 else time.perf_counter()
    for _ in range(reps):
        a @ b
    seconds = (time.process_time() if threads == 1 else time.perf_counter()) - start
    torch.set_num_threads(previous)
    return 2 * n ** 3 * reps / seconds / 1e9


def flops(fn: Callable[[], object]) -> float:
    """Convolution and matmul FLOPs of one call of fn (forward, backward, double backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def mtt_rows(steps: int, rounds: int) -> tuple[dict, dict, str]:
    """Published distill.py iteration vs ours (and TESLA) on one plan: timings, FLOPs per row, equality note."""
    g = torch.Generator().manual_seed(0)
    fm = FunctionalModel(init_seeded("ConvNet", 3, 10, SIZE, 0))
    published = published_convnet(3, 10, SIZE, 0)
    theta0 = fm.flatten(fm.module).detach()
    target = theta0 + 0.01 * torch.randn(theta0.shape, generator=g)
    images = torch.randn(10, 3, *SIZE, generator=g).requires_grad_(True)
    labels = torch.arange(10)
    lr = torch.tensor(0.01, requires_grad=True)
    augment = Augment(get_spec("cifar10").dsa_strategy)
    plan = make_plan(10, steps, None, augment, g, SIZE, "cpu")
    ours = unrolled_grad(fm, images, labels, lr, theta0, target, plan, augment)
    published_mtt_iteration(published, images, labels, lr, theta0, target, plan, augment.strategy)
    rel = ((images.grad - ours.grad_images).norm() / images.grad.norm()).item()
    equal = f"image-gradient relative difference {rel:.1e}, step-size gradient {lr.grad.item():.6g} vs " \
            f"{ours.grad_lr.item():.6g}"
    fns = {"MTT iteration: published (distill.py port)":
           lambda: published_mtt_iteration(published, images, labels, lr, theta0, target, plan, augment.strategy),
           "MTT iteration: distillery (unrolled)":
           lambda: unrolled_grad(fm, images, labels, lr, theta0, target, plan, augment),
           "TESLA iteration: distillery":
           lambda: tesla_grad(fm, images, labels, lr, theta0, target, plan, augment)}
    counts = {name: flops(fn) for name, fn in fns.items() if "distillery" in name}
    counts[next(iter(fns))] = counts["MTT iteration: distillery (unrolled)"]  # the same arithmetic
    return alternate(fns, rounds, "cpu"), counts, equal


def expert_epoch(fm: FunctionalModel, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 augment: Augment) -> torch.Tensor:
    """The parameters after one expert epoch (SGD lr 0.01, batch 256, generator seed 0) from a copy of `flat`."""
    out = flat.clone()
    FlatSGD(plain_step(fm), augment, x, y, out, None, 0.0, 0.0).epoch(torch.Generator().manual_seed(0), 256, 0.01)
    return out


def expert_rows(n: int, rounds: int) -> tuple[dict, float, str]:
    """Published buffer.py epoch vs ours on the same data, init and generator: timings, FLOPs, equality note."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, *SIZE, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    strategy = get_spec("cifar10").dsa_strategy
    fm = FunctionalModel(init_seeded("ConvNet", 3, 10, SIZE, 0))
    flat = fm.flatten(fm.module).detach()
    step, augment = plain_step(fm), Augment(strategy)

    def ours() -> torch.Tensor:
        return expert_epoch(fm, flat, x, y, augment)

    net = published_convnet(3, 10, SIZE, 0)
    published_expert_epoch(net, x, y, strategy)  # from the same init and generator seed as `ours`
    theirs = fm.flatten(net).detach()
    rel = ((ours() - theirs).norm() / (theirs - flat).norm()).item()
    equal = f"parameters after one epoch: |ours - published| / |published update| = {rel:.1e}"
    fns = {"expert epoch: published (buffer.py port)": lambda: published_expert_epoch(net, x, y, strategy),
           "expert epoch: distillery": ours}
    count = flops(lambda: step(flat, x[:256], y[:256])) * n / 256
    return alternate(fns, rounds, "cpu"), count, equal


def float64_checks(steps: int = 5, images: int = 512) -> list[str]:
    """Ours against the published ports in float64 (small sizes), where float32 rounding, amplified over 50 student
    steps or many SGD steps, cannot hide a difference in the computation."""
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(0)
        fm = FunctionalModel(init_seeded("ConvNet", 3, 10, SIZE, 0).double())
        theta0 = fm.flatten(fm.module).detach()
        target = theta0 + 0.01 * torch.randn(theta0.shape, generator=g)
        x = torch.randn(10, 3, *SIZE, generator=g).requires_grad_(True)
        lr = torch.tensor(0.01, requires_grad=True)
        augment = Augment(get_spec("cifar10").dsa_strategy)
        plan = make_plan(10, steps, None, augment, g, SIZE, "cpu")
        ours = unrolled_grad(fm, x, torch.arange(10), lr, theta0, target, plan, augment)
        published_mtt_iteration(published_convnet(3, 10, SIZE, 0).double(), x, torch.arange(10), lr, theta0, target,
                                plan, augment.strategy)
        mtt = ((x.grad - ours.grad_images).norm() / x.grad.norm()).item()
        xs, ys = torch.randn(images, 3, *SIZE, generator=g), torch.randint(0, 10, (images,), generator=g)
        net = published_convnet(3, 10, SIZE, 0).double()
        start = fm.flatten(net).detach()
        published_expert_epoch(net, xs, ys, augment.strategy)
        theirs = fm.flatten(net).detach()
        mine = expert_epoch(fm, start, xs, ys, augment)
        expert = ((mine - theirs).norm() / (theirs - start).norm()).item()
    finally:
        torch.set_default_dtype(torch.float32)
    return [f"float64, MTT N {steps}: image-gradient relative difference to the published port {mtt:.1e}",
            f"float64, expert epoch over {images} images: |ours - published| / |published update| = {expert:.1e}"]


def rat_rows(ipc: int, horizon: int, window: int, real_batch: int, rounds: int) -> tuple[dict, float]:
    """One RaT-BPTT outer step (warm-up horizon - window steps, then the window unrolled): timings, FLOPs."""
    g = torch.Generator().manual_seed(0)
    fm = FunctionalModel(init_seeded("ConvNet", 3, 10, SIZE, 0))
    theta0 = fm.flatten(fm.module).detach()
    images = torch.randn(10 * ipc, 3, *SIZE, generator=g).requires_grad_(True)
    labels = torch.arange(10).repeat_interleave(ipc)
    real_x, real_y = torch.randn(real_batch, 3, *SIZE, generator=g), torch.randint(10, (real_batch,), generator=g)
    aug = Augment.rat()

    def step() -> object:
        return meta_gradient(fm, images, labels, theta0, InnerOptimizer("adam", lr=1e-3), horizon - window, window,
                             real_x, real_y, aug, aug, g, num_classes=10)

    return alternate({"RaT-BPTT step: distillery": step}, rounds, "cpu"), flops(step)


def main() -> None:
    """Time the rows, print one Markdown table with ratios to the published ports and fractions of the floor."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="*", default=["mtt", "expert", "rat", "check"],
                   choices=["mtt", "expert", "rat", "check"], help="check: the float64 equality checks")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for every row (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds after one warm-up (default 3)")
    p.add_argument("--steps", type=int, default=50, help="MTT/TESLA student steps N (default 50, CIFAR-10 IPC 1)")
    p.add_argument("--expert-images", type=int, default=2560, help="images in the timed expert epoch (default "
                   "2560 = 10 batches; s/epoch scaled to 45,000)")
    p.add_argument("--rat-ipc", type=int, default=1)
    p.add_argument("--rat-horizon", type=int, default=20, help="RaT-BPTT T (published CIFAR-10: 200)")
    p.add_argument("--rat-window", type=int, default=10, help="RaT-BPTT W (published CIFAR-10: 60)")
    p.add_argument("--rat-real-batch", type=int, default=500, help="real images of the meta-loss (published 5000)")
    args = p.parse_args()
    peak = {t: matmul_gflops(t) for t in (1, 2)}
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} thread(s), load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; matmul 2048^3 float32: {peak[1]:.0f} GFLOP/s on 1 "
          f"thread (CPU time), {peak[2]:.0f} on 2 (wall, shared machine)")
    rows: list[tuple[str, dict, float, float | None]] = []  # name, stats, FLOPs, scale to report
    notes = []
    if "mtt" in args.rows:
        stats, counts, equal = mtt_rows(args.steps, args.rounds)
        notes.append(f"MTT N {args.steps}: {equal}; GFLOP per iteration: MTT "
                     f"{counts['MTT iteration: distillery (unrolled)'] / 1e9:.0f}, TESLA "
                     f"{counts['TESLA iteration: distillery'] / 1e9:.0f}")
        rows += [(name, st, counts[name], 1.0) for name, st in stats.items()]
    if "expert" in args.rows:
        stats, count, equal = expert_rows(args.expert_images, args.rounds)
        notes.append(f"expert epoch over {args.expert_images} images: {equal}; {count / 1e9:.0f} GFLOP")
        rows += [(name, st, count, 45000 / args.expert_images) for name, st in stats.items()]
    if "rat" in args.rows:
        stats, count = rat_rows(args.rat_ipc, args.rat_horizon, args.rat_window, args.rat_real_batch, args.rounds)
        notes.append(f"RaT-BPTT IPC {args.rat_ipc}, T {args.rat_horizon}, W {args.rat_window}, real batch "
                     f"{args.rat_real_batch}: {count / 1e9:.0f} GFLOP per step")
        rows += [(name, st, count, 1.0) for name, st in stats.items()]
    if "check" in args.rows:
        notes += float64_checks()
    print("\n| what | wall s min / median | CPU s median | x published (CPU s) | floor CPU s | of floor |")
    print("|---|---|---|---|---|---|")
    published = {name.split(":")[0]: st["cpu_median"] for name, st, _, _ in rows if "published" in name}
    for name, st, count, scale in rows:
        base = published.get(name.split(":")[0])
        ratio = f"{base / st['cpu_median']:.2f}x" if base and "published" not in name else "—"
        floor = count / (peak[1] * 1e9)  # CPU seconds at one thread's peak, whatever the thread count
        unit = f" (x{scale:.1f}: s per 45,000-image epoch)" if scale != 1.0 else ""
        print(f"| {name}{unit} | {st['min'] * scale:.2f} / {st['median'] * scale:.2f} | "
              f"{st['cpu_median'] * scale:.2f} | {ratio} | {floor * scale:.2f} | {floor / st['cpu_median']:.0%} |")
    print()
    for note in notes:
        print(f"* {note}")


if __name__ == "__main__":
    main()
