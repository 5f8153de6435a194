"""A function of fixed-shape tensors as one CUDA graph: capture once, then copy new inputs in and replay.

Why: the hot loops (MTT's unroll, evaluation training) are launch-bound on a GPU, thousands of small kernels per
iteration; a replayed graph launches them all at once. The function must read nothing back to the host and take
every changing value as a tensor, so the captured kernels stay right for every replay. `state` tensors (weights,
momentum, step size) are the function's to update in place across replays; `inputs` are copied into static buffers
before each replay. Warm-up runs on a side stream first, as the PyTorch CUDA-graph notes ask (cuDNN/cuBLAS choices,
the allocator), and the state is restored after it, so the warm-up calls leave no trace.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .errors import UserError, first_line


class Captured:
    """fn(*state, *inputs) captured as a CUDA graph; calling it copies `inputs` in, replays, returns the outputs."""

    def __init__(self, fn: Callable, inputs: Sequence[Tensor], state: Sequence[Tensor] = (), warmup: int = 3,
                 option: str = "--fast") -> None:
        """Warm up `warmup` calls on a side stream (state restored afterwards), then capture one call, all on the
        tensors' device (streams and graphs act on the current device: cuda:1 would otherwise capture nothing); a
        capture that fails is a UserError naming `option`, the flag that turns capture off."""
        self.device = next(t.device for t in (*state, *inputs))
        self.inputs = [t.clone() for t in inputs]
        saved = [t.clone() for t in state]
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(*state, *self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            for t, value in zip(state, saved):
                t.copy_(value)
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph):
                    self.outputs = fn(*state, *self.inputs)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as err:  # an op this PyTorch build cannot capture (the warm-up ran it eagerly)
                while isinstance(err.__context__, RuntimeError):  # ending a failed capture raises again: the cause
                    err = err.__context__
                raise UserError(f"capturing a CUDA graph failed ({first_line(err)}); rerun with {option} off, the "
                                "plain path (same numbers up to float rounding)") from err

    def __call__(self, inputs: Sequence[Tensor]):
        """Replay on `inputs`; the outputs are static tensors, overwritten by the next replay."""
        for buffer, value in zip(self.inputs, inputs):
            buffer.copy_(value)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.outputs


class GraphCache:
    """Captured graphs by name and input signature: the first call with a new signature captures, later ones
    replay. `captures` counts the captures; `clear()` drops every graph (and its memory pool)."""

    def __init__(self) -> None:
        """No graph yet: the first call of each signature captures (`--fast` is the flag a failed capture names)."""
        self.captures = 0
        self._graphs: dict[tuple, Captured] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph; the next calls capture again."""
        self._graphs.clear()

    def replay(self, name: str, fn: Callable, inputs: Sequence[Tensor], state: Sequence[Tensor] = ()):
        """`Captured(fn, inputs, state)` for this name and these inputs' shapes, dtypes and devices, replayed on
        `inputs` (captured first if there is none yet)."""
        key = (name, *((t.shape, t.dtype, t.device) for t in inputs))
        if key not in self._graphs:
            self._graphs[key] = Captured(fn, inputs, state)
            self.captures += 1
        return self._graphs[key](inputs)
