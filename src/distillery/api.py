"""The Python API: what the command line does, from a notebook or a script.

    from distillery.api import SyntheticSet, distill, evaluate_set, load_dataset

`distill(method, out, preset=None, **options)` runs `distillery distill` (options are its flags with underscores:
`iterations=20`, `eval_every=10`, `threads=1`) and returns what result.json holds; the other names are the library's
own functions, handed on unchanged: `load_dataset` (data), `evaluate_set` and `random_real_baseline` (the shared
evaluation protocol), `SyntheticSet.load` (a distilled set), `export_set` / `import_set` / `import_experts`
(other codes' formats) and `write_report` (the HTML report).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .data import load_dataset
from .errors import UserError
from .evaluate import evaluate_set, random_real_baseline
from .export import export_set
from .imports import import_experts, import_set
from .report import write_report
from .synset import SyntheticSet

__all__ = ["SyntheticSet", "distill", "evaluate_set", "export_set", "import_experts", "import_set", "load_dataset",
           "random_real_baseline", "write_report"]


def distill(method: str, out: str | Path, preset: str | None = None, **options: Any) -> dict[str, Any]:
    """Distil like `distillery distill --method METHOD --out OUT [--preset P] --flag value ...`; returns result.json."""
    from .cli import build_parser
    from .distill import distill_from_args

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    distill_parser = commands.choices["distill"]
    actions = {a.dest: a for a in distill_parser._actions}
    argv = ["distill", "--method", method, "--out", str(out)] + (["--preset", preset] if preset else [])
    for key, value in options.items():
        action = actions.get(key)
        if action is None or key in ("method", "out", "preset", "help"):
            raise UserError(f"distill() has no option {key!r}; the options are `distillery distill -h`'s flags "
                            "with underscores, e.g. iterations=20")
        if isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[0]] if value else []
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        raise UserError(f"distill() options were refused (see the message above): {' '.join(argv[1:])}") from None
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    from .hostmem import keep_freed_memory

    keep_freed_memory()  # as the command line does
    return distill_from_args(args)
