"""Who may run in a run directory and from where: the lock, config.json's history, and what `--resume` may change.

`prepare_run_dir` runs before any work: it locks RUN_DIR (`.lock`, flock-ed while a process runs there, so a second
one is refused; removed at its end) and writes config.json: the resolved configuration, the environment (threads,
versions, command line, data location) and a history, one entry per start, restart and resume with what changed.
A directory without a checkpoint (a run stopped before its first one) is started again by the same command. With a
checkpoint, `--resume` may change what does not alter the state's shape or meaning (the options declared
`resumable`: learning rates, guard bounds, a larger `--iterations`, evaluation and checkpoint cadence); anything
else is refused. Resume is exact with the same thread count; a resume with another one is warned about.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection

import torch

from .. import __version__
from ..distributed import is_main_process
from ..errors import UserError
from ..io import atomic_write_text, ensure_dir, write_error
from ..config.options import resumable
from .checkpoint import CHECKPOINT, read_checkpoint
from .config import LoopConfig
from .files import read_config

if TYPE_CHECKING:
    from ..methods import Method

try:
    import fcntl
except ImportError:  # not POSIX: run directories are not locked
    fcntl = None

_NOT_CONFIG = ("resume", "device", "environment", "history")  # config.json keys that are not compared
_LOCKS: dict[Path, int] = {}


def environment(data: str | None = None) -> dict[str, Any]:
    """What a result depends on beyond its config: thread count, versions, command line and data location."""
    env: dict[str, Any] = {"threads": torch.get_num_threads(), "library_version": __version__,
                           "torch_version": torch.__version__, "command": list(sys.argv)}
    if data is not None:
        env["data"] = data
    return env


def prepare_run_dir(run_dir: str | Path, config: dict[str, Any], resume: bool,
                    may_change: Collection[str] | None = None) -> Path:
    """Check RUN_DIR can take this run, lock it, and write config.json with a new history entry; before any work.

    No checkpoint yet (a new directory, or a run that stopped before its first checkpoint): the run starts
    (again). A checkpoint: refused without `resume`; with it, only `may_change` keys (default: the loop's resumable
    options) may differ from the stored config, `iterations` may not fall below the checkpoint's, and each change
    goes into the history.
    """
    run_dir = ensure_dir(run_dir)
    lock_run_dir(run_dir)
    try:
        _check_and_record(run_dir, config, resume,
                          resumable([LoopConfig]) if may_change is None else frozenset(may_change))
    except BaseException:
        unlock_run_dir(run_dir)
        raise
    return run_dir


def _check_and_record(run_dir: Path, config: dict[str, Any], resume: bool, may_change: frozenset[str]) -> None:
    """The checks and the config.json write of `prepare_run_dir` (the caller holds the lock)."""
    ckpt_path = run_dir / CHECKPOINT
    new = json.loads(json.dumps(config, sort_keys=True, default=str))
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
        changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
                   if k not in _NOT_CONFIG and old.get(k) != new.get(k)}
        refused = [f"{k} {repr(a) if k in old else '(not in the saved config)'} -> {b!r}"
                   for k, (a, b) in changed.items() if k not in may_change]
        if refused:
            raise UserError(f"--resume cannot change {', '.join(refused)}: that alters what the checkpoint's state "
                            "means; use the run's original values or a new --out")
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
                        "environment": env})
    _write_config(run_dir, {**new, "environment": env, "history": history})


def _write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write RUN_DIR/config.json (atomically, keys sorted)."""
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2, sort_keys=True))


def _now() -> str:
    """UTC time stamp for the history."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def record_environment(run_dir: Path, data: str | None) -> dict[str, Any]:
    """This process's environment with the data location, also added to config.json's latest history entry."""
    env = environment(data)
    cfg = read_config(run_dir)
    if cfg is not None and cfg.get("history"):
        cfg["environment"] = cfg["history"][-1]["environment"] = env
        _write_config(run_dir, cfg)
    return env


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


def restore(method: Method, run_dir: Path, resume: bool) -> dict[str, Any]:
    """The loop state to start from: with `resume` and a checkpoint, the checkpoint's (its method state loaded into
    `method`); otherwise iteration 0, no validation yet, no metric rows."""
    state: dict[str, Any] = {"it": 0, "best_val": -1.0, "rows": [], "pending_eval": None, "step_seconds": 0.0}
    path = run_dir / CHECKPOINT
    if not (resume and path.exists()):
        return state
    ckpt = read_checkpoint(path, template=method.state_dict())
    try:
        method.load_state_dict(ckpt["method"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:  # consistent, yet not this state
        raise UserError(f"checkpoint {path} is damaged ({type(err).__name__} restoring the method state); "
                        "delete it to start the run again from iteration 0 with the same command") from None
    print(f"resuming {run_dir} from iteration {ckpt['it']}")
    return {**state, **ckpt}


def divergence_advice(run_dir: Path, fix: str) -> str:
    """How to continue after a divergence, with `fix` (the method's): from the checkpoint really on disk, or from
    scratch if there is none."""
    path = run_dir / CHECKPOINT
    if not (is_main_process() and path.exists()):
        return f"no checkpoint was written yet, so run the same command again with {fix}"
    return (f"the last good checkpoint (iteration {read_checkpoint(path)['it']}) is {path}: continue it with the same "
            f"command, --resume and {fix}")
