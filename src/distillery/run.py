"""The run loop every method shares: run directory, checkpoints, exact resume, evaluation, logs, progress.

A method only implements `step(it) -> dict`, `synset()`, `state_dict()` and `load_state_dict()`. This loop:

    RUN_DIR/config.json       the resolved configuration (written once; --resume checks it is unchanged)
    RUN_DIR/checkpoint.pt     method state + loop state, written atomically every `checkpoint_every` iterations
    RUN_DIR/metrics.csv       one row per iteration (loss, lr, ...) plus val accuracy at evaluations
    RUN_DIR/tb/               TensorBoard scalars (when the tensorboard package is installed)
    RUN_DIR/last.safetensors  the set at the latest evaluation
    RUN_DIR/best.safetensors  the set with the best *validation* accuracy (never selected on test, SPEC P4)
    RUN_DIR/grids/it_XXXXXX.png  an image grid per evaluation
    RUN_DIR/result.json       at the end: test accuracy of best and last, measured once

Iterations are counted as the reference code does (SPEC P12): evaluation at 0, every `eval_every`, and at the end.
Resume is exact: all randomness lives in the method's generators (saved) and evaluation seeds derive from
(seed, iteration), so an interrupted and resumed run gives the same images as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .distributed import is_main_process
from .errors import UserError
from .evaluate import evaluate_set
from .io import atomic_save_torch, atomic_write_text
from .synset import SyntheticSet


class Method(Protocol):
    """What a distillation method provides to the shared loop."""

    def step(self, it: int) -> dict[str, float]: ...
    def synset(self) -> SyntheticSet: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Diverged(UserError):
    """The distillation produced NaN/inf; the last good checkpoint is kept."""


@dataclass
class LoopConfig:
    """How long to run and how to evaluate along the way."""

    iterations: int
    eval_every: int = 100
    eval_runs: int = 3
    eval_epochs: int = 300
    eval_model: str | None = None
    final_eval_runs: int = 5
    checkpoint_every: int = 10
    seed: int = 0


def prepare_run_dir(run_dir: str | Path, config: dict[str, Any], resume: bool) -> Path:
    """Create RUN_DIR with config.json, or check an existing one matches when resuming."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    if cfg_path.exists():
        if not resume:
            raise UserError(f"run directory '{run_dir}' already holds a run; pass --resume to continue it "
                            "or choose a new --out")
        old = json.loads(cfg_path.read_text())
        new = json.loads(text)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in ("resume", "device"))
        if diff:
            raise UserError(f"--resume with a different configuration ({', '.join(diff)} changed); "
                            f"use the original settings or a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg_path.exists():
        atomic_write_text(cfg_path, text)
    return run_dir


class _Logger:
    """Metrics as CSV (rewritten atomically, so a crash never leaves half a row) and TensorBoard scalars."""

    def __init__(self, run_dir: Path, rows: list[dict[str, Any]], tensorboard: bool = True):
        self.path = run_dir / "metrics.csv"
        self.rows = rows
        self.tb = None
        if not tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # tensorboard is an optional extra
            pass

    def log(self, it: int, values: dict[str, float]) -> None:
        if self.rows and self.rows[-1]["it"] == it:
            self.rows[-1].update(values)
        else:
            self.rows.append({"it": it, **values})
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, it)

    def flush(self) -> None:
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
        if self.tb is not None:
            self.tb.flush()


def _check_finite(it: int, run_dir: Path, logs: dict[str, float] | None = None,
                  images: torch.Tensor | None = None) -> None:
    """Stop with Diverged if a logged scalar or the images are NaN/inf, before anything bad is written."""
    bad = [k for k, v in (logs or {}).items() if not math.isfinite(v)]
    if images is not None and not torch.isfinite(images).all():
        bad.append("synthetic images")
    if bad:
        raise Diverged(f"{', '.join(bad)} became NaN/inf at iteration {it}; the last good checkpoint is kept in "
                       f"{run_dir / 'checkpoint.pt'} (resume with --resume after lowering the image or step-size "
                       "learning rate)")


def run_distillation(method: Method, dataset, run_dir: str | Path, loop: LoopConfig, resume: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a distillation to `loop.iterations` and return the final result dict."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    start, best_val, rows = 0, -1.0, []
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        method.load_state_dict(ckpt["method"])
        start, best_val, rows = ckpt["it"], ckpt["best_val"], ckpt["rows"]
        print(f"resuming {run_dir} from iteration {start}")
    main = is_main_process()  # with torchrun, only rank 0 evaluates and writes
    logger = _Logger(run_dir, rows, tensorboard=main)
    (run_dir / "grids").mkdir(parents=True, exist_ok=True)

    def save_checkpoint(it: int) -> None:
        if not main:
            return
        _check_finite(it, run_dir, images=method.synset().images)  # never persist NaN images
        atomic_save_torch({"it": it, "best_val": best_val, "rows": logger.rows, "method": method.state_dict()},
                          ckpt_path)
        logger.flush()

    def evaluate(it: int) -> float:
        nonlocal best_val
        s = method.synset()
        _check_finite(it, run_dir, images=s.images)
        lr = s.lr if s.lr is not None else 0.01
        res = evaluate_set(s.images, s.labels, dataset, loop.eval_model, runs=loop.eval_runs,
                           epochs=loop.eval_epochs, lr=lr, seed=loop.seed * 100003 + it, split="val",
                           progress=False)
        logger.log(it, {"val_acc": res.mean, "val_std": res.std})
        s.meta = {**s.meta, "iteration": it, "val_acc": res.mean}
        s.save(run_dir / "last.safetensors")
        s.save_grid(run_dir / "grids" / f"it_{it:06d}.png")
        if res.mean > best_val:
            best_val = res.mean
            s.save(run_dir / "best.safetensors")
        return res.mean

    bar = tqdm(total=loop.iterations, initial=start, desc="distill", unit="it", disable=not (progress and main))
    val = best_val
    t0 = time.time()
    for it in range(start, loop.iterations + 1):
        if main and (it % loop.eval_every == 0 or it == loop.iterations):
            val = evaluate(it)
        if it == loop.iterations:
            break
        logs = method.step(it)
        _check_finite(it, run_dir, logs)  # NaN images make the next loss NaN; writes check the images
        logger.log(it, logs)
        bar.set_postfix({**{k: f"{v:.4g}" for k, v in logs.items()}, "val": f"{100 * val:.1f}"}, refresh=False)
        bar.update(1)
        if (it + 1) % loop.checkpoint_every == 0:
            save_checkpoint(it + 1)
    bar.close()
    save_checkpoint(loop.iterations)
    if not main:
        return {}
    result = final_report(dataset, run_dir, loop)
    result["seconds"] = time.time() - t0
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2))
    return result


def final_report(dataset, run_dir: Path, loop: LoopConfig) -> dict[str, Any]:
    """Test accuracy of the best-on-validation set and of the last set, each measured once."""
    out: dict[str, Any] = {}
    for name in ("best", "last"):
        s = SyntheticSet.load(run_dir / f"{name}.safetensors")
        lr = s.lr if s.lr is not None else 0.01
        res = evaluate_set(s.images, s.labels, dataset, loop.eval_model, runs=loop.final_eval_runs,
                           epochs=loop.eval_epochs, lr=lr, seed=loop.seed, split="test", progress=False)
        out[name] = {"test_mean": res.mean, "test_std": res.std, "test_accs": res.accs,
                     "iteration": s.meta.get("iteration"), "val_acc": s.meta.get("val_acc"), "lr": lr}
        print(f"{name} set (iteration {s.meta.get('iteration', 'last')}): test {res}")
    return out

