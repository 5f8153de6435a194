"""Device selection for `--device auto|cpu|cuda`."""

from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Map 'auto' to cuda when available, else cpu; refuse cuda on a machine without one."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name == "cpu" or name.startswith("cuda") or name == "mps":
        return torch.device(name)
    raise UserError(f"unknown device '{name}'; use auto, cpu or cuda")
