"""Evaluate a distilled set the way it was distilled for, and the cross-architecture table.

A set records its protocol in its metadata (`protocol`: "dsa" for MTT/TESLA, "rat" for RaT-BPTT, with the
settings under `rat_eval`); a set without one is "dsa". By default it is evaluated on the model it was distilled
with (MTT's `eval_mode S`), with its learned step size where it has one (else lr 0.01). RaT-BPTT sets are also
reported under the dsa protocol, so that they can be compared with MTT/TESLA numbers; each number says which.
"""

from __future__ import annotations

from typing import Any

from .cli_options import EVAL_EPOCHS
from .errors import UserError
from .evaluate import EvalResult, evaluate_set
from .models import create_model
from .rat_eval import RatProtocol

PROTOCOLS = ("dsa", "rat")


def set_protocol(meta: dict[str, Any]) -> str:
    """The protocol a set was distilled for (sets from before protocols were recorded: dsa)."""
    return str(meta.get("protocol") or "dsa")


def report_protocols(meta: dict[str, Any]) -> list[str]:
    """The protocols a final report uses: the set's own first; RaT-BPTT sets also get dsa."""
    own = set_protocol(meta)
    return [own] + [p for p in PROTOCOLS if p != own and own == "rat"]


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


def evaluate_synset(s, dataset, *, protocol: str | None = None, model: str | None = None, runs: int = 5,
                    epochs: int = EVAL_EPOCHS, lr: float | None = None, seed: int = 0, split: str = "test",
                    progress: bool = False, distributed: bool = False, train_loss: bool = False,
                    fast: bool = False) -> EvalResult:
    """Evaluate SyntheticSet `s` under `protocol` (default: the set's) on `model` (default: its distillation model).

    `epochs`/`lr`/`fast` are the dsa protocol's; the rat protocol takes its settings from the set (`RatProtocol`)."""
    protocol = protocol or set_protocol(s.meta)
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown --protocol '{protocol}'; use dsa (MTT/TESLA) or rat (RaT-BPTT)")
    lr = lr if lr is not None else (s.lr if s.lr is not None else 0.01)
    rat = RatProtocol.from_meta(s.meta) if protocol == "rat" else None
    return evaluate_set(s.images, s.labels, dataset, model or s.meta.get("model"), runs=runs, epochs=epochs, lr=lr,
                        seed=seed, split=split, progress=progress, distributed=distributed and protocol == "dsa",
                        protocol=protocol, rat=rat, train_loss=train_loss, fast=fast and protocol == "dsa")


def record(res: EvalResult) -> dict[str, Any]:
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
