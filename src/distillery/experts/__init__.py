"""Expert trajectories for MTT and TESLA (SPEC §4.1): `train` trains them, `store` stores, checks and reads them,
`config` declares the options that choose them."""

from .config import EXPERTS_COMMAND_ALIASES, ExpertConfig
from .store import (MANIFEST, ExpertStore, finished_experts, limit_experts, new_manifest, read_manifest, store_recipe,
                    write_expert, write_manifest)
from .train import duration, epoch_lr, expert_seed, split_accuracy, time_expert_epoch, train_experts

__all__ = ["EXPERTS_COMMAND_ALIASES", "MANIFEST", "ExpertConfig", "ExpertStore", "duration", "epoch_lr",
           "expert_seed", "finished_experts", "limit_experts", "new_manifest", "read_manifest", "split_accuracy",
           "store_recipe", "time_expert_epoch", "train_experts", "write_expert", "write_manifest"]
