"""Checks of what a file held, shared by the readers of set files, imported files and expert stores: a value that
fails one is refused with a one-line `UserError` naming the file and the fix, before anything uses it."""

from __future__ import annotations

import torch

from .errors import UserError


def real_dtype(x: torch.Tensor) -> bool:
    """True for a real number tensor (float or integer); False for bool, complex and quantised ones."""
    return x.dtype != torch.bool and not x.is_complex() and not x.is_quantized


def require_finite(x: torch.Tensor, where: str, what: str, fix: str) -> None:
    """Refuse a tensor holding NaN or inf, counting the bad entries."""
    if x.is_floating_point():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise UserError(f"{where}: {bad} of the {x.numel()} values of {what} are NaN/inf; {fix}")


def check_trajectory(trajectory: torch.Tensor, where: str, fix: str) -> None:
    """Refuse an expert trajectory (epochs + 1, P) that trajectory matching cannot use: NaN/inf parameters, or two
    consecutive snapshots that are identical (the expert distance ||θ_t - θ_{t+M}|| that normalises the matching loss
    would be 0, and distillation would stop with a NaN blamed on the learning rate)."""
    require_finite(trajectory, where, "the trajectory", fix)
    if len(trajectory) < 2:
        raise UserError(f"{where} has {len(trajectory)} snapshot(s), at least 2 (init and one epoch) are needed; {fix}")
    same = [t for t in range(len(trajectory) - 1) if torch.equal(trajectory[t], trajectory[t + 1])]
    if len(same) == len(trajectory) - 1:
        raise UserError(f"degenerate trajectory: {where}'s snapshots are identical (all {len(trajectory)}), so every "
                        "expert distance is 0; this is what MTT's buffer.py writes when it trains on a CPU "
                        "(`p.detach().cpu()` is then the live parameter, not a copy); " + fix)
    if same:
        raise UserError(f"degenerate trajectory: {where}'s snapshots {same[0]} and {same[0] + 1} are identical "
                        f"(an expert distance of 0 over that epoch); {fix}")
