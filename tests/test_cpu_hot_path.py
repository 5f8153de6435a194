"""benchmarks/cpu_hot_path.py runs every timed row at tiny sizes and prints ratios and floors, so it cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_hot_path_smoke_prints_every_row() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_hot_path.py"), "--rows", "mtt", "expert",
                           "rat", "--steps", "1", "--rounds", "1", "--expert-images", "40", "--rat-horizon", "2",
                           "--rat-window", "1", "--rat-real-batch", "8"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| MTT iteration: published (distill.py port)", "| MTT iteration: distillery (unrolled)",
        "| TESLA iteration: distillery", "| expert epoch: published (buffer.py port) (x1125.0: s per 45,000-image "
        "epoch)", "| expert epoch: distillery (x1125.0: s per 45,000-image epoch)", "| RaT-BPTT step: distillery"]
    assert rows[1].split(" | ")[3].endswith("x") and rows[4].split(" | ")[3].endswith("x")  # ratios to the ports
    assert all(r.rstrip(" |").endswith("%") for r in rows)  # every row has its fraction of the floor
    assert "image-gradient relative difference" in proc.stdout and "parameters after one epoch" in proc.stdout
