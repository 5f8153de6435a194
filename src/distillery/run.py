"""The run loop every method shares: run directory, checkpoints, exact resume, evaluation, logs, progress.

A method (`methods.Method`) implements `step(it) -> dict`, `synset()`, `state_dict()` and `load_state_dict()`, and
may override the loop's hooks (`health_fix`, `wants_eval_train_loss`, `observe_eval`, `divergence_fix`). This loop:

    RUN_DIR/config.json       the resolved configuration, the environment (threads, versions, command line, data
                              location) and a history: one entry per start, restart and resume with what changed
    RUN_DIR/checkpoint.safetensors  method state + loop state, written atomically every `checkpoint_every`
                              iterations: tensors plus a JSON tree, nothing that can run code (`checkpoint.py`)
    RUN_DIR/.lock             flock-ed while a process runs in RUN_DIR, so a second one is refused; removed at its end
    RUN_DIR/metrics.csv       one row per iteration (loss, lr, ...) plus val accuracy at evaluations
    RUN_DIR/tb/               TensorBoard scalars (when the tensorboard package is installed)
    RUN_DIR/last.safetensors  the set at the latest evaluation
    RUN_DIR/best.safetensors  the set with the best *validation* accuracy (never selected on test, SPEC P4)
    RUN_DIR/grids/it_XXXXXX.png  an image grid per evaluation
    RUN_DIR/pending/          the set of a validation evaluation still running in the background (`--eval-overlap`)
                              when the checkpoint was written; a resume runs that evaluation again (gone at the end)
    RUN_DIR/result.json       at the end: test accuracy of best and last, measured once

Iterations are counted as the reference code does (SPEC P12): evaluation at 0, every `eval_every`, and at the end.
`--time-budget S` makes the end the first iteration after S seconds of steps (summed over resumes), so methods can
be compared at equal distillation time.
With torchrun every rank steps, and evaluates its share of the runs (`evaluate_set(distributed=True)`); rank 0 alone
writes, and every rank reads the same checkpoint on resume (RUN_DIR on a file system all nodes see).
Resume is exact: all randomness lives in the method's saved state or in streams keyed by the iteration
(`streams.py`: MTT/TESLA, RaT-BPTT), and evaluation seeds derive from
(seed, iteration), so an interrupted and resumed run gives the same images as an uninterrupted one (with the same
thread count: a resume with another one is warned about). `--resume` may change what does not alter the state's
shape or meaning (the options declared `resumable`: learning rates, guard bounds, a larger `--iterations`,
evaluation and checkpoint cadence); anything else is refused. A directory without a checkpoint (a run stopped
before its first one) is started again by the same command.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping

import torch
from tqdm.auto import tqdm

from . import __version__
from .distributed import barrier, is_main_process, rank_and_world
from .errors import Diverged, TrainingDiverged, UserError
from .checkpoint import read_checkpoint, write_checkpoint
from .evaluation.background import BackgroundEval, overlap_wanted
from .evaluation.protocol import DEFAULT_EVAL_EPOCHS, distilled_protocols
from .evaluation.score import evaluate_synset, model_table, parse_models, record, set_protocols
from .io import atomic_write_text, ensure_dir, write_error
from .runfiles import read_config
from .health import HealthMonitor
from .options import option, resumable
from .synset import SyntheticSet

if TYPE_CHECKING:
    from .methods import Method

try:
    import fcntl
except ImportError:  # not POSIX: run directories are not locked
    fcntl = None

CHECKPOINT = "checkpoint.safetensors"
PENDING = "pending"  # the set of an evaluation still running in the background when a checkpoint was written
_NOT_CONFIG = ("resume", "device", "environment", "history")  # config.json keys that are not compared
_LOCKS: dict[Path, int] = {}


@dataclass
class LoopConfig:
    """How long to run and how to evaluate along the way."""

    iterations: int = option(1000, low=1, resumable=True, help="outer iterations")
    eval_every: int = option(100, low=1, resumable=True,
                             help="evaluate on the validation split every this many iterations")
    eval_runs: int = option(3, low=1, resumable=True, help="networks trained per validation evaluation")
    eval_epochs: int = option(DEFAULT_EVAL_EPOCHS, low=1, resumable=True,
                              help="training epochs of every evaluation network")
    eval_model: str | None = option(None, help="evaluation model (default: the distillation model)")
    eval_models: str | None = option(None, resumable=True,
                                     help="models of the final cross-architecture table of the best set, e.g. "
                                          "ConvNet,AlexNet,VGG11,ResNet18_AP,ResNet18")
    final_eval_runs: int = option(5, low=1, resumable=True, help="networks trained per final test evaluation")
    checkpoint_every: int = option(10, low=1, resumable=True, help="write a checkpoint every this many iterations")
    time_budget: float | None = option(None, low=0, low_open=True, resumable=True,
                                       help="seconds of distillation steps (evaluations not counted) after which the "
                                            "run ends at the next iteration, evaluated and reported as at --iterations")
    eval_overlap: str = option("auto", choices=("auto", "off"), resumable=True,
                               help="auto: on the CPU with 2+ threads, validation evaluations run in the background "
                                    "while distillation goes on (the threads split in half); off: wait for each")
    eval_fast: str = option("off", choices=("off", "on"), resumable=True,
                            help="on (CUDA): train the evaluation networks from captured CUDA graphs (models without "
                                 "BatchNorm; the others train as usual); same numbers up to float rounding")
    health: str = option("stop", choices=("stop", "warn", "off"),
                         help="a dead run (alpha pinned, student still, val below the initial set): stop | warn | off")
    seed: int = option(0, low=0, help="seed of every random draw")


def environment(data: str | None = None) -> dict[str, Any]:
    """What a result depends on beyond its config: thread count, versions, command line and data location."""
    env: dict[str, Any] = {"threads": torch.get_num_threads(), "library_version": __version__,
                           "torch_version": torch.__version__, "command": list(sys.argv)}
    if data is not None:
        env["data"] = data
    return env


def prepare_run_dir(run_dir: str | Path, config: dict[str, Any], resume: bool,
                    defaults: Mapping[str, Any] | None = None, may_change: Collection[str] | None = None) -> Path:
    """Check RUN_DIR can take this run, lock it, and write config.json with a new history entry; before any work.

    No checkpoint yet (a new directory, or a run that stopped before its first checkpoint): the run starts
    (again). A checkpoint: refused without `resume`; with it, only `may_change` keys (default: the loop's resumable
    options) may differ from the stored config, `iterations` may not fall below the checkpoint's, and each change
    goes into the history.
    A key the stored config lacks (written by an older version) passes when its value here is its entry in
    `defaults` (recorded as filled in), and is refused otherwise.
    """
    run_dir = ensure_dir(run_dir)
    lock_run_dir(run_dir)
    try:
        _check_and_record(run_dir, config, resume, defaults or {},
                          resumable([LoopConfig]) if may_change is None else frozenset(may_change))
    except BaseException:
        unlock_run_dir(run_dir)
        raise
    return run_dir


def _check_and_record(run_dir: Path, config: dict[str, Any], resume: bool, defaults: Mapping[str, Any],
                      may_change: frozenset[str]) -> None:
    """The checks and the config.json write of `prepare_run_dir` (the caller holds the lock)."""
    cfg_path, ckpt_path = run_dir / "config.json", run_dir / CHECKPOINT
    new = json.loads(json.dumps(config, sort_keys=True, default=str))
    defaults = json.loads(json.dumps(dict(defaults), sort_keys=True, default=str))  # compared as stored
    old = read_config(run_dir)
    env = environment()
    history = old.get("history", []) if old else []
    if old is None or not ckpt_path.exists():
        if old is not None:
            print(f"{run_dir} holds a run that stopped before its first checkpoint; starting it again")
        elif resume:
            print(f"{run_dir} holds no run to resume; starting a new one")
        history.append({"event": "restart" if old else "start", "time": _now(), "environment": env})
    else:
        if not resume:
            raise UserError(f"run directory {run_dir} already holds a run with a checkpoint; pass --resume to "
                            "continue it (learning rates and --iterations may change) or choose a new --out")
        # a key an older version did not write: its behaviour then is the option's default
        filled_in = {k: v for k, v in new.items() if k not in old and k not in _NOT_CONFIG
                     and k in defaults and defaults[k] == v}
        changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
                   if k not in _NOT_CONFIG and k not in filled_in and old.get(k) != new.get(k)}
        refused = [f"{k} {repr(a) if k in old else '(not in the saved config)'} -> {b!r}"
                   for k, (a, b) in changed.items() if k not in may_change]
        if refused:
            predates = [f"{k} {defaults[k]!r}" for k in changed if k not in old and k in defaults
                        and k not in may_change]
            hint = f" (for options the run predates, their defaults: {', '.join(predates)})" if predates else ""
            raise UserError(f"--resume cannot change {', '.join(refused)}: that alters what the checkpoint's state "
                            f"means; use the run's original values{hint} or a new --out")
        ckpt = read_checkpoint(ckpt_path)
        it = ckpt["it"]
        best = run_dir / "best.safetensors"
        if ckpt["best_val"] >= 0 and not best.is_file():  # the final report needs it; only a restore brings it back
            raise UserError(f"{best}, the best set of the run so far (validation {100 * ckpt['best_val']:.1f} %), is "
                            f"missing, and the final report needs it; restore it from a copy, or start the run "
                            f"again with a new --out")
        if new.get("iterations", it) < it:
            raise UserError(f"--iterations {new['iterations']} is below iteration {it} of the checkpoint in "
                            f"{run_dir}; pass --iterations {it} or more")
        before = (history[-1]["environment"] if history else old.get("environment", {})).get("threads")
        if before is not None and before != env["threads"]:
            print(f"warning: {run_dir} ran with {before} threads and resumes with {env['threads']}: float sums "
                  f"differ in their last bits, so results will not match an uninterrupted run exactly "
                  f"(pass --threads {before} to match)", file=sys.stderr)
        history.append({"event": "resume", "time": _now(), "iteration": it, "changed": changed,
                        **({"filled_in": filled_in} if filled_in else {}), "environment": env})
    atomic_write_text(cfg_path, json.dumps({**new, "environment": env, "history": history}, indent=2,
                                           sort_keys=True))


def _now() -> str:
    """UTC time stamp for the history."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def lock_run_dir(run_dir: Path) -> None:
    """Hold an exclusive flock on RUN_DIR/.lock for this process (until `unlock_run_dir` or exit)."""
    key = run_dir.resolve()
    if fcntl is None or key in _LOCKS:
        return
    while True:
        try:
            fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise write_error(run_dir / ".lock", err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"run directory {run_dir} is in use by another distillery process; wait for it to end "
                            "(or stop it) or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(run_dir / ".lock").st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # a run that just ended removed the file we opened: take the new one
    _LOCKS[key] = fd


def unlock_run_dir(run_dir: Path) -> None:
    """Release the lock `lock_run_dir` took (no-op if this process holds none)."""
    fd = _LOCKS.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        Path(run_dir, ".lock").unlink(missing_ok=True)  # still held: nobody else is inside; the file goes too
        os.close(fd)


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
        """Add `values` to iteration `it`'s row (a background evaluation reports after later iterations' rows)."""
        rows = self.rows
        i = bisect.bisect_left(rows, it, key=lambda r: r["it"])  # rows stay in iteration order
        if i < len(rows) and rows[i]["it"] == it:
            rows[i].update(values)
        else:
            rows.insert(i, {"it": it, **values})
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
        raise Diverged(f"{', '.join(bad)} became NaN/inf at iteration {it}")


def _way_out(run_dir: Path, saved: int | None, lower: str) -> str:
    """How to continue after a divergence (with `lower`, the method's fix): from the checkpoint really on disk, or
    from scratch if there is none."""
    if saved is None:
        return f"no checkpoint was written yet, so run the same command again with {lower}"
    return (f"the last good checkpoint (iteration {saved}) is {run_dir / CHECKPOINT}: continue it with the same "
            f"command, --resume and {lower}")


def run_distillation(method: Method, dataset, run_dir: str | Path, loop: LoopConfig, resume: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a distillation to `loop.iterations` and return the final result dict.

    A divergence (Diverged) names the checkpoint really on disk to continue from, or says there is none."""
    run_dir = Path(run_dir)
    try:
        return _run_loop(method, dataset, run_dir, loop, resume, progress)
    except Diverged as err:
        ckpt = run_dir / CHECKPOINT
        saved = read_checkpoint(ckpt)["it"] if is_main_process() and ckpt.exists() else None
        raise Diverged(f"{err}; {_way_out(run_dir, saved, method.divergence_fix)}") from None
    finally:
        unlock_run_dir(run_dir)


def _run_loop(method: Method, dataset, run_dir: Path, loop: LoopConfig, resume: bool,
              progress: bool) -> dict[str, Any]:
    """The loop of `run_distillation`: resume, iterate, evaluate, checkpoint, report."""
    ckpt_path = run_dir / CHECKPOINT
    start, best_val, rows, resumed_pending, spent = 0, -1.0, [], None, 0.0
    if resume and ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path, template=method.state_dict())
        try:
            method.load_state_dict(ckpt["method"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:  # consistent, yet not this state
            raise UserError(f"checkpoint {ckpt_path} is damaged ({type(err).__name__} restoring the method state); "
                            "delete it to start the run again from iteration 0 with the same command") from None
        start, best_val, rows = ckpt["it"], ckpt["best_val"], ckpt["rows"]
        spent = ckpt.get("step_seconds", 0.0)
        resumed_pending = ckpt.get("pending_eval")
        print(f"resuming {run_dir} from iteration {start}")
    main = is_main_process()  # with torchrun, only rank 0 writes; every rank takes a share of the evaluation runs
    env = _record_environment(run_dir, getattr(dataset, "location", None)) if main else {}
    run = _Run(method, dataset, run_dir, loop, rows, best_val)
    run.step_s = spent  # --time-budget counts the steps of earlier processes of this run too
    bar = tqdm(total=loop.iterations, initial=start, desc="distill", unit="it", disable=not (progress and main))
    t0 = time.time()
    end = loop.iterations
    try:
        if resumed_pending is not None:  # killed while that evaluation ran: run it again, same set and seed
            run.evaluate(resumed_pending, SyntheticSet.load(run.pending_dir / _pending_name(resumed_pending)))
        for it in range(start, loop.iterations + 1):
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
            _check_finite(it, run_dir, logs)  # NaN images make the next loss NaN; writes check the images
            run.logger.log(it, logs)
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
        print(f"the plateau curriculum ended the run at iteration {run.stop_at} (window start at its cap, no progress)")
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


class _Run:
    """What the loop keeps between iterations (logger, best validation accuracy, the background evaluation) and its
    evaluation and checkpoint steps."""

    def __init__(self, method: Method, dataset, run_dir: Path, loop: LoopConfig, rows: list[dict[str, Any]],
                 best_val: float) -> None:
        self.method, self.dataset, self.run_dir, self.loop = method, dataset, run_dir, loop
        self.main = is_main_process()
        self.logger = _Logger(run_dir, rows, tensorboard=self.main)
        (run_dir / "grids").mkdir(parents=True, exist_ok=True)
        self.best_val = self.val = best_val
        self.has_val = len(dataset.val.y) > 0  # --val-fraction 0: nothing to select on, best = last
        self.stop_at: int | None = None        # a method may end the run early (RaT-BPTT's cctype 1 plateau)
        self.end = loop.iterations             # the last iteration (earlier when --time-budget runs out)
        self.step_s = 0.0                      # seconds in method.step (all processes of this run)
        self.wants_loss = method.wants_eval_train_loss
        self.background = BackgroundEval() if overlap_wanted(loop.eval_overlap, dataset.train.x.device,
                                                             rank_and_world()[1], self.wants_loss) else None
        self.pending: int | None = None        # the iteration whose evaluation runs in the background
        self.pending_dir = run_dir / PENDING
        self.health = HealthMonitor(loop.health, method.health_fix, run_dir, self.logger.rows)

    def save_checkpoint(self, it: int) -> None:
        """Write the method and loop state at iteration `it` (rank 0), and drop pending sets no resume needs."""
        if not self.main:
            return
        _check_finite(it, self.run_dir, images=self.method.synset().images)  # never persist NaN images
        write_checkpoint({"it": it, "best_val": self.best_val, "rows": self.logger.rows,
                          "method": self.method.state_dict(), "pending_eval": self.pending,
                          "step_seconds": self.step_s},
                         self.run_dir / CHECKPOINT)
        self.logger.flush()
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
        _check_finite(it, self.run_dir, images=s.images)
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
                self.logger.log(it, {"val_acc": res.mean, "val_std": res.std,
                                     **({"val_steps": float(res.steps)} if res.steps else {})})
            if res is not None and res.train_loss is not None:
                self.logger.log(it, {"eval_train_loss": res.train_loss})
            s.meta = {**s.meta, "iteration": it, "val_acc": res.mean if has_val else None}
            s.save(self.run_dir / "last.safetensors")
            s.save_grid(self.run_dir / "grids" / f"it_{it:06d}.png")
            if not has_val or res.mean > self.best_val:
                self.best_val = res.mean if has_val else self.best_val
                s.save(self.run_dir / "best.safetensors")
        if it < self.end:  # the last evaluation ends the run anyway
            self.health.after_eval(it, self.val)


def record_protocols(s: SyntheticSet, loop: LoopConfig, spec, val_fraction: float) -> SyntheticSet:
    """Record in `s` the whole protocol it is selected and scored under (`evaluation.protocol`): the method's
    protocol completed with the run's evaluation settings. A set that records one already keeps it."""
    if "eval" in s.meta:
        return s
    protos = distilled_protocols(s.meta, s.lr, model=loop.eval_model or s.meta.get("model") or spec.default_model,
                                 runs=loop.final_eval_runs, seed=loop.seed, epochs=loop.eval_epochs,
                                 dsa_strategy=spec.dsa_strategy, val_fraction=val_fraction)
    meta = {k: v for k, v in s.meta.items() if k not in ("protocol", "rat_eval")}  # now in the records
    s.meta = {**meta, "eval": [p.record() for p in protos]}
    return s


def _pending_name(it: int) -> str:
    """File name, under RUN_DIR/pending/, of the set whose evaluation at iteration `it` runs in the background."""
    return f"it_{it:06d}.safetensors"


def _record_environment(run_dir: Path, data: str | None) -> dict[str, Any]:
    """This process's environment with the data location, also added to config.json's latest history entry."""
    env = environment(data)
    cfg = read_config(run_dir)
    if cfg is not None and cfg.get("history"):
        cfg["environment"] = cfg["history"][-1]["environment"] = env
        atomic_write_text(run_dir / "config.json", json.dumps(cfg, indent=2, sort_keys=True))
    return env


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
                     "lr": own.lr, "by_protocol": [{**record(r), "eval_protocol": p.record()}
                                                   for r, p in zip(results, protos)]}
        if main:
            for res, p in zip(results, protos):
                print(f"{name} set (iteration {s.meta.get('iteration', 'last')}), {p.describe()} (recorded in the "
                      f"set): test {res}")
        if models and name == "best":
            table = {m: evaluate_synset(s, dataset, protos[0].replace(model=m), split="test", distributed=True,
                                        fast=fast) for m in models}
            out[name]["models"] = {m: record(r) for m, r in table.items()}
            if main:
                print(f"cross-architecture table of the best set ({protos[0].name} protocol):")
                print(model_table(table))
    if not has_val:
        out["last"] = out["best"]
    return out

