"""RaT-BPTT's configuration for `benchmarks/cifar_cpu.py`, chosen on validation: each candidate distils CIFAR-10 at
IPC 1 for `--budget` seconds of steps and is validated every 20 steps (1 network, the rat protocol's 300/600/1000
steps, the count chosen on validation); the table lists each candidate's validation curve, never a test number.

    python benchmarks/rat_cpu_configs.py --data-dir DIR [--budget 300] [--only B,D]

The library's CIFAR-10 defaults (T 200, W 60, a real batch of 5000, lr 1e-3) are the published row's, sized for a
GPU and tens of thousands of steps; on one CPU core 900 s make 60 of them (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REAL_BATCH = 500  # real images per step for every candidate (the defaults' 5000: 10x the time and memory)

# name -> options on top of the library's CIFAR-10 defaults and REAL_BATCH
CANDIDATES = {
    "A-defaults": {},
    "B-T60W20-lr1e-2": {"horizon": 60, "window": 20, "lr": 1e-2},
    "C-real-init-lr1e-3": {"horizon": 60, "window": 20, "lr": 1e-3, "pix_init": "real"},
    "D-labels-T60W20-lr1e-2": {"horizon": 60, "window": 20, "lr": 1e-2, "learn_labels": True},
    "G-real-init-lr1e-2": {"horizon": 60, "window": 20, "lr": 1e-2, "pix_init": "real"},
    "H-labels-T40W10-rb256": {"horizon": 40, "window": 10, "lr": 1e-2, "learn_labels": True, "real_batch": 256},
    "I-labels-lr3e-2": {"horizon": 60, "window": 20, "lr": 3e-2, "learn_labels": True},
    "J-labels-T100W30": {"horizon": 100, "window": 30, "lr": 1e-2, "learn_labels": True},
    "K-labels-label-lr-x5": {"horizon": 60, "window": 20, "lr": 1e-2, "learn_labels": True, "label_lr_scale": 0.2},
    # D's validation plateaued at 30 % from step 55 to 110 of its 900-s run: a lower lr, run at the full budget
    "L-labels-lr3e-3": {"horizon": 60, "window": 20, "lr": 3e-3, "learn_labels": True},
}


def candidate_options(name: str) -> dict:
    """`distill` options of candidate `name`: REAL_BATCH real images a step and the candidate's own."""
    return {"real_batch": REAL_BATCH, **CANDIDATES[name]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10 as train/ and test/ class folders, or the pickles")
    p.add_argument("--budget", type=float, default=300.0, help="seconds of distillation steps per candidate")
    p.add_argument("--work", type=Path, default=Path("runs/rat_cpu_configs"), help="where the runs go")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--only", default=None, help="comma-separated candidate name prefixes (e.g. B,D)")
    p.add_argument("--smoke", action="store_true", help="each candidate for a few steps: checks that the command runs")
    args = p.parse_args()
    from distillery import api
    from distillery.run.files import read_metrics

    names = [n for n in CANDIDATES if not args.only or n.split("-")[0] in args.only.split(",")]
    rows = ["| candidate | options | steps in budget | validation % (step: accuracy) |", "|---|---|---|---|"]
    for name in names:
        run_dir, t0 = args.work / name, time.time()
        if not (run_dir / "result.json").exists():
            api.distill("ratbptt", run_dir, None, dataset="cifar10", ipc=1, data_dir=args.data_dir,
                        threads=args.threads, **candidate_options(name),
                        time_budget=2.0 if args.smoke else args.budget, iterations=3 if args.smoke else 100000,
                        eval_every=20, eval_runs=1, final_eval_runs=1, eval_epochs=10 if args.smoke else 300,
                        rat_eval_steps="2,3,4" if args.smoke else "300,600,1000", health="warn", no_progress=True)
        metrics = read_metrics(run_dir) or []
        curve = " ".join(f"{int(r['it'])}: {100 * r['val_acc']:.1f}" for r in metrics if "val_acc" in r)
        rows.append(f"| {name} | {CANDIDATES[name] or 'the defaults'} | {int(metrics[-1]['it']) if metrics else 0} "
                    f"| {curve} |")
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
