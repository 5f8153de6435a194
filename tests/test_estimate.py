"""`distillery distill --estimate`: 3 iterations, a projection, nothing written; CUDA OOM names the setting to lower."""

from __future__ import annotations

import pytest
import torch

from distillery.cli import main
from distillery.errors import UserError
from distillery.estimate import estimate_run, oom_advice

TINY = ["--dataset", "digits", "--ipc", "1", "--num-experts", "1", "--expert-epochs-train", "3",
        "--max-start-epoch", "1", "--syn-steps", "2", "--iterations", "40", "--eval-every", "20", "--eval-runs", "1",
        "--final-eval-runs", "2", "--eval-epochs", "10", "--no-progress", "--threads", "1"]


def test_estimate_prints_projection_and_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["distill", "--method", "mtt", "--out", str(out), "--estimate", *TINY]) in (0, None)
    text = capsys.readouterr().out
    assert "s/iteration" in text and "peak memory" in text and "projected wall time" in text
    assert "40 iterations" in text and "2 x 1 + final 2 networks x 11 epochs" in text
    assert not out.exists()


class _Exploding:
    """A method whose step runs out of GPU memory."""

    def step(self, it: int) -> dict:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("method,flag", [("mtt", "--batch-syn"), ("tesla", "--grad tesla"), ("ratbptt", "--window")])
def test_out_of_memory_names_the_setting_to_lower(method: str, flag: str) -> None:
    config = {"method": method, "batch_syn": None, "grad": "unrolled", "window": 60, "real_chunk": 1000}
    assert flag in oom_advice(config)
    with pytest.raises(UserError, match="ran out of memory") as err:
        estimate_run(_Exploding(), None, config, torch.device("cpu"))
    assert flag in str(err.value) and "\n" not in str(err.value)
