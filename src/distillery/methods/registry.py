"""Distillation methods by name: `@register_method("name")` on a `Method` subclass, like the model registry.

A method is one file in `methods/`: its config dataclass (extending `MethodConfig`, the options every method shares)
and a `Method` subclass that owns everything method-specific, from the data-derived defaults and the up-front config
checks to the run-time hooks of the shared loop (`distillery.run`), and its named presets (`register_presets`).
Every optional hook has a default here, so the loop and `distill` call them on any method without asking whether it
has one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..errors import UserError
from ..run.health import DEFAULT_FIX
from ..config.options import option
from ..sets.synset import SyntheticSet

if TYPE_CHECKING:
    from ..config.defaults import DataFacts

_REGISTRY: dict[str, type[Method]] = {}
_PRESETS: dict[str, dict[str, Any]] = {}


@dataclass
class MethodConfig:
    """The options every method shares; a method's config dataclass extends it with its own."""

    ipc: int = option(1, low=1, help="images per class")
    model: str | None = option(None, help="distillation model (default: the dataset's ConvNet)")
    pix_init: str = option("auto", choices=("auto", "real", "noise"),
                           help="initial images: real train images | noise | auto (the method's own choice: real, "
                                "but RaT-BPTT's noise on ZCA data)")
    seed: int = option(0, low=0, help="seed of every random draw")


