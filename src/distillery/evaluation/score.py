"""Evaluate a distilled set under the protocol it records (`evaluation.protocol`), and the cross-architecture table.

A set saved by a run or an import records its evaluation protocols (`eval`, its own first); one built in code gets
the protocol its method distills for with the default settings. Flags override single fields; every number says
which protocol produced it, and `resolve_protocol` says where each value came from.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ..data.cache import cache_dir
from ..errors import UserError, first_line
from ..io import atomic_write_text
from ..models import create_model
from ..run.files import read_config
from ..sets.synset import SyntheticSet
from . import dsa, rat
from .dsa import EvalResult, random_real_runs
from .protocol import (DEFAULT_DSA_LR, DEFAULT_EVAL_EPOCHS, FIELDS, EvalProtocol, Scoring, distilled_protocols,
                       dsa_protocol, rat_protocol, recorded_protocols)

_BASELINE_CACHE_VERSION = 1  # bump when the baseline's computation changes, so older measurements are not reused

# The protocol objects: each trains its networks its own way and scores them; `evaluate_synset` picks one by name.
SCORERS: dict[str, Callable[[Any, Any, Any, EvalProtocol, Scoring], EvalResult]] = {"dsa": dsa.score,
                                                                                     "rat": rat.score}


def set_protocols(s, spec) -> tuple[list[EvalProtocol], str]:
    """(the set's protocols, its own first; "set") or, for a set that records none, (its method's protocols with
    the default settings; "default")."""
    recorded = recorded_protocols(s.meta)
    if recorded:
        return recorded, "set"
    return distilled_protocols(s.meta, s.lr, model=s.meta.get("model") or spec.default_model, runs=5, seed=0,
                               epochs=DEFAULT_EVAL_EPOCHS, dsa_strategy=spec.dsa_strategy), "default"


def resolve_protocol(s, spec, name: str | None = None,
                     overrides: dict[str, tuple[str, Any]] | None = None) -> tuple[EvalProtocol, dict[str, str]]:
    """The protocol to score set `s` with, and where each field came from ("set", "default" or the flag).

    `name`: a protocol other than the set's own (its record if the set has one, else that protocol's defaults with
    the set's model, runs and seed). `overrides`: {flag: (field, value)}, None values skipped; a flag whose field
    the protocol lacks is a UserError (before any training). `s` must have been checked (`SyntheticSet.load`)."""
    protos, origin = set_protocols(s, spec)
    name = name or protos[0].name
    if name not in FIELDS:
        raise UserError(f"unknown --protocol '{name}'; use dsa (MTT/TESLA) or rat (RaT-BPTT)")
    proto = next((p for p in protos if p.name == name), None)
    sources = dict.fromkeys(FIELDS[name], origin)
    if proto is None:
        own = protos[0]
        proto = (dsa_protocol(own.model, own.runs, own.seed, s.lr, spec.dsa_strategy, val_fraction=own.val_fraction)
                 if name == "dsa" else rat_protocol(own.model, own.runs, own.seed, val_fraction=own.val_fraction))
        shared = ("model", "runs", "seed", "val_fraction")
        sources = {f: origin if f in shared else "default" for f in FIELDS[name]}
    changes = {}
    for flag, (field, value) in (overrides or {}).items():
        if value is None:
            continue
        if field not in FIELDS[name]:
            raise UserError(f"{flag} does not apply to the {name} protocol (it has {', '.join(FIELDS[name])}); "
                            f"drop {flag}" + (" or pass --protocol dsa" if name == "rat" else ""))
        changes[field] = value
        sources[field] = flag
    return (proto.replace(**changes) if changes else proto), sources


def parse_models(text: str | None, spec) -> list[str]:
    """'ConvNet,AlexNet' -> names, each checked to build for the dataset's image size (UserError before training)."""
    if not text:
        return []
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise UserError(f"--eval-models '{text}' names no model; pass e.g. ConvNet,AlexNet,VGG11")
    for name in names:
        try:
            create_model(name, spec.channels, spec.num_classes, spec.im_size)
        except UserError as e:
            raise UserError(f"--eval-models: {e}") from None
    return names


