"""Test-wide settings: one intra-op thread (the test tensors are tiny; spinning OpenMP threads only cost time)."""

import torch

torch.set_num_threads(1)
