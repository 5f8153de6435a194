"""Estimated GPU memory per process of every trajectory-matching and RaT-BPTT preset (an estimate, not a measurement).

What autograd keeps for backward grows linearly in the student steps and in the images per step, so it is measured
here on the CPU at tiny sizes (`methods.mtt.mtt_step_bytes`, `methods.ratbptt.rat_step_bytes`, which `--estimate`
also uses: one and two steps, one and two images per step, the preset's model, resolution and DSA) and extrapolated,
float32:

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

from distillery.data.registry import get_spec
from distillery.methods.mtt import mtt_step_bytes
from distillery.methods.ratbptt import rat_step_bytes
from distillery.config.presets import PRESETS

GB = 1e9
# Published peaks on an H100 (benchmarks/RESULTS.md), for calibration.
PUBLISHED = {"mtt/cifar10-ipc1": "1.6 (N 50)", "mtt/cifar10-ipc10": "8.7 (N 30)", "mtt/cifar10-ipc50": "42.5 (N 30)",
             "ratbptt/cifar10-ipc10": "42.8"}


def _model_spec(preset: dict) -> tuple[str, object]:
    spec = get_spec(preset["dataset"])
    return preset.get("model") or spec.default_model, spec


def mtt_row(name: str, p: dict) -> str:
    spec = get_spec(p["dataset"])
    n_images = p["ipc"] * spec.num_classes
    b, steps = p.get("batch_syn") or n_images, p["syn_steps"]
    a, c, params = mtt_step_bytes(*_model_spec(p), learned=p.get("labels") == "learned")
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
    a, c, r, params = rat_step_bytes(*_model_spec(p))
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
        if "syn_steps" in p:  # every trajectory-matching preset
            print(mtt_row(name, p), flush=True)
    print(f"\n| preset | model | images per step x window | real batch R | GB, 1 process | GB per process, "
          f"G={args.world} | published GB |")
    print("|---|---|---|---|---|---|---|")
    for name, p in presets.items():
        if "window" in p:  # every RaT-BPTT preset
            print(rat_row(name, p, args.world), flush=True)


if __name__ == "__main__":
    main()
