"""Declared ranges of the options the commands share (`baseline`, `evaluate`, `experts`, `show`, ...).

`distill`'s own options are declared beside their config fields (methods/, run.py, distill.py) and checked with the
resolved configuration; these are checked on the parsed arguments of every command before anything is read.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .options import check_values, option


@dataclass
class CommandOptions:
    """One field per shared flag; None (not given) always passes."""

    ipc: int | None = option(None, low=1, help="images per class")
    runs: int | None = option(None, low=1, help="networks trained from scratch")
    epochs: int | None = option(None, low=1, help="training epochs")
    lr: float | None = option(None, low=0, low_open=True, help="learning rate")
    val_fraction: float | None = option(None, low=0, high=1, high_open=True,
                                        help="share of the training split held out for validation/selection")
    resolution: int | None = option(None, low=1, help="imagefolder: side to resize to")
    threads: int | None = option(None, low=1, help="CPU threads for PyTorch")
    seed: int | None = option(None, low=0, help="seed for every random draw")
    num_experts: int | None = option(None, low=1, help="expert trajectories to train")
    batch: int | None = option(None, low=1, help="minibatch size")
    max_per_class: int | None = option(None, low=1, help="images per class column")


def check_command_args(args: argparse.Namespace) -> None:
    """UserError naming the first shared flag whose value is out of its declared range."""
    check_values(CommandOptions, vars(args))
