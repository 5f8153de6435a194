"""Keep freed host memory in the process instead of handing it back to the kernel after every large tensor.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on
free, and trims the heap top as soon as it is free. A CIFAR-size step allocates many such blocks (one activation of
a 256-image batch of ConvNet-128 is 134 MB), so each step maps new pages, the kernel zero-fills them on first touch
and unmaps them again: 7.7 million minor page faults and 42 % system time over 20 expert minibatches. With mmap off
and trimming only above 1 GiB, freed blocks are reused from the heap: 0.3 million faults, system time 0.6 s instead
of 15.8 s for the same 21 s of user time (benchmarks/RESULTS.md). The cost: the resident size stays at its peak
(952 -> 1316 MB peak there) instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters of glibc's malloc.h
_TRIM_BYTES = 1 << 30
_done = False


def keep_freed_memory() -> bool:
    """On Linux with glibc: stop malloc from mapping large blocks and trimming the heap (once per process).
    Returns whether it took effect (False elsewhere: other allocators keep their own policy)."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        _done = False
    return _done
