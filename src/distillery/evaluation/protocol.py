"""The evaluation protocol a distilled set was selected under, recorded in the set so that it is scored the same way.

A set's metadata holds `eval`: a list of protocol records, the set's own first (the one its validation evaluations
and its final test number used), then any the final report adds for comparison (RaT-BPTT sets are also scored under
dsa). `distillery evaluate`, the report and the run's final evaluation use these records unless a flag overrides a
field, and say which values came from where. A record is checked field by field (type, range) when a set is loaded.

    dsa  MTT/TESLA's evaluate_synset (SPEC §7): SGD momentum 0.9, weight decay 5e-4, minibatches of `batch`, DSA
         `augment` on every batch, `epochs + 1` passes, lr / 10 with a rebuilt optimiser after pass epochs // 2 + 1
         (schedule "step").
    rat  RaT-BPTT's published test() (SPEC §6.6): the inner `optimizer` at a constant lr, one `subsample` batch
         (`classes_per_batch` x `batch_per_class`) per step with `augment`, cumulative `steps`, one count chosen on
         the validation split (schedule "constant").
Network r of `runs` starts from, and draws from, seed·1000 + r.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import UserError

DEFAULT_EVAL_EPOCHS = 300       # dsa training epochs where neither a set nor a flag says otherwise: the one default
DSA_BATCH = 256                 # evaluate_synset's batch_train
DEFAULT_DSA_LR = 0.01           # evaluate_synset's lr_net, for a set without a learned step size
RAT_STEPS = (300, 600, 1000, 3000)  # base.py test(): epoch_list
PUBLISHED_DSA_EPOCHS = 1000     # MTT/TESLA's --epoch_eval_train (their published numbers)
PUBLISHED_DSA_RUNS = 5          # MTT/TESLA's --num_eval
PUBLISHED_RAT_RUNS = 8          # RaT-BPTT's num_train_eval (README)
SCHEDULES = {"dsa": "step", "rat": "constant"}
OPTIMIZERS = {"dsa": ("sgd",), "rat": ("adam", "sgd")}
FIELDS = {"dsa": ("model", "runs", "seed", "lr", "optimizer", "schedule", "augment", "epochs", "batch",
                  "val_fraction"),
          "rat": ("model", "runs", "seed", "lr", "optimizer", "schedule", "augment", "steps", "classes_per_batch",
                  "batch_per_class", "val_fraction")}


@dataclass(frozen=True)
class EvalProtocol:
    """Everything that decides an evaluation's number except the set and the data: see the module docstring."""

    name: str                                 # dsa | rat
    model: str
    runs: int                                 # networks trained from scratch
    seed: int                                 # network r: seed·1000 + r
    lr: float
    optimizer: str                            # sgd (momentum 0.9, weight decay 5e-4) | adam
    schedule: str                             # dsa: step; rat: constant
    augment: str                              # a DSA strategy, flip_rotate, or none
    val_fraction: float = 0.1                 # the held-out validation share (rat chooses its count on it; the
                                              # preprocessing is fitted without it)
    epochs: int | None = None                 # dsa
    batch: int | None = None                  # dsa
    steps: tuple[int, ...] | None = None      # rat: cumulative step counts
    classes_per_batch: int | None = None      # rat: None = all classes
    batch_per_class: int | None = None        # rat: None = all images of a class

    def __post_init__(self) -> None:
        check_protocol(self)

    def replace(self, **changes: Any) -> "EvalProtocol":
        """A copy with `changes` (checked like a loaded record)."""
        return dataclasses.replace(self, **changes)

    def as_json(self) -> dict[str, Any]:
        """The JSON a set stores: the protocol's name and its own fields."""
        out: dict[str, Any] = {"name": self.name}
        for f in FIELDS[self.name]:
            value = getattr(self, f)
            out[f] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, rec: Any, where: str = "the set") -> "EvalProtocol":
        """Read and check a stored record; a bad one is a UserError naming `where` and the field."""
        if not isinstance(rec, Mapping) or rec.get("name") not in FIELDS:
            raise UserError(f"{where} records an evaluation protocol that is not dsa or rat ({rec!r}); re-save the set "
                            "with this version (re-import it, or distill again)")
        name = rec["name"]
        unknown = set(rec) - {"name", *FIELDS[name]}
        missing = set(FIELDS[name]) - set(rec)
        if unknown or missing:
            raise UserError(f"{where}'s {name} evaluation protocol has unknown fields {sorted(unknown)} or lacks "
                            f"{sorted(missing)}; re-save the set with this version")
        values = {f: rec[f] for f in FIELDS[name]}
        if isinstance(values.get("steps"), list):
            values["steps"] = tuple(values["steps"])
        try:
            return cls(name=name, **values)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None

    def describe(self, sources: Mapping[str, str] | None = None) -> str:
        """'dsa protocol: model ConvNet (set), epochs 1000 (set), lr 0.01 (--lr), ...': each value and its source."""
        sources = sources or {}
        parts = []
        for f in FIELDS[self.name]:
            value = getattr(self, f)
            if f == "lr":
                value = f"{value:.4g}"
            elif f == "steps":
                value = "/".join(map(str, value)) + (" (step count chosen on validation)" if self.val_fraction
                                                     else " (no validation split: the longest step count)")
            elif value is None:
                value = "all"
            parts.append(f"{f.replace('_', ' ')} {value}" + (f" ({sources[f]})" if f in sources else ""))
        return f"{self.name} protocol: " + ", ".join(parts)