def evaluate_synset(s, dataset, proto: EvalProtocol | None = None, *, split: str = "test", progress: bool = False,
                    distributed: bool = False, train_loss: bool = False, fast: bool = False,
                    tick: Callable[[], None] | None = None) -> EvalResult:
    """Score SyntheticSet `s` under `proto` (default: the set's own protocol): the one place a protocol is dispatched.

    `distributed`/`fast` apply to the dsa protocol; `train_loss` to the rat protocol (its cctype 1 signal). `tick()`
    runs before every epoch or step (a background evaluation's cancellation check)."""
    proto = proto or set_protocols(s, dataset.spec)[0][0]
    how = Scoring(split, progress, distributed, fast, train_loss, tick)
    return SCORERS[proto.name](s.images, s.labels, dataset, proto, how)


def result_entry(res: EvalResult) -> dict[str, Any]:
    """What result.json stores about one evaluation."""
    out = {"protocol": res.protocol, "model": res.model, "test_mean": res.mean, "test_std": res.std,
           "test_accs": res.accs, "lr": res.lr, "split": res.split}
    if res.protocol == "rat":
        out["steps"] = res.steps
        out["val_by_steps"] = res.val_by_steps  # what the step count was chosen on (None: no validation split)
    else:
        out["epochs"] = res.epochs
    return out


def model_table(results: dict[str, EvalResult]) -> str:
    """The papers' cross-architecture table: one row per model, mean ± std (%)."""
    width = max(len(m) for m in results)
    lines = [f"{'model':<{width}}  test accuracy (%)"]
    for model, res in results.items():
        lines.append(f"{model:<{width}}  {100 * res.mean:.2f} ± {100 * res.std:.2f}  ({len(res.accs)} runs, "
                     f"{res.protocol} protocol{f', {res.steps} steps' if res.protocol == 'rat' else ''})")
    return "\n".join(lines)


def measure_baseline(dataset, run_dir: str | Path, progress: bool = True) -> dict[str, dict[str, Any]] | None:
    """The report's random-real baseline of run RUN_DIR: random real images, `ipc` per class (a fresh draw per run,
    as `random_real_baseline`), under every protocol the best set records (the final test evaluation's, lr 0.01 for
    dsa) and every model of the final table: {protocol: {model: record}}. None: config.json names no ipc."""
    run_dir = Path(run_dir)
    config = read_config(run_dir) or {}
    if not config.get("ipc"):
        return None
    best = run_dir / "best.safetensors"
    s = SyntheticSet.load(best) if best.is_file() else None
    if s is not None:
        protocols = set_protocols(s, dataset.spec)[0]
    else:  # no set to read it from: the run's settings
        protocols = distilled_protocols({}, None, model=config.get("eval_model") or config.get("model")
                                        or dataset.spec.default_model, runs=int(config.get("final_eval_runs", 5)),
                                        seed=int(config.get("seed", 0)),
                                        epochs=int(config.get("eval_epochs", DEFAULT_EVAL_EPOCHS)),
                                        dsa_strategy=dataset.spec.dsa_strategy)
    # real images have no learned step size
    protocols = [p.replace(lr=DEFAULT_DSA_LR) if p.name == "dsa" else p for p in protocols]
    extra_models = parse_models(config.get("eval_models"), dataset.spec) if isinstance(config.get("eval_models"),
                                                                                      str) else []
    own = protocols[0]
    wanted = protocols + [own.replace(model=m) for m in extra_models if m != own.model]
    out: dict[str, dict[str, Any]] = {}
    data = data_digest(dataset)
    for proto in wanted:
        def score(x, y, run_seed, proto=proto):
            real = SyntheticSet(x, y, "hard", None, s.preprocess if s is not None else {}, {})
            return evaluate_synset(real, dataset, proto.replace(runs=1, seed=run_seed), split="test",
                                   progress=False)

        cached = baseline_cache_path(data, int(config["ipc"]), proto)
        record = read_cached_baseline(cached, proto)
        if record is None:
            results = random_real_runs(dataset, int(config["ipc"]), proto.runs, proto.seed, score, progress)
            record = baseline_record([a for r in results for a in r.accs], results[-1].steps, proto)
            try:
                atomic_write_text(cached, json.dumps(record))
            except UserError as err:
                warnings.warn(f"could not cache the random-real baseline ({err}); it is measured again next time",
                              stacklevel=2)
        out.setdefault(proto.name, {})[proto.model] = record
    return out


