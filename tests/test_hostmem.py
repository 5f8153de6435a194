"""keep_freed_memory: the large temporaries of a step reuse freed memory instead of faulting in fresh pages."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from distillery.hostmem import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(10 << 20)  # 40 MiB, above glibc's largest mmap threshold (32 MiB)
def step():
    y = torch.relu(x * 2 + 1)  # three 40 MiB temporaries, freed at the end, as a forward's activations
    return float(y[0])
step(); step()
before = faults()
for _ in range(10):
    step()
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_a_steps_large_temporaries_reuse_freed_pages():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    plain, kept = faults("plain"), faults("keep")
    assert plain > 10 * 2 * 10240  # most of the 10 x 3 x 40 MiB faulted in afresh (4 KiB pages)
    assert kept < plain / 3
