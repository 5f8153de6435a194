"""A registry of models by name with one constructor signature (timm style).

Every registered model also keeps the embedding contract: `model.embed(x)` returns the (N, D) features its last
linear layer classifies, and `forward(x)` is that layer applied to them; feature-matching methods read it.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import nn

from ..errors import UserError

Builder = Callable[[int, int, tuple[int, int]], nn.Module]
_REGISTRY: dict[str, Builder] = {}
_FAMILIES: dict[str, Callable[[str], Builder]] = {}  # name prefix -> parser of the family's names (ConvNetD4, ...)


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register `builder(channels, num_classes, im_size) -> nn.Module` under `name`."""

    def wrap(builder: Builder) -> Builder:
        _REGISTRY[name] = builder
        return builder

    return wrap


def register_family(prefix: str, parse: Callable[[str], Builder]) -> None:
    """Names starting with `prefix` that are not registered themselves are built by `parse(name)`."""
    _FAMILIES[prefix] = parse


def list_models() -> list[str]:
    """Registered names; any ConvNet name of the SPEC §1.1 grammar (ConvNetD4, ConvNetW64BN, ...) also works."""
    return sorted(_REGISTRY)


def create_model(name: str, channels: int, num_classes: int, im_size: tuple[int, int]) -> nn.Module:
    """Build the model `name` for images of `channels` x `im_size` and `num_classes` outputs."""
    im_size = (int(im_size[0]), int(im_size[1]))
    if name in _REGISTRY:
        return _REGISTRY[name](channels, num_classes, im_size)
    for prefix, parse in _FAMILIES.items():
        if name.startswith(prefix):
            return parse(name)(channels, num_classes, im_size)
    raise UserError(f"unknown model '{name}'; choose one of: {', '.join(list_models())} "
                    "(or a ConvNet variant such as ConvNetD4, ConvNetW64, ConvNetBN)")


_GLOBAL_RNG = threading.Lock()  # init_seeded borrows the process-wide CPU generator


def init_seeded(name: str, channels: int, num_classes: int, im_size: tuple[int, int], seed: int) -> nn.Module:
    """Build `name` with a deterministic random init from `seed`, leaving the caller's global RNG untouched.

    Thread-safe (evaluation runs build their networks side by side, `parallel.map_runs`): construction draws from
    the global CPU generator, so one build at a time."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        # Seed only the CPU generator (the one construction uses): torch.manual_seed would also reseed every
        # CUDA generator, which fork_rng(devices=[]) does not restore.
        torch.default_generator.manual_seed(seed)
        return create_model(name, channels, num_classes, im_size)


def has_batchnorm(module: nn.Module) -> bool:
    """True if the module keeps BatchNorm running statistics (they are not part of the flat parameters)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
