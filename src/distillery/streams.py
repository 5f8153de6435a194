"""Random streams keyed by what they are for: a `torch.Generator` per (seed, purpose, index, ...).

A method that seeds each draw from a key instead of advancing one generator needs no generator state to resume, and
several processes draw exactly what one process would for the same keys: RaT-BPTT keys its inner runs by (rank,
step), MTT/TESLA key each expert segment by (iteration, global trajectory index), so G processes x K trajectories
draw the same segments as 1 process x G*K.
"""

from __future__ import annotations

import numpy as np
import torch


def stream_generator(seed: int, *key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, *key): an independent, reproducible random stream per purpose, rank and step."""
    mixed = np.random.SeedSequence([seed, *key]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(mixed))
