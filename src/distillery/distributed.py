"""Several processes (torchrun): who am I, averaging, broadcasting, waiting, and setting the process group up.

Launch: `torchrun --nproc_per_node G -m distillery distill|experts|evaluate ...` (docs/SCALING.md). RaT-BPTT
ranks compute meta-gradients on their share of the real batch, MTT/TESLA ranks on their own expert segments; the
gradients are averaged with an all-reduce and every rank applies the same update. Experts are split by index and
evaluation runs by run index. Only rank 0 writes run files; expert shards are written by the rank that trained them.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

# The longest one rank waits for the others at a collective: at the end of an uneven split of experts or evaluation
# runs, a rank idles for up to one expert's training or one evaluation run (NCCL's own default is 10 minutes).
TIMEOUT = timedelta(hours=6)


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1); return this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
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


def broadcast_(t: Tensor) -> Tensor:
    """Overwrite `t` in place with rank 0's value (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        dist.broadcast(t, src=0)
    return t


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum `t` in place over all ranks (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()
