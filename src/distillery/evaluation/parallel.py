"""Independent training runs side by side on the CPU: one PyTorch thread per run instead of several per op.

Why: the evaluation protocol trains several small networks on a few images (SPEC §7); their ops are too small for
PyTorch's intra-op threads to pay off, and two OpenMP threads on two cores stall badly when another process takes a
core. Running the runs themselves in parallel (Python threads; PyTorch ops release the GIL) uses the same cores at
least as well and keeps each run single-threaded, so its numbers do not depend on how many threads there are: the
result equals running the runs one after another with `torch.set_num_threads(1)`, bit for bit (tested).

The number of runs at once is `torch.get_num_threads()` at the call (PyTorch's default, or `--threads`), so
`--threads 1` still means one core. CUDA work, and calls made from inside a run, stay sequential.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_inside = threading.local()  # set in worker threads: a nested map runs inline


def map_runs(fn: Callable[[T], R], items: Iterable[T], device: torch.device | str = "cpu",
             workers: int | None = None) -> list[R]:
    """[fn(item) for item in items], in order; on the CPU up to `workers` (default: PyTorch's thread count) at once.

    `fn` must not use the global RNG (every run here draws from its own generator) and must not share mutable state
    with other items' runs.
    """
    items = list(items)
    workers = torch.get_num_threads() if workers is None else workers
    workers = min(workers, len(items))
    if workers <= 1 or torch.device(device).type != "cpu" or getattr(_inside, "busy", False):
        return [fn(item) for item in items]

    def run(item: T) -> R:
        _inside.busy = True
        return fn(item)

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # threads started from here on inherit one intra-op thread each
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="distillery-run") as pool:
            return list(pool.map(run, items))
    finally:
        torch.set_num_threads(before)
