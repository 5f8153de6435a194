"""The expert options: what an MTT/TESLA run trains and caches, and the spellings `distillery experts` takes them in."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.options import option


@dataclass
class ExpertConfig:
    """The experts an MTT/TESLA run trains and caches when no --experts store is given."""

    num_experts: int = option(10, low=1, help="expert trajectories to train")
    expert_epochs_train: int = option(50, low=1, help="epochs of every expert (>= max_start_epoch - 1 + expert_epochs)")
    expert_lr: float = option(0.01, low=0, low_open=True, help="SGD learning rate of the experts")
    expert_momentum: float = option(0.0, low=0, high=1, high_open=True,
                                    help="SGD momentum of the experts (MTT buffer.py --mom; published 0)")
    expert_l2: float = option(0.0, low=0, help="SGD weight decay of the experts (buffer.py --l2; published 0)")
    expert_decay: bool = option(False, help="expert lr x0.1 once epoch E // 2 + 1 of E is done, momentum restarted "
                                            "(buffer.py --decay; published off)")
    # these two also apply to a given --experts store
    max_files: int | None = option(None, low=1, help="use only the first N groups of 10 experts by index (MTT "
                                                     "distill.py --max_files: files of 10 experts)")
    max_experts: int | None = option(None, low=1, help="use only the first N experts of each group of 10 (MTT "
                                                       "distill.py --max_experts, per file)")


# `distillery experts` takes these ExpertConfig options, also under further spellings (MTT buffer.py's and ours)
EXPERTS_COMMAND_ALIASES = {"num_experts": (), "expert_epochs_train": ("--train-epochs",), "expert_lr": ("--lr",),
                           "expert_momentum": ("--momentum", "--mom"), "expert_l2": ("--l2",),
                           "expert_decay": ("--decay",)}
