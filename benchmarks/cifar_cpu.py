"""CIFAR-10 at IPC 1 for every method on the CPU within one session (issue 22).

    python benchmarks/cifar_cpu.py --data-dir DIR [--budget SECONDS] [--work runs/cifar_cpu] [--threads 1]

DIR holds CIFAR-10 as train/<class>/ and test/<class>/ image folders or as the python pickles. The run trains the
few short experts the trajectory methods need (ZCA as their presets), then runs each method (MTT, TESLA with expert
soft labels, RaT-BPTT, and DM / DATM once the library registers them) through the library's own `distill` under a
fixed budget of distillation time (`--time-budget`, evaluations not counted). Each set is selected on the validation
split (1 network per evaluation) and scored on test under its published protocol with 5 networks, beside random real
images under the same protocol (the report's baseline). `--budget` (default 2.5 h on the 2-core machine) scales
every part by budget / 2.5 h: the methods' time budgets, the experts' count and, below 2.5 h, the evaluation length
(epochs, and RaT-BPTT's steps), which the table states.

Prints one table and each method's validation curve and writes the rows for benchmarks/RESULTS.md to
benchmarks/cifar_cpu_rows.md (git-ignored). `--smoke` runs every part for a few seconds on whatever DIR holds (the
suite runs it on a tiny CIFAR-shaped folder, so that the command keeps working) and writes its rows into --work. Resumable: a finished part (result.json and report.json in its run
directory) is skipped, an interrupted one is resumed from its checkpoint with the step time it already spent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rat_cpu_configs import CANDIDATES, candidate_options  # benchmarks/, the script's own folder

BUDGET = 9000.0          # seconds: the whole run on the 2-core machine by default (2.5 h)
DISTILL_SHARE = 0.1      # of the budget, each method's --time-budget
EVAL_EPOCHS = 1000       # the published protocols' (SPEC §7.1), at the full budget
RAT_STEPS = (300, 600, 1000)  # RaT-BPTT's protocol lengths without 3000 (2.6x the cost of the rest on the CPU)
EXPERT_EPOCHS = 3        # what mtt/cifar10-ipc1 reads: max_start_epoch 2 - 1 + expert_epochs 2
ROWS = Path(__file__).with_name("cifar_cpu_rows.md")
DC_PROTOCOL = {"epochs": 300, "strategy": "none", "zca": None}  # the DC paper's coreset training (SPEC §7.1 DC row)


# RaT-BPTT on the CPU: learned labels, T 60, W 20, 500 real images a step, Adam lr 3e-3 (of D and L at this budget,
# the best on validation: RESULTS.md, 2026-12-05 third session)
RAT_CPU = "L-labels-lr3e-3"


@dataclass
class Part:
    """One method of the table: how `distill` runs it and what the paper reports at its full budget."""

    label: str
    method: str
    paper: str                                    # CIFAR-10 IPC 1, ConvNet (SPEC §8.3)
    s_per_it: float                               # measured on one thread (RESULTS.md); spaces 3 validations over the budget
    options: dict[str, Any] = field(default_factory=dict)
    experts: bool = False                         # reads the expert store


PARTS = [
    Part("MTT", "mtt", "46.3 ± 0.8", 6.4, experts=True),
    # TESLA's CIFAR-10 IPC 1 row distils without ZCA from epoch <= 5; here it shares MTT's ZCA experts (3 epochs),
    # so it takes MTT's ZCA row for the start epoch and lr_img, and adds TESLA's expert soft labels
    Part("TESLA", "tesla", "48.5 ± 0.8", 7.8, {"labels": "expert", "zca": "kornia", "max_start_epoch": 2,
                                                 "lr_img": 100}, experts=True),
    # no published CIFAR-10 IPC 1 row; the library's CIFAR-10 defaults (T 200, W 60, real batch 5000, lr 1e-3) are
    # sized for a GPU, so the CPU budget takes the candidate of benchmarks/rat_cpu_configs.py best on validation
    Part("RaT-BPTT", "ratbptt", "53.2 ± 0.7", 5.5, candidate_options(RAT_CPU)),
    Part("DM", "dm", "26.0 ± 0.8", 6.3),
    # DATM's row draws start epochs below 4 (a 6-epoch store); here it shares MTT's 3-epoch store, so below 2
    Part("DATM", "datm", "46.9 ± 0.5", 10.2, {"max_start_epoch": 2}, experts=True),
]


def available_methods() -> list[str]:
    """The methods of PARTS that the library registers (`distillery distill --method` accepts them)."""
    from distillery.methods import list_methods

    return [part.method for part in PARTS if part.method in list_methods()]


def preset_name(method: str) -> str | None:
    """The library's CIFAR-10 IPC 1 preset of `method`, if it has one."""
    from distillery.config.presets import PRESETS

    name = f"{method}/cifar10-ipc1"
    return name if name in PRESETS else None


