"""`distillery distill --estimate`: 3 iterations, a projection, nothing written; CUDA OOM names the setting to lower."""

from __future__ import annotations

import pytest
import torch

from distillery.cli import main
from distillery.errors import UserError
from distillery.run.estimate import estimate_run, oom_advice

TINY = ["--dataset", "digits", "--ipc", "1", "--num-experts", "1", "--expert-epochs-train", "3",
        "--max-start-epoch", "1", "--syn-steps", "2", "--iterations", "40", "--eval-every", "20", "--eval-runs", "1",
        "--final-eval-runs", "2", "--eval-epochs", "10", "--no-progress", "--threads", "1"]


def test_estimate_prints_projection_and_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store"
    assert main(["experts", "--dataset", "digits", "--num-experts", "1", "--expert-epochs-train", "3", "--out", str(store),
                 "--no-progress", "--threads", "1"]) == 0
    out = tmp_path / "run"
    assert main(["distill", "--method", "mtt", "--out", str(out), "--estimate", "--experts", str(store),
                 *TINY]) in (0, None)
    text = capsys.readouterr().out
    assert "s/iteration" in text and "peak memory" in text and "projected wall time" in text
    # iteration 0, 20 and 40 validate; best, last and the report's baseline each train 2 networks
    assert "40 iterations" in text and "3 x 1 validation networks" in text
    assert "4 final (best and last) + 2 baseline test networks x 11 epochs" in text
    assert "data and ZCA loading" in text and "host memory of one step" in text and "student graph" in text
    assert not out.exists()


def test_estimate_without_experts_projects_their_cost_and_trains_none(tmp_path, monkeypatch, capsys) -> None:
    """No --experts: a one-line error with the projected expert time and the recipe the run reads; nothing cached."""
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    args = [*TINY, "--num-experts", "100", "--expert-epochs-train", "50"]
    assert main(["distill", "--method", "mtt", "--out", str(tmp_path / "run"), "--estimate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "100 experts x 50 epochs" in err and "--experts DIR" in err and "--expert-epochs-train 2" in err
    assert err.count("\n") == 0 and not (tmp_path / "cache" / "experts").exists()


def test_interrupted_estimate_does_not_offer_a_resume(tmp_path, monkeypatch, capsys) -> None:
    """Ctrl-C in an --estimate: it wrote nothing, so no 'continue ... with --resume' pointing at a missing run."""
    import distillery.run.estimate as estimate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(estimate, "check_host_memory", interrupted)
    out = tmp_path / "run"
    assert main(["distill", "--method", "mtt", "--out", str(out), "--estimate", *TINY]) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "writes nothing" in err and not out.exists()


def test_host_memory_check_names_what_dominates_and_the_flag() -> None:
    """RaT-BPTT's CIFAR-10 IPC 10 row: the window's graph dominates (not the real batch --real-chunk splits), and a
    machine without the memory gets a one-line refusal naming --window before any step; MTT names --batch-syn."""
    from distillery.data.registry import get_spec
    from distillery.run.estimate import check_host_memory
    from distillery.methods import get_method
    from distillery.config.presets import get_preset

    rat = {**get_preset("ratbptt/cifar10-ipc10"), "real_chunk": 1000}
    terms = get_method("ratbptt").host_memory(rat, get_spec("cifar10"))
    top = max(terms, key=terms.get)
    assert top.startswith("window graph") and terms[top] > 5 * sum(v for k, v in terms.items() if k != top)
    half = get_method("ratbptt").host_memory({**rat, "window": 30}, get_spec("cifar10"))
    assert 0.45 < half[next(k for k in half if k.startswith("window"))] / terms[top] < 0.55
    with pytest.raises(UserError, match="--window") as err:
        check_host_memory(rat, get_spec("cifar10"), available=4e9)
    assert "\n" not in str(err.value) and "available" in str(err.value)
    mtt = {**get_preset("mtt/digits-ipc1"), "grad": "unrolled"}
    assert check_host_memory(mtt, get_spec("digits"), available=64e9)
    with pytest.raises(UserError, match="--batch-syn"):
        check_host_memory(mtt, get_spec("digits"), available=1e3)
    assert check_host_memory({"method": "dm", "ipc": 1}, get_spec("digits"), available=1e3) == {}  # no model yet


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
