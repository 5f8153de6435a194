"""Seconds per expert epoch: the published loop (a port of MTT's buffer.py) vs distillery, same process, alternating.

Trains on a random CIFAR-10-sized tensor (3x32x32, 10 classes; by default 45,000 images, a full epoch of our train
split) with the expert recipe (SGD lr 0.01, no momentum, DSA on every batch, batch 256): the published loop,
distillery one expert at a time (plain autograd), and K experts at once (grouped ConvNet). Prints min / median /
max, peak memory (CUDA) and the published figure. The K rows decide `distillery.experts.DEFAULT_PARALLEL`.

    python benchmarks/expert_speed.py                              # full epoch, CUDA when available
    python benchmarks/expert_speed.py --n 2560 --ks 2 --threads 1  # a short CPU check
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from reference_loops import HEADER, alternate, published_convnet, published_expert_epoch, row
from torch.func import grad_and_value

from distillery.augment import Augment
from distillery.data.preprocess import Standardize
from distillery.data.registry import get_spec
from distillery.experts import _make_step, _sgd_epoch
from distillery.models import FunctionalModel, create_model, init_seeded


def random_cifar(n: int, device: str) -> SimpleNamespace:
    """A dataset object with the `load_dataset` attributes train_experts reads, holding random images."""
    gen = torch.Generator().manual_seed(0)
    spec = get_spec("cifar10")

    def split(m: int) -> SimpleNamespace:
        return SimpleNamespace(x=torch.randn(m, 3, 32, 32, generator=gen).to(device),
                               y=torch.randint(0, 10, (m,), generator=gen).to(device))

    return SimpleNamespace(spec=spec, preprocess=Standardize(spec.mean, spec.std), train=split(n), val=split(100),
                           test=split(100))


def ours_epoch(ds: SimpleNamespace, model: str, k: int, device: str) -> Callable[[], object]:
    """One training epoch of k experts through distillery's own `_sgd_epoch` and `_make_step` (no file I/O)."""
    fm = FunctionalModel(create_model(model, 3, 10, (32, 32)).to(device))
    flats = torch.stack([fm.flatten(init_seeded(model, 3, 10, (32, 32), s)).detach() for s in range(k)]).to(device)
    step, augment = _make_step(fm, k), Augment(ds.spec.dsa_strategy)

    def run() -> object:
        gens = [torch.Generator(device=device).manual_seed(s) for s in range(k)]
        return _sgd_epoch(step, flats, gens, ds.train.x, ds.train.y, augment, 256, 0.01)

    return run


def torch_func_epoch(ds: SimpleNamespace, model: str, device: str) -> Callable[[], object]:
    """One epoch through the previous one-expert path: nn.GroupNorm and torch.func.grad_and_value (before/after)."""
    fm = FunctionalModel(published_convnet(3, 10, (32, 32), 0, model).to(device))
    flats = fm.flatten(init_seeded(model, 3, 10, (32, 32), 0)).detach().to(device)[None]
    grad_fn = grad_and_value(lambda flat, xb, yb: F.cross_entropy(fm(flat, xb), yb))

    def step(f: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad, value = grad_fn(f[0], xs[0], ys[0])
        return grad[None], value[None]

    augment = Augment(ds.spec.dsa_strategy)
    return lambda: _sgd_epoch(step, flats, [torch.Generator(device=device).manual_seed(0)], ds.train.x, ds.train.y,
                              augment, 256, 0.01)


def published_epoch(ds: SimpleNamespace, device: str) -> Callable[[], object]:
    """One epoch of the port of buffer.py's expert loop on the same data."""
    net = published_convnet(3, 10, (32, 32), 0).to(device)
    return lambda: published_expert_epoch(net, ds.train.x, ds.train.y, ds.spec.dsa_strategy)


def main() -> None:
    """Alternate the published loop, ours one at a time and ours K at once; print one table (per expert)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=45000,
                        help="training images (default 45000: CIFAR-10's train split less our 10%% validation)")
    parser.add_argument("--model", default="ConvNet", help="model name (default ConvNet: depth 3, width 128)")
    parser.add_argument("--ks", type=int, nargs="*", default=[4], help="experts at once to time (grouped ConvNet)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--before", action="store_true", help="also time the previous torch.func one-expert step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model}, {args.n} images 3x32x32, batch 256, torch {torch.__version__}, device {args.device}, "
          f"{torch.get_num_threads()} CPU threads, load average {load:.1f}; seconds per epoch (K > 1: whole group)")
    ds = random_cifar(args.n, args.device)
    fns = {"published loop (buffer.py port)": published_epoch(ds, args.device),
           "distillery, one expert": ours_epoch(ds, args.model, 1, args.device)}
    if args.before:
        before = "distillery before (nn.GroupNorm + torch.func.grad_and_value)"
        fns[before] = torch_func_epoch(ds, args.model, args.device)
    for k in args.ks:
        fns[f"distillery, {k} experts at once"] = ours_epoch(ds, args.model, k, args.device)
    stats = alternate(fns, args.rounds, args.device)
    print(HEADER)
    published = "2.6 s per CIFAR-10 epoch" if args.n >= 45000 else "2.6 s per CIFAR-10 epoch (not this size)"
    for name, st in stats.items():
        print(row(name, st, published if name.startswith("published") else "—"))
    key = "median" if args.device == "cuda" else "cpu_median"  # a shared CPU: compare process CPU time
    base = stats["published loop (buffer.py port)"][key]
    for name, st in stats.items():
        k = int(name.split(",")[1].split()[0]) if "at once" in name else 1
        print(f"{name}: {st[key] / k / base:.3f}x the published loop per expert ({key.replace('_', ' ')}s, "
              "same process)")


if __name__ == "__main__":
    main()
