"""Several processes (torchrun): who am I, averaging, broadcasting, and setting the process group up.

Launch: `torchrun --nproc_per_node G -m distillery.cli distill ...`. Each rank computes meta-gradients on its
share of the real batch; they are averaged with an all-reduce; only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1); return this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (or without torch.distributed): the only process that should write files."""
    return rank_and_world()[0] == 0


def all_reduce_mean_(t: Tensor) -> Tensor:
    """Average `t` in place over all ranks (no-op in a single process)."""
    world = rank_and_world()[1]
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world)
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite `t` in place with rank `src`'s value (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        dist.broadcast(t, src=src)
    return t
