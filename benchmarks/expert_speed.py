"""Seconds per expert epoch: the published loop (a port of MTT's buffer.py) vs distillery, same process, alternating.

Trains on a random CIFAR-10-sized tensor (3x32x32, 10 classes; by default 45,000 images, a full epoch of our train
split) with the expert recipe (SGD lr 0.01, no momentum, DSA on every batch, batch 256): the published loop,
distillery's expert epoch (plain autograd, `evaluation.training.FlatSGD`). Prints min / median / max, peak memory
(CUDA) and the published figure.

    python benchmarks/expert_speed.py                         # full epoch, CUDA when available
    python benchmarks/expert_speed.py --n 2560 --threads 1    # a short CPU check
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
from distillery.evaluation.training import FlatSGD, Step, plain_step
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


def epoch_from(step: Step, ds: SimpleNamespace, flat: torch.Tensor, device: str) -> Callable[[], object]:
    """One expert epoch with `step` from a copy of `flat` through distillery's `FlatSGD` (no file I/O)."""
    augment = Augment(ds.spec.dsa_strategy)

    def run() -> object:
        sgd = FlatSGD(step, augment, ds.train.x, ds.train.y, flat.clone(), None, 0.0, 0.0)
        return sgd.epoch(torch.Generator(device=device).manual_seed(0), 256, 0.01)

    return run


def ours_epoch(ds: SimpleNamespace, model: str, device: str) -> Callable[[], object]:
    """One training epoch of one expert, as `distillery experts` trains it."""
    fm = FunctionalModel(create_model(model, 3, 10, (32, 32)).to(device))
    return epoch_from(plain_step(fm), ds, fm.flatten(init_seeded(model, 3, 10, (32, 32), 0)).detach().to(device),
                      device)


def torch_func_epoch(ds: SimpleNamespace, model: str, device: str) -> Callable[[], object]:
    """One epoch through the previous one-expert path: nn.GroupNorm and torch.func.grad_and_value (before/after)."""
    fm = FunctionalModel(published_convnet(3, 10, (32, 32), 0, model).to(device))
    step = grad_and_value(lambda flat, xb, yb: F.cross_entropy(fm(flat, xb), yb))
    return epoch_from(step, ds, fm.flatten(init_seeded(model, 3, 10, (32, 32), 0)).detach().to(device), device)


def published_epoch(ds: SimpleNamespace, device: str) -> Callable[[], object]:
    """One epoch of the port of buffer.py's expert loop on the same data."""
    net = published_convnet(3, 10, (32, 32), 0).to(device)
    return lambda: published_expert_epoch(net, ds.train.x, ds.train.y, ds.spec.dsa_strategy)


def main() -> None:
    """Alternate the published loop and ours; print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=45000,
                        help="training images (default 45000: CIFAR-10's train split less our 10%% validation)")
    parser.add_argument("--model", default="ConvNet", help="model name (default ConvNet: depth 3, width 128)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--before", action="store_true", help="also time the previous torch.func one-expert step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model}, {args.n} images 3x32x32, batch 256, torch {torch.__version__}, device {args.device}, "
          f"{torch.get_num_threads()} CPU threads, load average {load:.1f}; seconds per epoch")
    ds = random_cifar(args.n, args.device)
    fns = {"published loop (buffer.py port)": published_epoch(ds, args.device),
           "distillery, one expert": ours_epoch(ds, args.model, args.device)}
    if args.before:
        before = "distillery before (nn.GroupNorm + torch.func.grad_and_value)"
        fns[before] = torch_func_epoch(ds, args.model, args.device)
    stats = alternate(fns, args.rounds, args.device)
    print(HEADER)
    published = "2.6 s per CIFAR-10 epoch" if args.n >= 45000 else "2.6 s per CIFAR-10 epoch (not this size)"
    for name, st in stats.items():
        print(row(name, st, published if name.startswith("published") else "—"))
    key = "median" if args.device == "cuda" else "cpu_median"  # a shared CPU: compare process CPU time
    base = stats["published loop (buffer.py port)"][key]
    for name, st in stats.items():
        print(f"{name}: {st[key] / base:.3f}x the published loop ({key.replace('_', ' ')}s, same process)")


if __name__ == "__main__":
    main()
