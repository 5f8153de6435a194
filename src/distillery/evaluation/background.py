"""The run loop's validation evaluation in a background thread on the CPU, so that distillation goes on meanwhile.

Why: on the CPU an evaluation (several networks x hundreds of epochs) takes as long as dozens of iterations, and
neither it nor the distillation keeps more than a core or two busy (their ops are small). Splitting the threads
PyTorch may use between the two and running them at once leaves the numbers of both unchanged (an evaluation
depends only on the set and its seed; the method never reads its result) while the wall time becomes about the
larger of the two instead of their sum. The loop records a result when it arrives, in iteration order; a checkpoint
written while one runs names it (`run/loop.py`'s pending folder), so a kill loses nothing. When the loop stops early
(Ctrl-C, an error) it cancels the running evaluation, which ends at its next epoch: the evaluation is handed
`BackgroundEval.check` as its per-epoch `tick` (the training loops know nothing of threads).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

class EvalCancelled(Exception):
    """The background evaluation was abandoned by the run loop."""


def overlap_wanted(mode: str, device: torch.device, world: int, needs_result: bool) -> bool:
    """`--eval-overlap auto`: on the CPU, one process, 2+ PyTorch threads, and a method that does not steer on the
    evaluation (RaT-BPTT's plateau curriculum reads each result before its next step)."""
    return (mode == "auto" and device.type == "cpu" and world == 1 and not needs_result
            and torch.get_num_threads() >= 2)


class BackgroundEval:
    """At most one evaluation at a time in a background thread, with half of this thread's PyTorch threads."""

    def __init__(self) -> None:
        """Split this thread's PyTorch threads: half (at least 1) for the evaluation, the rest for the caller."""
        self.total = torch.get_num_threads()
        self.background = max(1, self.total // 2)
        self.foreground = max(1, self.total - self.background)
        torch.set_num_threads(self.foreground)
        self._thread: threading.Thread | None = None
        self._out: dict[str, Any] = {}
        self._cancel = threading.Event()  # set while `close` abandons the running evaluation

    def check(self) -> None:
        """The evaluation's per-epoch (or step) `tick`: end it here once the loop has abandoned it."""
        if self._cancel.is_set():
            raise EvalCancelled

    def start(self, fn: Callable[[], Any]) -> None:
        """Run `fn()` in the background (it should pass `check` to its training as `tick`); the previous one must
        have been collected with `result()`."""
        if self._thread is not None:
            raise RuntimeError("an evaluation is already running; collect it with result() first")

        def run() -> None:
            try:
                self._out["value"] = fn()
            except BaseException as err:  # handed to result(), in the loop's thread
                self._out["error"] = err

        self._out = {}
        torch.set_num_threads(self.background)  # a new thread takes the count set last
        self._thread = threading.Thread(target=run, name="distillery-eval", daemon=True)
        self._thread.start()
        torch.set_num_threads(self.foreground)

    @property
    def busy(self) -> bool:
        """An evaluation has been started and not collected."""
        return self._thread is not None

    def peek(self) -> Any:
        """The running evaluation's value once it has finished, else None; for display only: the loop still collects
        it with `result()` at its usual iteration, so what is recorded never depends on timing."""
        if self._thread is None or self._thread.is_alive():
            return None
        return self._out.get("value")

    def result(self) -> Any:
        """Wait for the running evaluation and return its value (or raise its error)."""
        if self._thread is None:
            raise RuntimeError("no evaluation is running")
        self._thread.join()
        self._thread = None
        if "error" in self._out:
            raise self._out["error"]
        return self._out["value"]

    def close(self) -> None:
        """Cancel a still-running evaluation (it ends at its next epoch) and give this thread its threads back."""
        if self._thread is not None:
            self._cancel.set()
            self._thread.join()
            self._thread = None
            self._cancel.clear()
        torch.set_num_threads(self.total)
