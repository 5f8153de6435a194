"""The loop every method shares: evaluate, step, checkpoint, and at the end the final report.

A method (`methods.Method`) implements `step(it) -> dict`, `synset()`, `state_dict()` and `load_state_dict()`, and
may override the loop's hooks (`health_fix`, `wants_eval_train_loss`, `observe_eval`, `stop_message`,
`divergence_fix`).
Iterations are counted as the reference code does (SPEC P12): evaluation at 0, every `eval_every`, and at the end.
`--time-budget S` makes the end the first iteration after S seconds of steps (summed over resumes), so methods can
be compared at equal distillation time.
With torchrun every rank steps, and evaluates its share of the runs (`evaluate_set(distributed=True)`); rank 0 alone
writes, and every rank reads the same checkpoint on resume (RUN_DIR on a file system all nodes see).
Resume is exact: all randomness lives in the method's saved state or in streams keyed by the iteration
(`streams.py`), and evaluation seeds derive from (seed, iteration), so an interrupted and resumed run gives the same
images as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from tqdm.auto import tqdm

from ..distributed import barrier, is_main_process, rank_and_world
from ..errors import Diverged, TrainingDiverged
from ..evaluation.background import BackgroundEval, overlap_wanted
from ..evaluation.score import evaluate_synset, set_protocols
from ..io import atomic_write_text, ensure_dir
from ..sets.synset import SyntheticSet
from .checkpoint import CHECKPOINT, write_checkpoint
from .config import LoopConfig
from .final import final_report, record_protocols
from .health import HealthMonitor
from .metrics import MetricsLog
from .resume import divergence_advice, record_environment, restore, unlock_run_dir

if TYPE_CHECKING:
    from ..methods import Method

PENDING = "pending"  # the set of an evaluation still running in the background when a checkpoint was written


def run_distillation(method: Method, dataset, run_dir: str | Path, loop: LoopConfig, resume: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a distillation to `loop.iterations` and return the final result dict.

    A divergence (Diverged) names the checkpoint really on disk to continue from, or says there is none."""
    run_dir = Path(run_dir)
    try:
        return _run_loop(method, dataset, run_dir, loop, resume, progress)
    except Diverged as err:
        raise Diverged(f"{err}; {divergence_advice(run_dir, method.divergence_fix)}") from None
    finally:
        unlock_run_dir(run_dir)


def _run_loop(method: Method, dataset, run_dir: Path, loop: LoopConfig, resume: bool,
              progress: bool) -> dict[str, Any]:
    """The loop of `run_distillation`: resume, iterate, evaluate, checkpoint, report."""
    state = restore(method, run_dir, resume)
    main = is_main_process()  # with torchrun, only rank 0 writes; every rank takes a share of the evaluation runs
    env = record_environment(run_dir, getattr(dataset, "location", None)) if main else {}
    run = LoopState(method, dataset, run_dir, loop, state)
    bar = tqdm(total=loop.iterations, initial=state["it"], desc="distill", unit="it", disable=not (progress and main))
    t0 = time.time()
    end = loop.iterations
    try:
        pending = state["pending_eval"]
        if pending is not None:  # killed while that evaluation ran: run it again, same set and seed
            run.evaluate(pending, SyntheticSet.load(run.pending_dir / _pending_name(pending)))
        for it in range(state["it"], loop.iterations + 1):
            if loop.time_budget is not None and run.step_s >= loop.time_budget:
                end = run.end = it  # out of time: this iteration is the run's last, evaluated as --iterations
            if it % loop.eval_every == 0 or it == end:
                run.collect()  # one evaluation at a time, recorded in iteration order
                if it == end:  # nothing left to overlap: the last evaluation gets all threads
                    run.stop_background()
                run.evaluate(it)
            if it == end or run.stop_at is not None:
                break
            step_start = time.time()
            logs = method.step(it)
            run.step_s += time.time() - step_start
            _check_finite(it, logs)  # NaN images make the next loss NaN; writes check the images
            run.metrics.log(it, logs)
            run.health.after_step(it, logs)
            shown = run.latest_val()
            bar.set_postfix({**{k: f"{v:.4g}" for k, v in logs.items()},
                             **({"val": f"{100 * shown:.1f}"} if shown is not None else {})}, refresh=False)
            bar.update(1)
            if (it + 1) % loop.checkpoint_every == 0:
                run.save_checkpoint(it + 1)
        run.collect()
    finally:
        run.stop_background()
    bar.close()
    if run.stop_at is not None and main:
        print(method.stop_message(run.stop_at))
    if end < loop.iterations and main:
        print(f"--time-budget {loop.time_budget:g} s spent: the run ends at iteration {end} of {loop.iterations}")
    end = end if run.stop_at is None else run.stop_at
    run.save_checkpoint(end)
    if main and run.pending_dir.is_dir() and not any(run.pending_dir.iterdir()):
        run.pending_dir.rmdir()  # no evaluation is pending at the end
    barrier()  # rank 0 has written best and last; every rank reads them for its share of the final runs
    result = final_report(dataset, run_dir, loop)
    if not main:
        return {}
    result["seconds"] = time.time() - t0
    result["iterations_reached"] = end
    result["step_seconds"] = run.step_s  # in method.step, over every process of the run, no evaluations
    result["environment"] = env
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2))
    return result


