"""Runs side by side on the CPU (parallel.map_runs) give exactly the numbers of the same runs one after another."""

import threading

import pytest
import torch

from distillery.data import load_dataset
from distillery.errors import UserError
from distillery.evaluation.dsa import evaluate_set, random_real_baseline
from distillery.evaluation.parallel import map_runs
from distillery.evaluation.protocol import Scoring, rat_protocol
from distillery.evaluation import rat


@pytest.fixture
def two_threads():
    """PyTorch allowed two threads (what map_runs turns into two runs at once), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _set(ds):
    return ds.random_set(1, torch.Generator().manual_seed(3))


def test_map_runs_keeps_order_runs_in_threads_and_restores_the_thread_count(two_threads):
    names, counts = [], []

    def fn(i):
        names.append(threading.current_thread().name)
        counts.append(torch.get_num_threads())
        return i * i

    assert map_runs(fn, range(5)) == [0, 1, 4, 9, 16]
    assert all(n.startswith("distillery-run") for n in names) and set(counts) == {1}
    assert torch.get_num_threads() == 2


def test_map_runs_is_sequential_when_nested_on_cuda_or_single_threaded(two_threads):
    def names(device="cpu"):
        return map_runs(lambda i: threading.current_thread().name, range(3), device)

    assert set(names("cuda")) == {threading.current_thread().name}  # fn never touches CUDA here: only the choice
    nested = map_runs(lambda i: names(), range(2))
    assert all(len(set(inner)) == 1 for inner in nested)  # each inner map ran inline in its worker
    assert set(map_runs(lambda i: threading.current_thread().name, range(3), workers=1)) == {
        threading.current_thread().name}


def test_map_runs_passes_a_run_error_on(two_threads):
    def fn(i):
        if i == 2:
            raise UserError("run 2 diverged")
        return i

    with pytest.raises(UserError, match="run 2 diverged"):
        map_runs(fn, range(4))
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("protocol", ["dsa", "rat"])
def test_evaluation_side_by_side_equals_one_by_one(digits, protocol):
    x, y = _set(digits)
    proto = rat_protocol(digits.spec.default_model, 3, 0, steps=(30, 60))

    def evaluate():
        if protocol == "rat":
            return rat.score(x, y, digits, proto, Scoring(split="val"))
        return evaluate_set(x, y, digits, runs=3, epochs=20, split="val", progress=False)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = evaluate()
        torch.set_num_threads(2)
        side = evaluate()
    finally:
        torch.set_num_threads(before)
    assert side.accs == alone.accs and side.steps == alone.steps and side.val_by_steps == alone.val_by_steps
    assert len(set(side.accs)) > 1 or protocol == "rat"  # distinct seeds: the runs really differ


def test_random_baseline_side_by_side_equals_one_by_one(digits):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = random_real_baseline(digits, 1, runs=3, epochs=20, split="val", progress=False)
        torch.set_num_threads(2)
        side = random_real_baseline(digits, 1, runs=3, epochs=20, split="val", progress=False)
    finally:
        torch.set_num_threads(before)
    assert side.accs == alone.accs and len(side.accs) == 3


def test_experts_side_by_side_equal_one_by_one(digits, tmp_path):
    from distillery.experts import train_experts

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = train_experts(digits, "ConvNetD1", 2, 2, 0.01, out_dir=tmp_path / "alone", progress=False)
        torch.set_num_threads(2)
        side = train_experts(digits, "ConvNetD1", 2, 2, 0.01, out_dir=tmp_path / "side", progress=False)
    finally:
        torch.set_num_threads(before)
    for k in range(2):
        assert all(torch.equal(alone.checkpoint(k, e), side.checkpoint(k, e)) for e in range(3))
    assert not torch.equal(side.checkpoint(0, 2), side.checkpoint(1, 2))
    # (not the shards' sha256: safetensors writes the metadata keys in no fixed order)
    assert [(e["val_acc"], e["test_acc"]) for e in alone.experts] == [(e["val_acc"], e["test_acc"]) for e in side.experts]
