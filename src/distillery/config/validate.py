"""Check a resolved `distill` configuration before any data is read or any expert is trained.

Here: every value against the range its option declares (`options.check_values`, over the method's config, the
loop's and the experts'), IPC vs class sizes (`defaults.DataFacts`), and, once `distill` knows the device, the CUDA
paths (`check_fast`, every method). The constraints between a method's own options and the data (e.g. which --grad
modes --fast on captures) are its `Method.check_config` (methods/).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from .defaults import DataFacts
from ..errors import UserError
from .options import check_values

if TYPE_CHECKING:
    import torch


def check_config(config: dict[str, Any], classes: Iterable[type], facts: DataFacts) -> None:
    """UserError (one line, naming the flag and the fix) for the first value or combination that cannot work."""
    for cls in classes:
        check_values(cls, config)
    ipc = config["ipc"]
    if ipc > facts.min_class:
        raise UserError(f"--ipc {ipc} is more than the {facts.min_class} training images of the smallest class of "
                        f"{facts.name} (after the --val-fraction hold-out); lower --ipc or --val-fraction")


def check_cuda(flag: str, device: torch.device | str) -> None:
    """`flag on` (--fast, --eval-fast) replays captured CUDA graphs: refused on any other device."""
    if not _is_cuda(device):
        raise UserError(f"{flag} on replays captured CUDA graphs but the device is {device}; "
                        f"use --device cuda or {flag} off")


def _is_cuda(device: torch.device | str) -> bool:
    """Whether `device` ("cuda", "cuda:1", a torch.device) is a CUDA device."""
    return str(device).split(":")[0] == "cuda"


def check_fast(config: dict[str, Any], device: torch.device | str) -> None:
    """--fast on, --eval-fast on and --norm-kernel triton only on CUDA (the last only where Triton imports): checked
    once, by `distill`, as soon as the device is known."""
    for flag, key in (("--eval-fast", "eval_fast"), ("--fast", "fast")):
        if config.get(key) == "on":
            check_cuda(flag, device)
    if config.get("norm_kernel") == "triton":
        from ..models.instancenorm import triton_missing
        if not _is_cuda(device):
            raise UserError(f"--norm-kernel triton runs a CUDA kernel but the device is {device}; "
                            "use --device cuda or --norm-kernel torch")
        missing = triton_missing()
        if missing:
            raise UserError(f"--norm-kernel triton needs Triton, but {missing}; pip install triton or use "
                            "--norm-kernel torch")
