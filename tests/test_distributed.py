"""MTT/TESLA, experts and evaluation over several processes: 2 CPU ranks with gloo on 127.0.0.1 (docs/SCALING.md).

One spawn of 2 workers does everything a torchrun job would, on digits with a tiny ConvNet:
1. trains 4 experts (rank r: experts r, r + 2), rank 1 failing half-way through its first expert and the run then
   resumed: the store must equal a 1-process store (same thread count): manifest, metadata, bit-equal trajectories;
2. one MTT and one TESLA (expert soft labels) iteration with 1 segment per rank: the all-reduced image and step-size
   gradients must equal 1 process with `trajectories=2` (rel 1e-5); after 2 steps both ranks hold the same images;
3. an evaluation of 3 runs split over the 2 ranks: the same accuracies as one process;
4. an uninterrupted 2-process distillation through the CLI (as torchrun would run it).
Then a real `torchrun` distillation on digits is killed (SIGKILL) and resumed, and must end with the set of 4.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

from distillery.experts import train as experts
from distillery.cli import main
from distillery.data import load_dataset
from distillery.distributed import barrier
from distillery.errors import UserError
from distillery.evaluation.dsa import evaluate_set
from distillery.experts import ExpertStore, train_experts
from distillery.methods.mtt import MTT, MTTConfig
from distillery.sets.synset import SyntheticSet
from test_ratbptt_distributed import free_port

WORLD = 2
MODEL = "ConvNetD2W8"
EXPERTS = dict(num_experts=4, epochs=3, lr=0.05, batch=256, seed=1, progress=False)
MTT_CFG = MTTConfig(ipc=1, model=MODEL, syn_steps=3, expert_epochs=1, max_start_epoch=2, lr_img=10.0, seed=2)
TESLA_CFG = dataclasses.replace(MTT_CFG, grad="tesla", labels="expert")
EVAL = dict(model=MODEL, runs=3, epochs=2, seed=4, split="val", progress=False)
RUN = ["--method", "mtt", "--dataset", "digits", "--model", "ConvNetD2W8", "--ipc", "1", "--num-experts", "2",
       "--expert-epochs-train", "3", "--max-start-epoch", "2", "--expert-epochs", "1", "--syn-steps", "4",
       "--lr-img", "10", "--iterations", "40", "--checkpoint-every", "2", "--eval-every", "100", "--eval-runs", "1",
       "--final-eval-runs", "1", "--eval-epochs", "1", "--device", "cpu", "--threads", "1", "--no-progress"]


class RankFails(Exception):
    """Stands in for a process that dies in the middle of an expert."""


def _fail_after(real, saves: int):
    """`experts._save_epoch` that raises once it has written `saves` snapshots."""
    count = [0]

    def save(*args, **kwargs):
        if count[0] == saves:
            raise RankFails
        count[0] += 1
        real(*args, **kwargs)

    return save


def _step_twice(method: MTT) -> torch.Tensor:
    method.step(0)
    method.step(1)
    return method.images.detach().clone()


def worker(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        ds = load_dataset("digits")
        store_dir = os.path.join(root, "store2")
        if rank == 1:  # expert 1: init + 1 epoch saved, then the process "dies"; rank 0 finishes experts 0 and 2
            real = experts._save_epoch
            experts._save_epoch = _fail_after(real, 2)
            try:
                train_experts(ds, MODEL, out_dir=store_dir, **EXPERTS)
            except RankFails:
                barrier()  # the barrier rank 0 waits at before it opens the store
            finally:
                experts._save_epoch = real
            half_done = sorted(e["index"] for e in ExpertStore.open(store_dir).experts)
        else:  # after the barrier, rank 0 finds the experts of rank 1 missing and says so
            with pytest.raises(UserError, match=r"lacks experts \[1, 3\]"):
                train_experts(ds, MODEL, out_dir=store_dir, **EXPERTS)
            half_done = None
        store = train_experts(ds, MODEL, out_dir=store_dir, **EXPERTS)  # the resumed run, both ranks

        out = {"half_done": half_done}
        for name, cfg in (("mtt", MTT_CFG), ("tesla", TESLA_CFG)):
            res, _ = MTT(ds, store, cfg).gradient(0)
            out[name] = (res.grad_images, res.grad_lr, res.loss)
            images = _step_twice(MTT(ds, store, cfg))
            gathered = [torch.empty_like(images) for _ in range(WORLD)]
            dist.all_gather(gathered, images)
            out[name + "_images"] = gathered
        x, y = ds.random_set(1, torch.Generator().manual_seed(0))
        out["accs"] = evaluate_set(x, y, ds, distributed=True, **EVAL).accs
        torch.save(out, os.path.join(root, f"rank{rank}.pt"))
        os.environ["DISTILLERY_CACHE"] = os.path.join(root, "cache")  # the torchrun test's reference run
        assert main(["distill", "--out", os.path.join(root, "full"), *RUN]) == 0
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_ranks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GLOO_SOCKET_IFNAME", "lo")
        mp.spawn(worker, args=(free_port(), str(root)), nprocs=WORLD, join=True)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process(two_ranks):
    root, _ = two_ranks
    ds = load_dataset("digits")
    return ds, train_experts(ds, MODEL, out_dir=root / "store1", **EXPERTS)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_two_process_experts_resume_into_the_single_process_store(two_ranks, one_process):
    root, ranks = two_ranks
    assert ranks[1]["half_done"] == [0, 2]  # rank 1 really failed before its experts were done
    files = sorted(p.name for p in (root / "store2").iterdir())
    assert files == sorted(p.name for p in (root / "store1").iterdir())
    assert ".partial" not in files and "expert_0003.safetensors" in files
    # safetensors writes its header metadata keys in a per-process random order, so shard bytes (and their sha256)
    # differ between any two processes; everything else must be identical.
    manifests = [json.loads((root / s / "manifest.json").read_text()) for s in ("store2", "store1")]
    for m in manifests:
        assert [e.pop("sha256") for e in m["experts"]]
    assert manifests[0] == manifests[1]
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(root / "store2" / name, "pt") as a, safe_open(root / "store1" / name, "pt") as b:
                assert a.metadata() == b.metadata()
                assert torch.equal(a.get_tensor("trajectory"), b.get_tensor("trajectory")), name


@pytest.mark.parametrize("name, cfg", [("mtt", MTT_CFG), ("tesla", TESLA_CFG)])
def test_two_processes_give_the_gradient_of_two_trajectories(two_ranks, one_process, name, cfg):
    _, ranks = two_ranks
    ds, store = one_process
    res, _ = MTT(ds, store, dataclasses.replace(cfg, trajectories=2)).gradient(0)
    one, _ = MTT(ds, store, cfg).gradient(0)
    assert rel(one.grad_images, res.grad_images) > 1e-3  # the second segment matters
    for r in ranks:
        grad_images, grad_lr, loss = r[name]
        assert rel(grad_images, res.grad_images) < 1e-5
        assert abs(float(grad_lr - res.grad_lr)) <= 1e-5 * abs(float(res.grad_lr))
        assert loss == pytest.approx(res.loss, rel=1e-5)
    gathered = ranks[0][name + "_images"]
    assert torch.equal(gathered[0], gathered[1])  # every rank applied the same update
    images = _step_twice(MTT(ds, store, dataclasses.replace(cfg, trajectories=2)))
    assert rel(gathered[0], images) < 1e-5


def test_two_process_evaluation_gives_the_same_accuracies(two_ranks, one_process):
    _, ranks = two_ranks
    ds, _ = one_process
    x, y = ds.random_set(1, torch.Generator().manual_seed(0))
    single = evaluate_set(x, y, ds, **EVAL)
    assert ranks[0]["accs"] == ranks[1]["accs"] == single.accs


# --- a real torchrun job on digits: kill it, resume it, get the uninterrupted result --------------------------------
def _torchrun(out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "distillery", "distill",
            "--out", str(out), *RUN, *extra]


def _iterations_logged(out) -> int:
    """Rows of metrics.csv, which rank 0 rewrites at every checkpoint (0 before the first one)."""
    try:
        return len((out / "metrics.csv").read_text().splitlines()) - 1
    except FileNotFoundError:
        return 0


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc): torchrun's workers, which run in sessions of their own."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through Linux /proc")
def test_torchrun_distillation_killed_and_resumed_equals_uninterrupted(two_ranks, tmp_path, capsys):
    root, _ = two_ranks
    env = {**os.environ, "DISTILLERY_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1",  # experts: cached
           "GLOO_SOCKET_IFNAME": "lo"}
    full, cut = root / "full", tmp_path / "cut"
    proc = subprocess.Popen(_torchrun(cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _iterations_logged(cut) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    workers = _children(proc.pid)
    assert len(workers) >= WORLD
    for pid in workers:  # SIGKILL the workers (no clean-up), then the launcher
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
    assert 6 <= _iterations_logged(cut) < 40 and not (cut / "result.json").exists()
    subprocess.run(_torchrun(cut, "--resume"), check=True, env=env, capture_output=True)

    a, b = (SyntheticSet.load(d / "last.safetensors") for d in (full, cut))
    assert torch.equal(a.images, b.images) and a.lr == b.lr
    assert json.loads((full / "result.json").read_text())["last"]["test_accs"] == \
        json.loads((cut / "result.json").read_text())["last"]["test_accs"]
    capsys.readouterr()
    assert main(["distill", "--out", str(cut), *RUN, "--resume"]) == 2  # 1 process would change every iteration
    assert "processes 2 -> 1" in capsys.readouterr().err
