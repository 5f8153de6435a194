"""benchmarks/gpu_suite.py --smoke runs every row of the GPU suite at tiny sizes on the CPU, so the suite cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_runs_every_row(tmp_path: Path) -> None:
    out = tmp_path / "rows.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--rows-out",
                           str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "DISTILLERY_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = out.read_text()
    for what in ("unrolled IPC 1 N 2, fast off", "tesla IPC 1 N 2, fast on", "checkpointed IPC 1 N 2",
                 "RaT-BPTT", "expert epoch, published loop", "expert epoch, ours |", "evaluation 2 x 1 ep, ours |",
                 "end to end, digits", "DATM checkpointed every 1 IPC 1 N 2", "unrolled IPC 1 N 2, CUDA graph off",
                 "CUDA graph on | not run: capture needs CUDA", "norm kernel triton | not run: the kernel needs CUDA"):
        assert what in table, what
    assert "skipped" not in table and "failed" not in table
    assert table.count("n/a (CPU") >= 13
