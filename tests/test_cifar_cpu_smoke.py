"""benchmarks/cifar_cpu.py and rat_cpu_configs.py keep working: every part runs for a few seconds (`--smoke`) on a
tiny CIFAR-shaped folder."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def run_smoke(script: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """`script --smoke` on a tiny CIFAR-shaped image folder (12 train and 3 test images per class)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 3)):
        for c, name in enumerate(CLASSES):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(n):  # a class-dependent mean so that the classes are learnable at all
                pixels = np.clip(rng.normal(25 * c, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--data-dir", str(tmp_path / "data"),
                           "--work", str(tmp_path / "work"), "--smoke", "--threads", "1", *flags],
                          capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT / "src"), "DISTILLERY_CACHE": str(tmp_path / "cache"),
                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_cifar_cpu_smoke_runs_every_part(tmp_path):
    run_smoke("cifar_cpu.py", tmp_path)
    work = tmp_path / "work"
    rows = (work / "cifar_cpu_rows.md").read_text()
    assert "failed" not in rows, rows
    for label in ("MTT", "TESLA", "RaT-BPTT", "DM", "DATM", "DC-paper protocol"):
        assert f"| {label}" in rows or label in rows, (label, rows)


@pytest.mark.slow
def test_rat_cpu_configs_smoke_prints_validation_curves(tmp_path):
    out = run_smoke("rat_cpu_configs.py", tmp_path, "--only", "D").stdout
    row = [line for line in out.splitlines() if line.startswith("| D-labels")]
    assert len(row) == 1 and "learn_labels" in row[0] and "0: " in row[0], out