@dataclass(frozen=True)
class Scoring:
    """How an evaluation runs, beside what it computes (`EvalProtocol`); each protocol's `score` takes what applies."""

    split: str = "test"                       # val | test
    progress: bool = False
    distributed: bool = False                 # dsa: torchrun ranks share the runs
    fast: bool = False                        # dsa: training replayed from captured CUDA graphs
    train_loss: bool = False                  # rat: also the mean CE on the train split (cctype 1 signal)
    tick: Callable[[], None] | None = None    # before every epoch or step: a background evaluation's cancel check


def _int(p: EvalProtocol, field: str, low: int, optional: bool = False) -> None:
    value = getattr(p, field)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"evaluation protocol field {field} = {value!r} must be an integer >= {low}"
                        f"{' or null' if optional else ''}")


def check_protocol(p: EvalProtocol) -> None:
    """Every field's type and range for the protocol `p.name`; UserError naming the first bad one."""
    if p.name not in FIELDS:
        raise UserError(f"unknown evaluation protocol '{p.name}'; use dsa (MTT/TESLA) or rat (RaT-BPTT)")
    if not isinstance(p.model, str) or not p.model:
        raise UserError(f"evaluation protocol field model = {p.model!r} must name a model")
    _int(p, "runs", 1)
    _int(p, "seed", 0)
    if isinstance(p.lr, bool) or not isinstance(p.lr, (int, float)) or not (math.isfinite(p.lr) and p.lr > 0):
        raise UserError(f"evaluation protocol field lr = {p.lr!r} must be a positive finite number")
    if (isinstance(p.val_fraction, bool) or not isinstance(p.val_fraction, (int, float))
            or not 0 <= p.val_fraction < 1):
        raise UserError(f"evaluation protocol field val_fraction = {p.val_fraction!r} must be in [0, 1)")
    if p.optimizer not in OPTIMIZERS[p.name]:
        raise UserError(f"the {p.name} protocol trains with {' or '.join(OPTIMIZERS[p.name])}, not {p.optimizer!r}")
    if p.schedule != SCHEDULES[p.name]:
        raise UserError(f"the {p.name} protocol's schedule is '{SCHEDULES[p.name]}', not {p.schedule!r}")
    if not isinstance(p.augment, str):
        raise UserError(f"evaluation protocol field augment = {p.augment!r} must be a strategy string")
    from ..augment import Augment  # torch; this module stays light enough for the CLI to import

    Augment(p.augment)  # unknown or repeated tokens: UserError
    other = [f for f in ("epochs", "batch", "steps", "classes_per_batch", "batch_per_class")
             if f not in FIELDS[p.name] and getattr(p, f) is not None]
    if other:
        raise UserError(f"the {p.name} protocol has no {', '.join(other)}")
    if p.name == "dsa":
        _int(p, "epochs", 1)
        _int(p, "batch", 1)
        return
    _int(p, "classes_per_batch", 1, optional=True)
    _int(p, "batch_per_class", 1, optional=True)
    steps = p.steps
    if (not isinstance(steps, tuple) or not steps or any(isinstance(c, bool) or not isinstance(c, int) for c in steps)
            or any(c < 1 for c in steps) or list(steps) != sorted(set(steps))):
        raise UserError(f"evaluation protocol field steps = {steps!r} must be increasing positive step counts")


