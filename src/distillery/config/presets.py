"""Named presets: the lookup by name and the listing of the rows each method registers in its own file
(`methods.register_presets`: the published rows, SPEC §4.6, §5.4, §6.9, §10.5 and DATM's configs, plus small CPU
presets of our own).

A preset is a flat dict of option values; every value can be overridden on the command line. The published rows
are "best known", not canonical (SPEC P20); where the SPEC marks a value unverified the `note` says so.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..methods import get_method, registered_presets

PRESETS: dict[str, dict[str, Any]] = registered_presets()

# Training-split sizes of the published runs (the whole train split: the published codes hold out no validation).
_PUBLISHED_TRAIN = {"cifar10": 50000, "cifar100": 50000, "tiny-imagenet": 100000, "imagenet-1k": 1281167}


def budget(name: str) -> str:
    """Preset `name`'s budget in the paper's units beside ours (`distillery presets` prints it)."""
    p = PRESETS[name]
    return get_method(p["method"]).preset_budget(p, _PUBLISHED_TRAIN.get(p["dataset"]))


def get_preset(name: str) -> dict[str, Any]:
    """A copy of preset `name`; unknown names get a UserError listing them."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; `distillery presets` lists them (e.g. mtt/cifar10-ipc10)")
    return dict(PRESETS[name])


def list_presets(method: str | None = None) -> list[str]:
    """Preset names, optionally only those of one method."""
    return [n for n in PRESETS if method is None or n.startswith(method + "/")]


def preset_for(method: str, dataset: str, ipc: int) -> str | None:
    """The name of the first preset for exactly this method, (built-in) dataset and IPC, or None."""
    for name, p in PRESETS.items():
        if p["method"] == method and p.get("dataset") == dataset and p.get("ipc") == ipc:
            return name
    return None
