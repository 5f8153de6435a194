"""A run's metrics: RUN_DIR/metrics.csv, one row per iteration (loss, lr, ...) plus validation accuracy at
evaluations, and TensorBoard scalars in RUN_DIR/tb/ (when the tensorboard package is installed)."""

from __future__ import annotations

import bisect
import csv
import io
from pathlib import Path
from typing import Any

from ..io import atomic_write_text


class MetricsLog:
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
        """Rewrite metrics.csv with every row so far (one column per key any row has) and flush TensorBoard."""
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