def data_digest(dataset) -> str:
    """A hash of what a baseline is measured on: the dataset's name, preprocessing, device kind and its train and
    test tensors themselves (hashed once per report, however many protocols it measures)."""
    h = hashlib.sha256(json.dumps([dataset.spec.name, dataset.preprocess.fingerprint(),
                                   dataset.train.x.device.type]).encode())
    for split in (dataset.train, dataset.test):
        for t in (split.x, split.y):
            h.update(t.detach().cpu().contiguous().numpy().data)
    return h.hexdigest()


def baseline_cache_path(data: str, ipc: int, proto: EvalProtocol) -> Path:
    """Where the random-real baseline of exactly this data (`data_digest`), ipc and protocol is cached (under
    `cache_dir()`), so that runs on the same data share one measurement (minutes to hours) and changed data is
    measured again."""
    key = json.dumps([_BASELINE_CACHE_VERSION, data, ipc, proto.as_json()]).encode()
    return cache_dir() / "baselines" / f"{hashlib.sha256(key).hexdigest()[:32]}.json"


def baseline_record(accs: list[float], steps: int | None, proto: EvalProtocol) -> dict[str, Any]:
    """The report's record of one baseline: its runs' accuracies, their mean and population std, and the protocol's
    lr, epochs and (rat) chosen step count."""
    return {"test_mean": float(sum(accs) / len(accs)), "test_std": float(torch.tensor(accs).std(unbiased=False)),
            "test_accs": accs, "lr": proto.lr, "epochs": proto.epochs, "steps": steps}


def read_cached_baseline(path: Path, proto: EvalProtocol) -> dict[str, Any] | None:
    """The cached baseline record at `path` if it is one `measure_baseline` wrote for `proto` (its runs' accuracies
    finite fractions, the mean and std theirs); None when missing, and a warning and None when damaged."""
    try:
        if path.stat().st_size > 1 << 20:
            raise ValueError("larger than 1 MiB")
        rec = json.loads(path.read_bytes().decode("utf-8"))
        accs = rec["test_accs"] if isinstance(rec, dict) else None
        if not (isinstance(accs, list) and len(accs) == proto.runs
                and all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in accs)):
            raise ValueError(f"test_accs is not a list of {proto.runs} accuracies in [0, 1]")
        steps = rec.get("steps")
        if steps is not None and not (isinstance(steps, int) and not isinstance(steps, bool) and steps > 0):
            raise ValueError(f"steps {steps!r} is not a positive whole number")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as err:  # a JSON or UTF-8 error is a ValueError
        warnings.warn(f"the cached baseline {path} is damaged ({first_line(err)}); measuring it again", stacklevel=3)
        return None
    return baseline_record(accs, steps, proto)


def run_baseline(run_dir: str | Path, data_dir: str | None = None,
                 device: str = "auto") -> dict[str, dict[str, Any]] | None:
    """`measure_baseline` of a finished run directory: its dataset loaded as the run loaded it (preprocessing,
    validation share, resolution), from config.json."""
    from ..data import load_dataset
    from ..device import resolve_device

    config = read_config(run_dir) or {}
    if not config.get("dataset"):
        raise UserError(f"{run_dir}/config.json names no dataset; a baseline needs a finished run's directory")
    ds = load_dataset(config["dataset"], data_dir=data_dir, device=resolve_device(device), zca=config.get("zca"),
                      val_fraction=config.get("val_fraction", 0.1), seed=0, resolution=config.get("resolution"))
    return measure_baseline(ds, run_dir)