def dsa_protocol(model: str, runs: int, seed: int, lr: float | None, augment: str,
                 epochs: int = DEFAULT_EVAL_EPOCHS, val_fraction: float = 0.1) -> EvalProtocol:
    """The dsa protocol (MTT/TESLA's evaluate_synset) with these settings; `lr` None (no learned step size):
    DEFAULT_DSA_LR."""
    return EvalProtocol("dsa", model, runs, seed, float(DEFAULT_DSA_LR if lr is None else lr), "sgd",
                        SCHEDULES["dsa"], augment, float(val_fraction), epochs=epochs, batch=DSA_BATCH)


def rat_protocol(model: str, runs: int, seed: int, optimizer: str = "adam", lr: float = 1e-3,
                 augment: str = "flip_rotate", steps: tuple[int, ...] = RAT_STEPS,
                 classes_per_batch: int | None = None, batch_per_class: int | None = None,
                 val_fraction: float = 0.1) -> EvalProtocol:
    """The rat protocol (RaT-BPTT's test()); the defaults are its published settings (Adam 1e-3, flip_rotate)."""
    return EvalProtocol("rat", model, runs, seed, float(lr), optimizer, SCHEDULES["rat"], augment, float(val_fraction),
                        steps=tuple(steps), classes_per_batch=classes_per_batch, batch_per_class=batch_per_class)


def recorded_protocols(meta: Mapping[str, Any], where: str = "the set") -> list[EvalProtocol]:
    """The protocols a set records (its own first); [] for a set that records none (built in code, not saved by a
    run or an import)."""
    recs = meta.get("eval")
    if recs is None:
        return []
    if not isinstance(recs, list) or not recs:
        raise UserError(f"{where} records its evaluation protocols as {recs!r}, not a list of records; re-save it")
    return [EvalProtocol.from_json(r, where) for r in recs]


def distilled_protocols(meta: Mapping[str, Any], lr: float | None, *, model: str, runs: int, seed: int,
                        epochs: int, dsa_strategy: str, val_fraction: float = 0.1) -> list[EvalProtocol]:
    """The protocols of a set a method made: its own (meta `protocol`; RaT-BPTT's test() settings under `rat_eval`)
    completed with the evaluation settings, then dsa for a rat set (so it compares with MTT/TESLA numbers).
    The dsa lr is the set's learned one (`lr`), else 0.01."""
    dsa = dsa_protocol(model, runs, seed, lr, dsa_strategy, epochs, val_fraction=val_fraction)
    if meta.get("protocol", "dsa") == "dsa":
        return [dsa]
    if meta["protocol"] != "rat":
        raise UserError(f"unknown evaluation protocol '{meta['protocol']}'; use dsa (MTT/TESLA) or rat (RaT-BPTT)")
    rat = meta.get("rat_eval") or {}
    published = rat_protocol(model, runs, seed)
    return [rat_protocol(model, runs, seed, rat.get("inner_opt", published.optimizer),
                         rat.get("inner_lr", published.lr), rat.get("strategy", published.augment),
                         tuple(rat.get("steps", RAT_STEPS)), rat.get("task_sampler_nc"), rat.get("batch_per_class"),
                         val_fraction),
            dsa]


def published_protocol(source: str, model: str, lr: float | None, dsa_strategy: str,
                       val_fraction: float = 0.1) -> EvalProtocol:
    """The protocol of the code an imported set came from: RaT-BPTT's test() for its .h5 files, else MTT/TESLA's
    evaluate_synset (1000 epochs, 5 networks, the file's learned lr or the one given, else 0.01)."""
    if source == "ratbptt-h5":
        return rat_protocol(model, PUBLISHED_RAT_RUNS, 0, val_fraction=val_fraction)
    return dsa_protocol(model, PUBLISHED_DSA_RUNS, 0, lr, dsa_strategy, PUBLISHED_DSA_EPOCHS,
                        val_fraction=val_fraction)
