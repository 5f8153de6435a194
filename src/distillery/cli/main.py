"""Entry point of the `distillery` command line: the parser built from the declarations, checks, dispatch, and
what an interrupt leaves behind.

Every command prints one clear `error: ...` line (exit 2) on bad input instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any, Callable

from ..errors import UserError
from . import commands
from .options import COMMANDS, OneLineParser, add_command, add_options, check_command_args

_FUNCS = {"datasets": commands.cmd_datasets, "download": commands.cmd_download, "baseline": commands.cmd_baseline,
          "evaluate": commands.cmd_evaluate, "show": commands.cmd_show, "presets": commands.cmd_presets,
          "experts": commands.cmd_experts, "distill": commands.cmd_distill, "report": commands.cmd_report,
          "export": commands.cmd_export, "import-set": commands.cmd_import_set,
          "import-experts": commands.cmd_import_experts}


def build_parser() -> OneLineParser:
    """The argparse tree of every subcommand, built from the declarations (`options.COMMANDS`, and for
    `distill` and `experts` the configuration classes)."""
    from ..distill import add_distill_args
    from ..experts import EXPERTS_COMMAND_ALIASES, ExpertConfig
    from ..methods import list_methods

    parser = OneLineParser(prog="distillery", description=f"Dataset distillation: {', '.join(list_methods())}.")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # {command: its parser}
    for command, spec in COMMANDS.items():
        p = sub.add_parser(command, help=spec.help)
        if command == "distill":
            add_distill_args(p)
        add_command(p, command, choices={"method": list_methods()} if command == "presets" else None)
        if command == "experts":
            add_options(p, ExpertConfig, EXPERTS_COMMAND_ALIASES, aliases=EXPERTS_COMMAND_ALIASES)
        p.set_defaults(func=_FUNCS[command])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distillery` console script."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's own parser, which names its close matches
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # a refused command line (its one error line is printed); --help exits as usual
        if e.code == 2:
            return 2
        raise
    try:  # declared ranges first: nothing is read or trained with a value that cannot work
        from ..experts import ExpertConfig

        given = sys.argv[1:] if argv is None else argv
        typed = {name: s for name, spellings in parser.commands[args.command].flags.items() for s in spellings
                 if s in given}  # name an option as the user spelled it
        check_command_args(args, [ExpertConfig] if args.command == "experts" else [], typed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "baseline" and args.runs is None:
        args.runs = 5 if args.kind == "random" else 1
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    from ..hostmem import keep_freed_memory

    keep_freed_memory()  # large tensors reuse freed memory instead of page-faulting fresh pages every step
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main_thread else None
    try:
        _print_result(args, args.func)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `distillery presets | head`: the reader has gone, so stop quietly as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (a scheduler's stop) through _on_sigterm
        terminated = isinstance(e, Terminated)
        print(f"{'terminated' if terminated else 'interrupted'}; {_continue_hint(args)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


def _print_result(args: argparse.Namespace, func: Callable[[argparse.Namespace], Any]) -> None:
    """Run a command; with --json/--quiet print what it returns as the last line (with --quiet, only that)."""
    import contextlib
    import io

    quiet, as_json = getattr(args, "quiet", False), getattr(args, "json", False)
    if quiet:
        args.no_progress = True
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        result = func(args)
    if (quiet or as_json) and result is not None:
        print(json.dumps(result, default=str), flush=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it stops exactly as on Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM handler: behave like SIGINT."""
    raise Terminated()


def _continue_hint(args: argparse.Namespace) -> str:
    """After an interrupt: what the interrupted command kept and how to go on (--resume, or run it again)."""
    if args.command == "distill" and args.estimate:
        return f"--estimate writes nothing, so there is no run in {args.out} to continue; run it again"
    if args.command == "distill":
        return f"continue the run in {args.out} from its last checkpoint with the same command and --resume"
    if args.command == "experts":
        return (f"finished experts and each expert's last finished epoch are kept in {args.out}; run the same "
                "command again to continue")
    if args.command == "download":
        return (f"files already verified are kept and the partial one was deleted; run `distillery download "
                f"{args.name}` again to finish")
    return f"`distillery {args.command}` keeps no partial results; run it again"
