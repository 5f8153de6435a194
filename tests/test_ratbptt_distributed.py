"""RaT-BPTT over several processes (SPEC §6.7): 2 CPU ranks with gloo on 127.0.0.1.

1. The real batch split over 2 ranks that run the same inner runs (same init, same synthetic batches), with the
   meta-gradients averaged by all-reduce, gives the meta-gradient of 1 process on the whole batch (float64, rel 1e-5).
2. The method object stays in sync across ranks: same window start, identical images after outer steps.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distillery.augment import Augment
from distillery.distributed import all_reduce_mean_, is_main_process, rank_and_world
from distillery.methods.bptt import InnerOptimizer, meta_gradient
from distillery.methods.ratbptt import RaTBPTT
from test_ratbptt import C, fake_dataset, real, small_config, synthetic, tiny

WORLD = 2


def whole_batch_problem():
    """Everything both ranks and the single process share; the real batch is 12 images (6 per rank)."""
    fm, theta0 = tiny()
    images, labels = synthetic(learned=True)
    real_x, real_y = real(12)
    return fm, theta0, images, labels, real_x, real_y, InnerOptimizer("adam", lr=0.05)


def grads(images, labels, real_x, real_y, fm, theta0, opt):
    # Real augmentation off: per-image draws for a split batch would differ from the whole batch's draws.
    _, gx, gy = meta_gradient(fm, images, labels, theta0, opt, 2, 3, real_x, real_y, Augment.rat(), None,
                              torch.Generator().manual_seed(5), num_classes=C)
    return gx, gy


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes share the test machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        assert rank_and_world() == (rank, WORLD) and is_main_process() == (rank == 0)
        fm, theta0, images, labels, real_x, real_y, opt = whole_batch_problem()
        share = slice(rank * 6, (rank + 1) * 6)
        gx, gy = grads(images, labels, real_x[share], real_y[share], fm, theta0, opt)
        all_reduce_mean_(gx), all_reduce_mean_(gy)

        method = RaTBPTT(fake_dataset(), small_config(learn_labels=True))
        starts = [method.step(it)["window_start"] for it in range(2)]
        state = torch.cat([method.images.detach().flatten(), method.labels.detach().flatten()])
        gathered = [torch.empty_like(state) for _ in range(WORLD)]
        dist.all_gather(gathered, state)
        torch.save({"gx": gx, "gy": gy, "starts": starts, "states": gathered},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears the group down (gloo aborts on a one-sided teardown)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_split_real_batch_all_reduce_equals_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))

    fm, theta0, images, labels, real_x, real_y, opt = whole_batch_problem()
    gx, gy = grads(images, labels, real_x, real_y, fm, theta0, opt)
    for r in (r0, r1):
        assert float((r["gx"] - gx).norm() / gx.norm()) < 1e-5
        assert float((r["gy"] - gy).norm() / gy.norm()) < 1e-5

    assert r0["starts"] == r1["starts"]                     # window start broadcast from rank 0
    assert torch.equal(r0["states"][0], r0["states"][1])  # images and labels identical on both ranks
