"""Dead-run detection for the shared loop: warn early, stop where continuing cannot improve the set.

Signals (docs/DEFAULTS.md, "Run health"):
  * per iteration, from the method's logs: `alpha_pinned` (MTT/TESLA: the step-size guard held α at a bound) and
    `student_still` (MTT/TESLA: L ≈ 1, the student ended where it started). `WARN_AFTER` iterations in a row with
    either give a warning, `STOP_AFTER` stop the run (with `health="stop"`).
  * per evaluation: validation accuracy below the initial set's at `VAL_WARN` evaluations in a row warns,
    at `VAL_STOP` stops.
The stop is a `Stalled` error whose one line names the method's fix (`method.health_fix`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import UserError

WARN_AFTER = 10    # dead iterations in a row before a warning
STOP_AFTER = 50    # ... before the run stops
VAL_WARN = 2       # evaluations in a row below the initial set before a warning
VAL_STOP = 4       # ... before the run stops
DEFAULT_FIX = "lower the learning rates, or start from a preset (`distillery presets`)"
_SIGNALS = {"alpha_pinned": "the step size α was held at a --lr-min/--lr-max bound by --lr-guard clamp",
            "student_still": "the student did not move (matching loss ≈ 1)"}


class Stalled(UserError):
    """The run is dead: more iterations cannot improve the set."""


class HealthMonitor:
    """Counts dead iterations and evaluations below the initial set; warns, then stops (mode stop|warn|off)."""

    def __init__(self, mode: str, fix: str, run_dir: Path, rows: list[dict[str, Any]]):
        self.mode, self.fix, self.run_dir = mode, fix, run_dir
        self.dead, self.below = 0, 0
        self.why: set[str] = set()
        # the initial set's validation accuracy: from the logged rows when resuming
        self.initial: float | None = next((r["val_acc"] for r in rows if r.get("it") == 0 and "val_acc" in r), None)

    def after_step(self, it: int, logs: dict[str, float]) -> None:
        """Watch the per-iteration signals of iteration `it`."""
        if self.mode == "off":
            return
        now = {k for k in _SIGNALS if logs.get(k, 0.0) >= 0.5}
        self.dead = self.dead + 1 if now else 0
        self.why = self.why | now if now else set()
        if self.dead in (WARN_AFTER, STOP_AFTER):
            what = " and ".join(_SIGNALS[k] for k in sorted(self.why))
            alpha = f" (α = {logs['lr']:.3g})" if "lr" in logs else ""
            self._flag(self.dead == STOP_AFTER, f"at iteration {it}: {what} for {self.dead} iterations in a row"
                                                f"{alpha}")

    def after_eval(self, it: int, val: float) -> None:
        """Watch the validation accuracy of the evaluation at iteration `it`."""
        if self.mode == "off" or val is None or math.isnan(val):
            return
        if self.initial is None:
            self.initial = val
            return
        self.below = self.below + 1 if val < self.initial else 0
        if self.below in (VAL_WARN, VAL_STOP):
            self._flag(self.below == VAL_STOP, f"at iteration {it}: validation accuracy {100 * val:.1f}% is below "
                                               f"the initial set's {100 * self.initial:.1f}% at {self.below} "
                                               "evaluations in a row")

    def _flag(self, stop: bool, what: str) -> None:
        """Warn, or raise Stalled when `stop` and the mode is stop."""
        if stop and self.mode == "stop":
            raise Stalled(f"stopped {what}: the run is not learning; {self.fix}. The best set so far is in "
                          f"{self.run_dir / 'best.safetensors'} (--health warn runs on regardless)")
        tqdm.write(f"warning: {what}; the run may be dead: {self.fix}", file=sys.stderr)
