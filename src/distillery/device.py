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
    if name not in ("cpu", "mps", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but no Apple GPU is visible; use --device cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered "
                        f"from 0; use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)