def train_expert_store(args: argparse.Namespace, num: int) -> Path:
    """`num` ZCA (kornia) experts of EXPERT_EPOCHS epochs; `train_experts` resumes a partly trained store."""
    from distillery.api import load_dataset
    from distillery.experts import finished_experts, train_experts

    out = args.work / f"experts-n{num}-e{EXPERT_EPOCHS}"
    if len(finished_experts(out)) >= num:
        return out
    ds = load_dataset("cifar10", data_dir=args.data_dir, zca="kornia")
    train_experts(ds, "ConvNet", num, epochs=EXPERT_EPOCHS, out_dir=out, seed=0, progress=True)
    return out


def run_part(part: Part, args: argparse.Namespace, experts: Path) -> dict[str, Any]:
    """Distil with `part` under its time budget (resuming an interrupted run) and return result + report json."""
    from distillery import api
    from distillery.run.checkpoint import CHECKPOINT
    from distillery.run.files import read_config, read_json_file, read_result

    run_dir = args.work / part.label.lower()
    wall = run_dir / "wall_seconds.json"  # the benchmark's own file, beside the run's
    started = time.time()
    if read_result(run_dir) is not None:
        print(f"{part.label}: distilled earlier, in {run_dir}")
    else:
        budget, scale = (2.0, 0.002) if args.smoke else (DISTILL_SHARE * args.budget, min(1.0, args.budget / BUDGET))
        preset = preset_name(part.method)
        least = 2 if args.smoke else 10
        steps = ",".join(str(max(least + i, round(n * scale))) for i, n in enumerate(RAT_STEPS))
        options = {"dataset": "cifar10", "ipc": 1, **part.options, "data_dir": args.data_dir, "threads": args.threads,
                   "time_budget": budget, "iterations": 2 if args.smoke else 100000, "eval_runs": 1,
                   "final_eval_runs": 1 if args.smoke else 5, "eval_epochs": max(least, round(EVAL_EPOCHS * scale)),
                   **({"rat_eval_steps": steps} if part.method == "ratbptt" else {}),
                   "eval_every": max(1, round(budget / 3 / part.s_per_it)), "health": "warn",
                   "no_progress": True, "resume": (run_dir / CHECKPOINT).exists(),
                   **({"experts": experts} if part.experts else {})}
        print(f"{part.label}: distilling for {budget:.0f} s into {run_dir} (preset {preset or 'none: defaults'})")
        api.distill(part.method, run_dir, preset, **options)
    if read_json_file(run_dir, "report.json") is None:  # stopped during the report's baseline: measure it again
        zca = read_config(run_dir)["zca"]
        api.write_report(run_dir, dataset=api.load_dataset("cifar10", data_dir=args.data_dir, zca=zca), progress=False)
    spent = time.time() - started
    if spent > 1:  # the whole part's wall time (distillation, validations, final runs, baseline), over resumes
        wall.write_text(json.dumps((json.loads(wall.read_text()) if wall.exists() else 0.0) + spent))
    return {**read_result(run_dir), "report": read_json_file(run_dir, "report.json"),
            "wall": json.loads(wall.read_text()) if wall.exists() else None}


def dc_protocol_baseline(args: argparse.Namespace) -> list[float]:
    """Test accuracies of random real images under the DC paper's protocol (no ZCA, no augmentation, 300 epochs,
    lr 0.01), 5 networks, each on a fresh draw of 1 image per class."""
    from distillery.api import load_dataset
    from distillery.evaluation.dsa import evaluate_set, random_real_runs

    path = args.work / "random_dc_protocol.json"
    if not path.exists():
        ds = load_dataset("cifar10", data_dir=args.data_dir, zca=DC_PROTOCOL["zca"])
        epochs, draws = (2, 1) if args.smoke else (DC_PROTOCOL["epochs"], 5)
        runs = random_real_runs(ds, 1, draws, 0, lambda x, y, s: evaluate_set(
            x, y, ds, runs=1, epochs=epochs, strategy=DC_PROTOCOL["strategy"], seed=s,
            progress=False), progress=False)
        path.write_text(json.dumps([a for r in runs for a in r.accs]))
    return json.loads(path.read_text())


