"""The run's final report: test accuracy of the best-on-validation set and of the last set, each measured once under
the protocols the set records, and the cross-architecture table of the best set (RUN_DIR/result.json's numbers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..distributed import is_main_process
from ..evaluation.protocol import distilled_protocols
from ..evaluation.score import evaluate_synset, model_table, parse_models, result_entry, set_protocols
from ..sets.synset import SyntheticSet
from .config import LoopConfig


def record_protocols(s: SyntheticSet, loop: LoopConfig, spec, val_fraction: float) -> SyntheticSet:
    """Record in `s` the whole protocol it is selected and scored under (`evaluation.protocol`): the method's
    protocol completed with the run's evaluation settings. A set that records one already keeps it."""
    if "eval" in s.meta:
        return s
    protos = distilled_protocols(s.meta, s.lr, model=loop.eval_model or s.meta.get("model") or spec.default_model,
                                 runs=loop.final_eval_runs, seed=loop.seed, epochs=loop.eval_epochs,
                                 dsa_strategy=spec.dsa_strategy, val_fraction=val_fraction)
    meta = {k: v for k, v in s.meta.items() if k not in ("protocol", "rat_eval")}  # now in the records
    s.meta = {**meta, "eval": [p.as_json() for p in protos]}
    return s


def final_report(dataset, run_dir: Path, loop: LoopConfig) -> dict[str, Any]:
    """Test accuracy of the best-on-validation set and of the last set, each measured once, under the protocols the
    set records (its own first; RaT-BPTT sets also dsa, each labelled): what `distillery evaluate SET` reproduces.
    The cross-architecture table of the best set: its own protocol on each model."""
    main = is_main_process()
    has_val = len(dataset.val.y) > 0
    out: dict[str, Any] = {"selection": "best on the validation split" if has_val else
                           "none: no validation split (--val-fraction 0), so best = last"}
    if not has_val and main:
        print("no validation split (--val-fraction 0): there was nothing to select on, best = last")
    models = parse_models(loop.eval_models, dataset.spec)
    fast = loop.eval_fast == "on"
    for name in ("best", "last") if has_val else ("best",):
        s = record_protocols(SyntheticSet.load(run_dir / f"{name}.safetensors"), loop, dataset.spec,
                             dataset.val_fraction)
        if name == "last" and s.meta.get("iteration") is not None and s.meta["iteration"] == out["best"]["iteration"]:
            # the best set is the last one: the same images under the same seeds give the same numbers
            out["last"] = {k: v for k, v in out["best"].items() if k != "models"}
            if main:
                print(f"last set = best set (iteration {s.meta.get('iteration')}): measured once, above")
            continue
        protos = set_protocols(s, dataset.spec)[0]
        results = [evaluate_synset(s, dataset, p, split="test", distributed=True, fast=fast)
                   for p in protos]  # torchrun: every rank trains its share of the dsa runs
        own = results[0]
        out[name] = {"test_mean": own.mean, "test_std": own.std, "test_accs": own.accs, "protocol": own.protocol,
                     "model": own.model, "iteration": s.meta.get("iteration"), "val_acc": s.meta.get("val_acc"),
                     "lr": own.lr, "by_protocol": [{**result_entry(r), "eval_protocol": p.as_json()}
                                                   for r, p in zip(results, protos)]}
        if main:
            for res, p in zip(results, protos):
                print(f"{name} set (iteration {s.meta.get('iteration', 'last')}), {p.describe()} (recorded in the "
                      f"set): test {res}")
        if models and name == "best":
            table = {m: evaluate_synset(s, dataset, protos[0].replace(model=m), split="test", distributed=True,
                                        fast=fast) for m in models}
            out[name]["models"] = {m: result_entry(r) for m, r in table.items()}
            if main:
                print(f"cross-architecture table of the best set ({protos[0].name} protocol):")
                print(model_table(table))
    if not has_val:
        out["last"] = out["best"]
    return out
