"""Check a resolved `distill` configuration before any data is read or any expert is trained.

Two kinds of checks: every value against the range its option declares (`options.check_values`, over the method's
config, the loop's and the experts'), then the constraints between options and the data's cheap facts
(`defaults.DataFacts`): expert epochs vs max_start_epoch + expert_epochs (also against an existing --experts store's
manifest), window vs horizon, IPC vs class sizes, batch vs set size, Boost-DD blocks vs IPC, --fast on vs --grad (and,
once `distill` knows the device, vs a non-CUDA device: `check_fast`, every method).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .defaults import DataFacts
from .errors import UserError
from .options import check_values

if TYPE_CHECKING:
    import torch


def check_config(config: dict[str, Any], classes: Iterable[type], facts: DataFacts) -> None:
    """UserError (one line, naming the flag and the fix) for the first value or combination that cannot work."""
    for cls in classes:
        check_values(cls, config)
    ipc, method = config["ipc"], config["method"]
    if ipc > facts.min_class:
        raise UserError(f"--ipc {ipc} is more than the {facts.min_class} training images of the smallest class of "
                        f"{facts.name} (after the --val-fraction hold-out); lower --ipc or --val-fraction")
    n_syn = ipc * facts.num_classes
    if method in ("mtt", "tesla", "datm"):  # registry: datm
        _check_mtt(config, n_syn)
        if method == "datm":  # registry: datm
            from .methods.datm import check_config as check_datm  # registry: datm

            check_datm(config, *expert_epochs_available(config))  # registry: datm
    else:
        _check_ratbptt(config, facts)


def expert_epochs_available(config: dict[str, Any]) -> tuple[int, str]:
    """Epochs of the experts the run will use: the --experts store's manifest (read cheaply), else those to train."""
    path = config.get("experts")
    if path is None:
        return config["expert_epochs_train"], "the experts to train (--expert-epochs-train)"
    manifest = Path(path) / "manifest.json"
    try:
        epochs = json.loads(manifest.read_text())["epochs"]
    except FileNotFoundError:
        raise UserError(f"no expert store at {path} (manifest.json missing); train one with `distillery experts` "
                        "or pass the right --experts dir") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{manifest} is not a readable distillery expert manifest; pass the dir "
                        "`distillery experts` wrote") from None
    return int(epochs), f"the experts in {path}"


def _check_mtt(config: dict[str, Any], n_syn: int) -> None:
    """MTT/TESLA: the sampled segments must exist in the experts; minibatches must fit in the set."""
    epochs, source = expert_epochs_available(config)
    need = config["max_start_epoch"] - 1 + config["expert_epochs"]
    if epochs < need:
        raise UserError(f"{source} has {epochs} epochs but --max-start-epoch {config['max_start_epoch']} + "
                        f"--expert-epochs {config['expert_epochs']} needs {need}; train longer experts "
                        "(--expert-epochs-train) or lower --max-start-epoch")
    if config.get("batch_syn") is not None and config["batch_syn"] > n_syn:
        raise UserError(f"--batch-syn {config['batch_syn']} is larger than the {n_syn} synthetic images "
                        "(ipc x classes); lower it or leave it unset (the whole set)")
    check_fast(config)
    every = config.get("grad_checkpoint_every")
    if every is not None and every > config["syn_steps"]:
        raise UserError(f"--grad-checkpoint-every {every} is more than --syn-steps {config['syn_steps']}; lower it")
    if config.get("labels") == "frozen" and config.get("experts") is None \
            and config["label_expert"] >= config["num_experts"]:
        raise UserError(f"--label-expert {config['label_expert']} does not exist among --num-experts "
                        f"{config['num_experts']}; pick 0..{config['num_experts'] - 1}")
    if config.get("lr_guard") == "clamp" and config["lr_min"] >= config["lr_max"]:
        raise UserError(f"--lr-min {config['lr_min']:g} must be below --lr-max {config['lr_max']:g}")
    if config.get("lr_guard") == "clamp" and not config["lr_min"] <= config["lr_teacher"] <= config["lr_max"]:
        raise UserError(f"--lr-teacher {config['lr_teacher']:g} is outside [--lr-min, --lr-max] = "
                        f"[{config['lr_min']:g}, {config['lr_max']:g}]; change one of them")


def check_cuda(flag: str, device: torch.device | str) -> None:
    """`flag on` (--fast, --eval-fast) replays captured CUDA graphs: refused on any other device."""
    if not _is_cuda(device):
        raise UserError(f"{flag} on replays captured CUDA graphs but the device is {device}; "
                        f"use --device cuda or {flag} off")


def _is_cuda(device: torch.device | str) -> bool:
    """Whether `device` ("cuda", "cuda:1", a torch.device) is a CUDA device."""
    return str(device).split(":")[0] == "cuda"


def check_fast(config: dict[str, Any], device: torch.device | str | None = None) -> None:
    """--fast on: MTT/TESLA only with --grad unrolled or tesla; it, --eval-fast on and --norm-kernel triton, once the
    device is known, only on CUDA (and the last only where Triton imports)."""
    if config.get("fast") == "on" and "grad" in config and config["grad"] not in ("unrolled", "tesla"):
        raise UserError(f"--fast on captures --grad unrolled or tesla, not --grad {config.get('grad')}; "
                        "use one of those or --fast off")
    for flag, key in (("--eval-fast", "eval_fast"), ("--fast", "fast")):
        if config.get(key) == "on" and device is not None:
            check_cuda(flag, device)
    if config.get("norm_kernel") == "triton" and device is not None:
        from .models.instancenorm import triton_missing
        if not _is_cuda(device):
            raise UserError(f"--norm-kernel triton runs a CUDA kernel but the device is {device}; "
                            "use --device cuda or --norm-kernel torch")
        missing = triton_missing()
        if missing:
            raise UserError(f"--norm-kernel triton needs Triton, but {missing}; pip install triton or use "
                            "--norm-kernel torch")


def _check_ratbptt(config: dict[str, Any], facts: DataFacts) -> None:
    """RaT-BPTT: the window must fit in the horizon; inner batches and boost blocks must fit in the set."""
    horizon, window, min_start = config["horizon"], config["window"], config["min_start"]
    if window > horizon:
        raise UserError(f"--window {window} must be at most --horizon {horizon}; lower --window or raise --horizon")
    if min_start > horizon - window:
        raise UserError(f"--min-start {min_start} must be at most horizon - window = {horizon - window}; "
                        "lower --min-start or raise --horizon")
    nc = config.get("task_sampler_nc")
    if nc is not None and nc > facts.num_classes:
        raise UserError(f"--task-sampler-nc {nc} is more than the {facts.num_classes} classes of {facts.name}")
    blocks = config.get("boost_blocks")
    if blocks:
        try:
            sizes = [int(b) for b in str(blocks).split(",")]
        except ValueError:
            raise UserError(f"--boost-blocks '{blocks}' is not a comma-separated list of integers, e.g. 1,1,2") \
                from None
        if min(sizes) < 1 or sum(sizes) != config["ipc"]:
            raise UserError(f"--boost-blocks {blocks} must be positive sizes adding up to --ipc {config['ipc']}")
