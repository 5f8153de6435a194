"""Estimated GPU memory per process of every trajectory-matching and RaT-BPTT preset (an estimate, not a measurement).

What autograd keeps for backward grows linearly in the student steps and in the images per step, so it is measured
here on the CPU at tiny sizes (`SavedTensorBytes`: one and two steps, one and two images per step, the preset's
model, resolution and DSA) and extrapolated, float32:

    step(b)      = a + c·b          saved bytes of one student step (forward + double-backward graph) on b images
    unrolled     = N · step(b)                       (MTT default: every step's graph until the backward)
    checkpointed = k · step(b) + ceil(N/k) · P · 4   (k = ceil(sqrt N) steps recomputed, θ kept every k)
    tesla        = step(b) + N · P · 4               (one step's graph + the N stored θ_i)
    rat-bptt     = W · step(b) + (R/G) · r           (window W, real batch R split over G processes, r per image)

plus the fixed tensors (images with gradient and momentum, the expert pair or the inner-optimiser state; learned
labels: the (n, classes) logits with gradient and momentum, and each step differentiates its soft targets). Not
counted: the CUDA context (~0.5 GB), cuDNN workspaces, the allocator's cache and fragmentation, the evaluation
networks (trained after the step's graphs are gone). The published H100 peaks are printed beside for calibration.
`--trajectories K` does not change any of this (segments run one after another); G processes need it on every GPU.

    python benchmarks/memory_estimate.py                 # the table for docs/SCALING.md (about a minute on a CPU)
    python benchmarks/memory_estimate.py --only datm/    # only the presets whose name starts so
"""

from __future__ import annotations

import argparse
import math

import torch

from distillery.augment import Augment
from distillery.data.registry import get_spec
from distillery.methods.bptt import InnerOptimizer, meta_gradient
from distillery.methods.trajectory import SavedTensorBytes, make_plan, unrolled_grad
from distillery.models import FunctionalModel, create_model
from distillery.presets import PRESETS

GB = 1e9
# Published peaks on an H100 (benchmarks/RESULTS.md), for calibration.
PUBLISHED = {"mtt/cifar10-ipc1": "1.6 (N 50)", "mtt/cifar10-ipc10": "8.7 (N 30)", "mtt/cifar10-ipc50": "42.5 (N 30)",
             "ratbptt/cifar10-ipc10": "42.8"}


def _model(preset: dict) -> tuple[FunctionalModel, torch.Tensor, object]:
    spec = get_spec(preset["dataset"])
    fm = FunctionalModel(create_model(preset.get("model") or spec.default_model, spec.channels, spec.num_classes,
                                      spec.im_size))
    return fm, fm.flatten(fm.module).detach(), spec


def mtt_step_bytes(preset: dict) -> tuple[float, float, int]:
    """(a, c, P): saved bytes of one unrolled student step on b images = a + c·b, and the parameter count."""
    fm, theta, spec = _model(preset)
    augment = Augment(spec.dsa_strategy)
    g = torch.Generator().manual_seed(0)

    def peak(steps: int, batch: int) -> int:
        x = torch.randn(batch, spec.channels, *spec.im_size, generator=g)
        y = torch.arange(batch) % spec.num_classes
        if preset.get("labels") == "learned":  # soft targets that get a gradient, as learned labels do
            y = torch.softmax(torch.randn(batch, spec.num_classes, generator=g), 1).requires_grad_(True)
        plan = make_plan(batch, steps, None, augment, g, spec.im_size, "cpu")
        with SavedTensorBytes() as meter:
            unrolled_grad(fm, x, y, torch.tensor(0.01), theta, theta + 0.01, plan, augment)
        return meter.peak

    one = peak(1, 1)
    c = peak(1, 2) - one
    return peak(2, 1) - one - c, c, fm.num_params


def rat_bytes(preset: dict) -> tuple[float, float, float, int]:
    """(a, c, r, P): a window step on b synthetic images saves a + c·b bytes, the meta-loss r per real image."""
    fm, theta, spec = _model(preset)
    augment = Augment.rat()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(spec.num_classes, spec.channels, *spec.im_size, generator=g)  # ipc 1
    labels = torch.arange(spec.num_classes)

    def peak(window: int, batch: int, real: int) -> int:
        real_x = torch.randn(real, spec.channels, *spec.im_size, generator=g)
        with SavedTensorBytes() as meter:
            meta_gradient(fm, images.requires_grad_(True), labels, theta, InnerOptimizer("adam"), 0, window,
                          real_x, labels[:real], augment, None, g, num_classes=spec.num_classes,
                          task_sampler_nc=batch, batch_per_class=1)
        return meter.peak

    one = peak(1, 1, 1)
    c, r = peak(1, 2, 1) - one, peak(1, 1, 2) - one
    return peak(2, 1, 1) - one - c, c, r, fm.num_params


def mtt_row(name: str, p: dict) -> str:
    spec = get_spec(p["dataset"])
    n_images = p["ipc"] * spec.num_classes
    b, steps = p.get("batch_syn") or n_images, p["syn_steps"]
    a, c, params = mtt_step_bytes(p)
    step = a + c * b
    fixed = 3 * n_images * spec.channels * math.prod(spec.im_size) * 4 + 2 * params * 4
    if p.get("labels") == "learned":
        fixed += 3 * n_images * spec.num_classes * 4
    k = math.ceil(math.sqrt(steps))
    unrolled = steps * step + fixed
    checkpointed = k * step + math.ceil(steps / k) * params * 4 + fixed
    tesla = step + steps * params * 4 + fixed
    return (f"| `{name}` | {p.get('model')} {spec.im_size[0]}px, P={params / 1e6:.2f}M | {b} x {steps} | "
            f"{unrolled / GB:.1f} | {checkpointed / GB:.1f} | {tesla / GB:.1f} | {PUBLISHED.get(name, '')} |")


def rat_row(name: str, p: dict, world: int) -> str:
    spec = get_spec(p["dataset"])
    classes = p.get("task_sampler_nc") or spec.num_classes
    b = classes * min(p["ipc"], p.get("batch_per_class") or p["ipc"])
    a, c, r, params = rat_bytes(p)
    fixed = 3 * p["ipc"] * spec.num_classes * spec.channels * math.prod(spec.im_size) * 4 + 4 * params * 4
    est = [(p["window"] * (a + c * b) + r * p["real_batch"] / g + fixed) / GB for g in (1, world)]
    return (f"| `{name}` | {p.get('model')} {spec.im_size[0]}px, P={params / 1e6:.2f}M | {b} x W {p['window']} | "
            f"{p['real_batch']} | {est[0]:.1f} | {est[1]:.1f} | {PUBLISHED.get(name, '')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4, help="G for the RaT-BPTT column (real batch split G ways)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="only presets whose name starts with this, e.g. datm/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| preset | model | images per step x N | unrolled GB | checkpointed GB | tesla GB | published GB |")
    print("|---|---|---|---|---|---|---|")
    presets = {name: p for name, p in PRESETS.items() if name.startswith(args.only)}
    for name, p in presets.items():
        if p["method"] != "ratbptt":  # every trajectory-matching preset
            print(mtt_row(name, p), flush=True)
    print(f"\n| preset | model | images per step x window | real batch R | GB, 1 process | GB per process, "
          f"G={args.world} | published GB |")
    print("|---|---|---|---|---|---|---|")
    for name, p in presets.items():
        if p["method"] == "ratbptt":
            print(rat_row(name, p, args.world), flush=True)


if __name__ == "__main__":
    main()
