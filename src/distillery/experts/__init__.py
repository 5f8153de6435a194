"""Expert trajectories for MTT and TESLA (SPEC §4.1): `train` trains them, `store` stores, checks and reads them,
`config` declares the options that choose them."""

from .config import EXPERTS_COMMAND_ALIASES, ExpertConfig
from .store import (FORMAT, FORMAT_VERSION, MANIFEST, ExpertStore, finished_experts, limit_experts, param_layout,
                    read_manifest, store_recipe)
from .train import duration, epoch_lr, expert_seed, split_accuracy, time_expert_epoch, train_experts

__all__ = ["EXPERTS_COMMAND_ALIASES", "FORMAT", "FORMAT_VERSION", "MANIFEST", "ExpertConfig", "ExpertStore",
           "duration", "epoch_lr", "expert_seed", "finished_experts", "limit_experts", "param_layout", "read_manifest",
           "split_accuracy", "store_recipe", "time_expert_epoch", "train_experts"]
