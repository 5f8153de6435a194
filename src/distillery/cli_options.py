"""Declared ranges of the options the commands share (`baseline`, `evaluate`, `experts`, `show`, ...).

`distill`'s own options are declared beside their config fields (methods/, run.py, distill.py) and checked with the
resolved configuration; these are checked on the parsed arguments of every command before anything is read.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .options import check_value, option, option_meta


@dataclass
class CommandOptions:
    """One field per shared flag; None (not given) always passes, and `none` is not a value these flags take."""

    ipc: int | None = option(None, none_unset=True, low=1, help="images per class")
    runs: int | None = option(None, none_unset=True, low=1, help="networks trained from scratch")
    epochs: int | None = option(None, none_unset=True, low=1, help="training epochs")
    lr: float | None = option(None, none_unset=True, low=0, low_open=True, help="learning rate")
    val_fraction: float | None = option(None, none_unset=True, low=0, high=1, high_open=True,
                                        help="share of the training split held out for validation/selection")
    resolution: int | None = option(None, none_unset=True, low=1, help="imagefolder: side to resize to")
    threads: int | None = option(None, none_unset=True, low=1, help="CPU threads for PyTorch")
    seed: int | None = option(None, none_unset=True, low=0, help="seed for every random draw")
    num_experts: int | None = option(None, none_unset=True, low=1, help="expert trajectories to train")
    batch: int | None = option(None, none_unset=True, low=1, help="minibatch size")
    max_per_class: int | None = option(None, none_unset=True, low=1, help="images per class column")


def check_command_args(args: argparse.Namespace) -> None:
    """UserError naming the first shared flag whose value is out of its declared range; `distill`'s flags are checked
    against its own declarations (where `--epochs` or `--resolution` also take `none`)."""
    metas = option_meta(CommandOptions)
    if getattr(args, "command", None) == "distill":
        from .distill import config_classes

        for cls in config_classes(args.method):
            metas.update({name: meta for name, meta in option_meta(cls).items() if name in metas})
    for name, meta in metas.items():
        if getattr(args, name, None) is not None:  # None: not given
            check_value(name, getattr(args, name), meta)
