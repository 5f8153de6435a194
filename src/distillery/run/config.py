"""The loop's options: how long a run goes and how it is evaluated along the way."""

from __future__ import annotations

from dataclasses import dataclass

from ..evaluation.protocol import DEFAULT_EVAL_EPOCHS
from ..config.options import option


@dataclass
class LoopConfig:
    """How long to run and how to evaluate along the way."""

    iterations: int = option(1000, low=1, resumable=True, help="outer iterations")
    eval_every: int = option(100, low=1, resumable=True,
                             help="evaluate on the validation split every this many iterations")
    eval_runs: int = option(3, low=1, resumable=True, help="networks trained per validation evaluation")
    eval_epochs: int = option(DEFAULT_EVAL_EPOCHS, low=1, resumable=True,
                              help="training epochs of every evaluation network")
    eval_model: str | None = option(None, help="evaluation model (default: the distillation model)")
    eval_models: str | None = option(None, resumable=True,
                                     help="models of the final cross-architecture table of the best set, e.g. "
                                          "ConvNet,AlexNet,VGG11,ResNet18_AP,ResNet18")
    final_eval_runs: int = option(5, low=1, resumable=True, help="networks trained per final test evaluation")
    checkpoint_every: int = option(10, low=1, resumable=True, help="write a checkpoint every this many iterations")
    time_budget: float | None = option(None, low=0, low_open=True, resumable=True,
                                       help="seconds of distillation steps (evaluations not counted) after which the "
                                            "run ends at the next iteration, evaluated and reported as at --iterations")
    eval_overlap: str = option("auto", choices=("auto", "off"), resumable=True,
                               help="auto: on the CPU with 2+ threads, validation evaluations run in the background "
                                    "while distillation goes on (the threads split in half); off: wait for each")
    eval_fast: str = option("off", choices=("off", "on"), resumable=True,
                            help="on (CUDA): train the evaluation networks from captured CUDA graphs (models without "
                                 "BatchNorm; the others train as usual); same numbers up to float rounding")
    health: str = option("stop", choices=("stop", "warn", "off"),
                         help="a dead run (alpha pinned, student still, val below the initial set): stop | warn | off")
    seed: int = option(0, low=0, help="seed of every random draw")
