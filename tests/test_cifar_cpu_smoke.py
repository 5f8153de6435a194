"""benchmarks/cifar_cpu.py keeps working: every part runs for a few seconds (`--smoke`) on a tiny CIFAR-shaped folder."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.slow
def test_cifar_cpu_smoke_runs_every_part(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 3)):
        for c, name in enumerate(CLASSES):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(n):  # a class-dependent mean so that the classes are learnable at all
                pixels = np.clip(rng.normal(25 * c, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cifar_cpu.py"), "--data-dir",
                           str(tmp_path / "data"), "--work", str(work), "--smoke", "--threads", "1"],
                          capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT / "src"), "DISTILLERY_CACHE": str(tmp_path / "cache"),
                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (work / "cifar_cpu_rows.md").read_text()
    assert "failed" not in rows, rows
    for label in ("MTT", "TESLA", "RaT-BPTT", "DM", "DATM", "DC-paper protocol"):
        assert f"| {label}" in rows or label in rows, (label, rows)
