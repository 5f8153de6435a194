"""The `distillery` command line: datasets, baselines, experts, distillation, evaluation, display."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
