"""MTT end to end on digits through the CLI: it beats random real images, and kill + resume is exact."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distillery.run.checkpoint import CHECKPOINT, read_checkpoint
from distillery.cli import main
from distillery.data import load_dataset
from distillery.errors import UserError
from distillery.evaluation.dsa import random_real_baseline
from distillery.sets.synset import SyntheticSet

SMALL = ["--dataset", "digits", "--ipc", "1", "--num-experts", "2", "--expert-epochs-train", "5",
         "--max-start-epoch", "3", "--syn-steps", "10", "--lr-img", "100", "--eval-runs", "1",
         "--final-eval-runs", "3", "--eval-epochs", "100", "--no-progress"]


@pytest.fixture()
def cache(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("DISTILLERY_CACHE", str(path))
    return path


@pytest.mark.slow
def test_mtt_beats_random_real(tmp_path, cache):
    out = tmp_path / "run"
    assert main(["distill", "--method", "mtt", "--out", str(out), "--iterations", "20", "--eval-every", "10",
                 *SMALL]) == 0
    result = json.loads((out / "result.json").read_text())
    random = random_real_baseline(load_dataset("digits"), ipc=1, runs=3, epochs=100, progress=False)
    assert result["best"]["test_mean"] >= random.mean + 0.15, (result["best"], random)
    s = SyntheticSet.load(out / "best.safetensors")
    assert s.meta["method"] == "mtt" and s.ipc == 1 and s.lr > 0
    for name in ("config.json", "metrics.csv", CHECKPOINT, "last.safetensors"):
        assert (out / name).exists()
    assert list((out / "grids").glob("it_*.png"))


def _cmd(out):
    return [sys.executable, "-m", "distillery", "distill", "--method", "mtt", "--out", str(out),
            "--iterations", "16", "--eval-every", "100", "--checkpoint-every", "2", "--final-eval-runs", "1",
            *SMALL, "--eval-epochs", "2"]


def _checkpoint_it(out):
    try:
        return read_checkpoint(out / CHECKPOINT)["it"]
    except UserError:  # not written yet
        return -1


@pytest.mark.slow
def test_kill_and_resume_is_exact(tmp_path, cache):
    env = {**os.environ, "DISTILLERY_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(_cmd(full), check=True, env=env, capture_output=True)  # also trains the cached experts

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _checkpoint_it(cut) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _checkpoint_it(cut)
    assert 6 <= killed_at < 16
    subprocess.run(_cmd(cut) + ["--resume"], check=True, env=env, capture_output=True)

    a = SyntheticSet.load(full / "last.safetensors")
    b = SyntheticSet.load(cut / "last.safetensors")
    assert torch.equal(a.images, b.images) and a.lr == b.lr
    rows_a = (full / "metrics.csv").read_text()
    rows_b = (cut / "metrics.csv").read_text()
    assert rows_a == rows_b