def _check_finite(it: int, logs: dict[str, float] | None = None, images: torch.Tensor | None = None) -> None:
    """Stop with Diverged if a logged scalar or the images are NaN/inf, before anything bad is written."""
    bad = [k for k, v in (logs or {}).items() if not math.isfinite(v)]
    if images is not None and not torch.isfinite(images).all():
        bad.append("synthetic images")
    if bad:
        raise Diverged(f"{', '.join(bad)} became NaN/inf at iteration {it}")


def _pending_name(it: int) -> str:
    """File name, under RUN_DIR/pending/, of the set whose evaluation at iteration `it` runs in the background."""
    return f"it_{it:06d}.safetensors"


class LoopState:
    """What the loop keeps between iterations (metrics, best validation accuracy, the background evaluation) and its
    evaluation and checkpoint steps."""

    def __init__(self, method: Method, dataset, run_dir: Path, loop: LoopConfig, state: dict[str, Any]) -> None:
        """Start from `state` (`resume.restore`): its metric rows, best validation accuracy and step seconds."""
        self.method, self.dataset, self.run_dir, self.loop = method, dataset, run_dir, loop
        self.main = is_main_process()
        self.metrics = MetricsLog(run_dir, state["rows"], tensorboard=self.main)
        (run_dir / "grids").mkdir(parents=True, exist_ok=True)
        self.best_val = self.val = state["best_val"]
        self.has_val = len(dataset.val.y) > 0  # --val-fraction 0: nothing to select on, best = last
        self.stop_at: int | None = None        # a method may end the run early (RaT-BPTT's cctype 1 plateau)
        self.end = loop.iterations             # the last iteration (earlier when --time-budget runs out)
        self.step_s = state["step_seconds"]    # seconds in method.step, over every process of this run (--time-budget)
        self.wants_loss = method.wants_eval_train_loss
        self.background = BackgroundEval() if overlap_wanted(loop.eval_overlap, dataset.train.x.device,
                                                             rank_and_world()[1], self.wants_loss) else None
        self.pending: int | None = None        # the iteration whose evaluation runs in the background
        self.pending_dir = run_dir / PENDING
        self.health = HealthMonitor(loop.health, method.health_fix, run_dir, self.metrics.rows)

    def save_checkpoint(self, it: int) -> None:
        """Write the method and loop state at iteration `it` (rank 0), and drop pending sets no resume needs."""
        if not self.main:
            return
        _check_finite(it, images=self.method.synset().images)  # never persist NaN images
        write_checkpoint({"it": it, "best_val": self.best_val, "rows": self.metrics.rows,
                          "method": self.method.state_dict(), "pending_eval": self.pending,
                          "step_seconds": self.step_s},
                         self.run_dir / CHECKPOINT)
        self.metrics.flush()
        for old in self.pending_dir.glob("it_*.safetensors"):  # a resume re-runs only the evaluation named above
            if self.pending is None or old.name != _pending_name(self.pending):
                old.unlink(missing_ok=True)

    def validate(self, it: int, s: SyntheticSet, tick: Callable[[], None] | None = None):
        """The validation evaluation of the set of iteration `it` under its own protocol, with `eval_runs` networks
        and a seed of its own (None without a validation split). `tick`: the background's cancellation check."""
        if not (self.has_val or self.wants_loss):
            return None
        loop = self.loop
        own = set_protocols(s, self.dataset.spec)[0][0].replace(runs=loop.eval_runs, seed=loop.seed * 100003 + it)
        try:
            return evaluate_synset(s, self.dataset, own, split="val", distributed=True, train_loss=self.wants_loss,
                                   fast=loop.eval_fast == "on", tick=tick)
        except TrainingDiverged:  # the set is what diverged: the cause is the distillation's, not an evaluation lr
            raise Diverged(f"networks trained on the set of iteration {it} diverged (its images reach |x| = "
                           f"{float(s.images.abs().max()):.3g})") from None

    def evaluate(self, it: int, s: SyntheticSet | None = None) -> None:
        """Start the validation evaluation of iteration `it`: in place, or in the background (then `collect`)."""
        s = record_protocols(self.method.synset() if s is None else s, self.loop, self.dataset.spec,
                             self.dataset.val_fraction)
        _check_finite(it, images=s.images)
        if self.background is None:
            self.record_eval(it, s, self.validate(it, s))
            return
        ensure_dir(self.pending_dir)
        s.save(self.pending_dir / _pending_name(it))  # a checkpoint written before the result can resume it
        background = self.background
        background.start(lambda: (it, s, self.validate(it, s, background.check)))
        self.pending = it

    def latest_val(self) -> float | None:
        """The latest validation accuracy for the progress bar: a finished background evaluation's before it is
        recorded; None before the first one (or without a validation split)."""
        done = self.background.peek() if self.background is not None else None
        if done is not None and done[2] is not None and self.has_val:
            return done[2].mean
        return self.val if self.has_val and self.val >= 0 else None

    def collect(self) -> None:
        """Wait for the background evaluation, if one runs, and record it."""
        if self.background is not None and self.background.busy:
            self.record_eval(*self.background.result())
            self.pending = None

    def stop_background(self) -> None:
        """Close the background evaluation thread, if any; later evaluations run in place."""
        if self.background is not None:
            self.background.close()
            self.background = None

    def record_eval(self, it: int, s: SyntheticSet, res) -> None:
        """Log a validation result; keep the last and the best-on-validation sets; watch the run's health."""
        method, has_val = self.method, self.has_val
        if res is not None and method.observe_eval(it, res.train_loss):
            self.stop_at = it
        self.val = res.mean if has_val else math.nan
        if self.main:
            if has_val:
                self.metrics.log(it, {"val_acc": res.mean, "val_std": res.std,
                                      **({"val_steps": float(res.steps)} if res.steps else {})})
            if res is not None and res.train_loss is not None:
                self.metrics.log(it, {"eval_train_loss": res.train_loss})
            s.meta = {**s.meta, "iteration": it, "val_acc": res.mean if has_val else None}
            s.save(self.run_dir / "last.safetensors")
            s.save_grid(self.run_dir / "grids" / f"it_{it:06d}.png")
            if not has_val or res.mean > self.best_val:
                self.best_val = res.mean if has_val else self.best_val
                s.save(self.run_dir / "best.safetensors")
        if it < self.end:  # the last evaluation ends the run anyway
            self.health.after_eval(it, self.val)