class Method:
    """A distillation method: config-time class methods for `distill`, and the object the shared loop drives.

    Subclasses set `config_class` and implement `step`, `synset`, `state_dict`, `load_state_dict` (and build their
    object in `__init__` or `build`); every other hook has a default suitable for a method without the feature."""

    name: ClassVar[str] = ""                       # set by `register_method`
    config_class: ClassVar[type] = MethodConfig
    option_classes: ClassVar[tuple[type, ...]] = ()   # further option groups the method reads (MTT: its experts)
    fixed: ClassVar[dict[str, Any]] = {}             # config values this name implies (TESLA: grad tesla)
    derived_keys: ClassVar[tuple[str, ...]] = ()     # the derived values `distill` prints beside ipc/zca/iterations
    divergence_fix: ClassVar[str] = "a lower learning rate"  # what to change after NaN/inf
    images: torch.Tensor

    # --- configuration (before any data is read) ---------------------------------------------------------------
    @classmethod
    def derive_defaults(cls, facts: DataFacts, ipc: int) -> dict[str, Any]:
        """Option values for data described by `facts` at `ipc` images per class (docs/DEFAULTS.md)."""
        return {"ipc": ipc, "model": None}

    @classmethod
    def check_config(cls, config: dict[str, Any], facts: DataFacts) -> None:
        """UserError for a combination of the method's options (or with the data's facts) that cannot work."""

    @classmethod
    def check_given(cls, flags: dict[str, Any], spell: Callable[[str], str], api: bool) -> None:
        """UserError for given flags (`api`: keywords; `spell` names them as given) that contradict each other, and
        the values a given flag implies added to `flags`, before they override the preset or derived values."""

    @classmethod
    def oom_advice(cls, config: dict[str, Any]) -> str:
        """The settings that lower this run's GPU memory, in the order to try them."""
        return "use fewer images per class (--ipc) or a smaller --model"

    @classmethod
    def host_memory(cls, config: dict[str, Any], spec) -> dict[str, float]:
        """Bytes one step of this run holds beyond the data, by what sets them (the flags in each key), for the
        up-front host-memory check of a CPU run; empty: no model of its memory (the run is not checked)."""
        return {}

    @classmethod
    def eval_cost(cls, config: dict[str, Any]) -> tuple[int, int]:
        """(protocols the final report scores a set of this method under, epochs each of its evaluation networks
        trains), for the projection of `--estimate`."""
        return 1, config["eval_epochs"] + 1

    @classmethod
    def preset_budget(cls, preset: dict[str, Any], published_train: int | None) -> str:
        """A preset's budget in the paper's units beside ours (`distillery presets`); `published_train`: the train
        split of the published run (None: not a published row)."""
        it = preset["iterations"]
        if published_train is None:
            return f"{it} outer iterations (ours; not a published row)"
        return (f"{it} outer iterations (published --Iteration {it}, the same unit; its loop runs {it} + 1 "
                f"times, SPEC P12)")

    @classmethod
    def start_ipc(cls, config: dict[str, Any]) -> int:
        """Images per class the run starts with (what an `--init-from` set must have)."""
        return int(config["ipc"])

    @classmethod
    def build(cls, config: dict[str, Any], dataset, device: torch.device, progress: bool = True,
              estimate: bool = False) -> Method:
        """The method object for the shared loop, from a resolved configuration and the loaded data (`estimate`:
        for `--estimate`, which must not start long preparations such as training experts)."""
        fields = dataclasses.fields(cls.config_class)
        return cls(dataset, cls.config_class(**{f.name: config[f.name] for f in fields}))

    def __init__(self, dataset, cfg) -> None:
        self.ds, self.cfg = dataset, cfg

    # --- the shared loop ---------------------------------------------------------------------------------------
    def step(self, it: int) -> dict[str, float]:
        """One outer iteration; returns the scalars to log."""
        raise NotImplementedError

    def synset(self) -> SyntheticSet:
        """The current distilled set."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output."""
        raise NotImplementedError

    def budget(self, config: dict[str, Any]) -> tuple[int, str | None]:
        """Outer iterations to run and, where they come from another unit, a line saying how."""
        return config["iterations"], None

    @property
    def health_fix(self) -> str:
        """What to change when the run loop finds this run dead (run/health.py)."""
        return DEFAULT_FIX

    @property
    def wants_eval_train_loss(self) -> bool:
        """Whether validation evaluations must also report the networks' loss on the real train split."""
        return False

    def observe_eval(self, it: int, train_loss: float | None) -> bool:
        """See the validation evaluation of iteration `it`; True ends the run there."""
        return False

    def initial_images(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The starting images and their class ids, class-blocked (`pix_init`: noise, else random real images)."""
        spec, device = self.ds.spec, self.ds.train.x.device
        if self.cfg.pix_init != "noise":
            return self.ds.random_set(self.cfg.ipc, gen)
        hard = torch.arange(spec.num_classes, device=device).repeat_interleave(self.cfg.ipc)
        return torch.randn((len(hard), spec.channels, *spec.im_size), generator=gen, device=device), hard

    def stop_message(self, it: int) -> str:
        """The line the loop prints when `observe_eval` ended the run at iteration `it`."""
        return f"the method ended the run at iteration {it}"

    def init_from(self, s: SyntheticSet) -> None:
        """Start from a saved set (`--init-from`): its images replace `self.images`."""
        if tuple(s.images.shape) != tuple(self.images.shape):
            raise UserError(f"--init-from set has images {tuple(s.images.shape)}, this run needs "
                            f"{tuple(self.images.shape)}; use a set of the same dataset and ipc")
        with torch.no_grad():
            self.images.copy_(s.images.to(self.images.device))


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Decorator: register a `Method` subclass under `name` (the `--method` value)."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def register_presets(presets: dict[str, dict[str, Any]]) -> None:
    """Register named presets (`--preset NAME`): each a flat dict of option values with its `method`, named
    'METHOD/...'; a method's file registers its own."""
    _PRESETS.update(presets)


def registered_presets() -> dict[str, dict[str, Any]]:
    """Every registered preset by name, the methods in `list_methods` order, each method's in registration order."""
    return {name: p for method in list_methods() for name, p in _PRESETS.items() if p["method"] == method}


def list_methods() -> list[str]:
    """Registered method names, sorted (registration order follows the import chain)."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method registered as `name`; unknown names get a UserError listing them."""
    if name not in _REGISTRY:
        raise UserError(f"unknown method '{name}'; use --method with one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]