def pct(accs: list[float]) -> str:
    """mean ± population std in %."""
    mean = sum(accs) / len(accs)
    std = (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def val_curve(run_dir: Path) -> str:
    """'it:val%' at every validation evaluation of a run, from its metrics.csv."""
    from distillery.run.files import read_metrics

    rows = [r for r in read_metrics(run_dir) or [] if "val_acc" in r]
    return "  ".join(f"{int(r['it'])}:{100 * r['val_acc']:.1f}" for r in rows)


def table(results: dict[str, dict[str, Any]], parts: list[Part], dc: list[float] | None) -> list[str]:
    """Markdown rows: method, iterations, s/iteration, best-on-val test accuracy, random (same protocol), paper."""
    rows = ["| method (CIFAR-10 JPEG q75, IPC 1) | iterations in budget | s/iteration | test acc. % (best on val, "
            "5 nets) | random real, same protocol | paper (full budget) | part wall time |",
            "|---|---|---|---|---|---|---|"]
    for part in parts:
        r = results.get(part.label)
        if r is None:
            continue
        if "error" in r:
            rows.append(f"| {part.label} | failed: {r['error']} | | | | {part.paper} | |")
            continue
        best, base = r["best"], r["report"].get("random_baseline", {})
        its = r["iterations_reached"]
        minutes = f"{r['wall'] / 60:.0f} min" if r.get("wall") else "-"
        for rec in best["by_protocol"]:
            rand = next(iter(base.get(rec["protocol"], {}).values()), None)
            length = f"{rec['steps']} steps" if rec["protocol"] == "rat" else f"{rec['epochs']} epochs"
            rows.append(f"| {part.label} ({rec['protocol']} protocol, {length}) | {its} (best at "
                        f"{best['iteration']}) | {r['step_seconds'] / max(its, 1):.1f} | {pct(rec['test_accs'])} | "
                        f"{pct(rand['test_accs']) if rand else '-'} | {part.paper} | {minutes} |")
    if dc is not None:
        rows.append(f"| random real, DC-paper protocol (no ZCA, no augmentation, 300 epochs) | | | | {pct(dc)} | "
                    "14.4 (DC/MTT papers; DATM/PAD tables: 15.4 ± 0.3) | |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10 as train/ and test/ class folders, or the pickles")
    p.add_argument("--budget", type=float, default=BUDGET, help=f"total seconds (default {BUDGET:.0f}: 2.5 h)")
    p.add_argument("--work", type=Path, default=Path("runs/cifar_cpu"), help="where the runs go (resumable)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (1 on a shared machine)")
    p.add_argument("--rat-candidate", default=RAT_CPU, choices=list(CANDIDATES),
                   help=f"RaT-BPTT's options, a candidate of rat_cpu_configs.py (default {RAT_CPU})")
    p.add_argument("--smoke", action="store_true", help="every part for a few seconds: checks that the command runs")
    p.add_argument("--only", default=None, help="comma-separated parts to run: MTT, TESLA, RaT-BPTT, DM, DATM, "
                   "random-dc (default: all)")
    args = p.parse_args()
    if not args.smoke and not 600 <= args.budget <= 4 * BUDGET:
        sys.exit(f"--budget {args.budget:g} is out of range: give 600 to {4 * BUDGET:g} seconds")
    import torch

    from distillery.hostmem import keep_freed_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    known = set(available_methods())
    parts = [replace(q, options=candidate_options(args.rat_candidate)) if q.method == "ratbptt" else q
             for q in PARTS if q.method in known and (not args.only or q.label in args.only.split(","))]
    keep_freed_memory()
    num_experts = 2 if args.budget >= 0.6 * BUDGET and not args.smoke else 1
    t0 = time.time()
    print(f"CIFAR-10 (JPEG copy, quality 75) IPC 1 on the CPU: budget {args.budget:.0f} s, {num_experts} expert(s) x "
          f"{EXPERT_EPOCHS} epochs, {DISTILL_SHARE * args.budget:.0f} s per method: "
          f"{', '.join(q.label for q in parts)}")
    experts = train_expert_store(args, num_experts) if any(q.experts for q in parts) else args.work
    print(f"experts ready after {time.time() - t0:.0f} s")
    results: dict[str, dict[str, Any]] = {}
    for part in parts:
        try:
            results[part.label] = run_part(part, args, experts)
        except Exception as err:  # one failing method (e.g. a registry method without a CIFAR-10 preset) still
            results[part.label] = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:200]}  # leaves a table
            print(f"{part.label} failed: {results[part.label]['error']}", file=sys.stderr)
    dc = dc_protocol_baseline(args) if not args.only or "random-dc" in args.only.split(",") else None
    rows = table(results, parts, dc)
    print("\n".join(rows))
    for part in parts:
        if "error" not in results[part.label]:
            print(f"validation curve of {part.label} (iteration:val %): "
                  f"{val_curve(args.work / part.label.lower())}")
    out = args.work / ROWS.name if args.smoke else ROWS
    out.write_text("\n".join(rows) + "\n")
    print(f"{time.time() - t0:.0f} s in all; rows for RESULTS.md in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
