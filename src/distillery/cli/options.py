"""The options of every command but `distill`'s own, declared once, and the one helper that turns declarations into
argparse arguments (`add_options`, used for `distill`'s generated flags too).

Each field of `CommandOptions` is one option with its type, range, default and help; `COMMANDS` says which of them
each command takes (with a different default, help or requiredness where a command needs one). The parsed values
are checked against the same declarations before anything is read (`check_command_args`); the Python API checks
its keywords against them too (`api.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from ..config.defaults import MIN_RESOLUTION
from ..evaluation.protocol import DEFAULT_EVAL_EPOCHS
from ..config.options import base_type, check_values, describe, flag, option, option_meta

ZCA_CHOICES = ("kornia", "kip", "none")


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask where the OS has one): the most --threads can use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class DataConfig:
    """How a dataset is read: `distill` records these in its configuration, the other commands take them too."""

    val_fraction: float = option(0.1, low=0, high=1, high_open=True,
                                 help="share of the training split held out for validation/selection")
    resolution: int | None = option(None, low=MIN_RESOLUTION, help="imagefolder: side to resize to (default: the "
                                                                   "images' own, at most 64)")


@dataclass
class CommandOptions(DataConfig):
    """One field per option of the commands other than `distill`'s generated ones."""

    # where the data are and how they are read
    dataset: str | None = option(None, help="dataset name (`distillery datasets` lists them)")
    zca: str | None = option(None, choices=ZCA_CHOICES,
                             help="ZCA whitening: kornia (MTT/TESLA), kip (RaT-BPTT) or none")
    data_dir: str | None = option(None, help="where dataset files are (default: $DISTILLERY_DATA, ./data)")
    # how every command runs
    device: str = option("auto", help="auto | cpu | cuda | cuda:N")
    seed: int = option(0, low=0, help="seed for every random draw")
    threads: int | None = option(None, none_unset=True, low=1, high=cpu_count(),
                                 help="CPU threads for PyTorch, at most the cores available (default: PyTorch's "
                                      "choice; 1 is fastest on a busy machine)")
    no_progress: bool = option(False, switch=True, help="hide progress bars")
    json: bool = option(False, switch=True, help="print the numbers as one JSON object as the last line")
    quiet: bool = option(False, switch=True, help="print only that JSON object (no other output, no bars)")
    # evaluation and training
    ipc: int | None = option(None, none_unset=True, low=1, help="images per class")
    model: str | None = option(None, help="evaluation model (default: a set's distillation model; baselines: the "
                                          "dataset's ConvNet)")
    runs: int | None = option(None, none_unset=True, low=1, help="networks trained from scratch (default 5; "
                                                                 "baseline full: 1)")
    eval_epochs: int | None = option(None, none_unset=True, low=1,
                                     help=f"training epochs of every evaluation network (default {DEFAULT_EVAL_EPOCHS}; "
                                          "baseline full: 30)")
    lr: float | None = option(None, none_unset=True, low=0, low_open=True,
                              help="learning rate (default: the set's learned lr, else 0.01)")
    batch: int = option(256, low=1, help="minibatch size")
    eval_fast: str = option("off", choices=("off", "on"),
                            help="on (CUDA): train the networks from captured CUDA graphs (models without BatchNorm)")
    fast: str = option("off", choices=("off", "on"), help="on (CUDA): every minibatch step replays a captured CUDA "
                                                          "graph (same numbers up to rounding)")
    split: str = option("test", choices=("test", "val"), help="the split the networks are scored on")
    protocol: str | None = option(None, choices=("dsa", "rat"),
                                  help="dsa: MTT/TESLA's evaluate_synset (SGD, DSA, --eval-epochs, --lr); rat: "
                                       "RaT-BPTT's test() (inner optimiser, flip_rotate, 300/600/1000/3000 steps "
                                       "chosen on validation). Default: the protocol the set records, with every "
                                       "setting it records (model, epochs, lr, runs, seed, ...); each flag "
                                       "overrides one of them")
    eval_models: str | None = option(None, help="the cross-architecture table: one row per model, e.g. ConvNet,"
                                                "AlexNet,VGG11,ResNet18_AP,ResNet18 (default: --model, else the "
                                                "set's distillation model)")
    # what a command reads and writes
    kind: str = option("random", positional=True, choices=("random", "full"),
                       help="random: IPC random real images per class; full: the whole training split")
    name: str = option("", positional=True, help="mnist | fashion-mnist | cifar10 | cifar100 | svhn | tiny-imagenet")
    set: str = option("", positional=True, help="a .safetensors distilled set")
    run_dir: str = option("", positional=True, help="a run directory of `distillery distill`")
    file: str = option("", positional=True, help="images_*.pt (labels_*.pt, lr_*.pt beside it are read too) or a .h5")
    dir: str = option("", positional=True, help="the folder holding replay_buffer_0.pt, replay_buffer_1.pt, ...")
    out: str | None = option(None, none_unset=True, help="where to write")
    max_per_class: int = option(10, low=1, aliases=("--per-class",), help="images of each class shown, K")
    scale: int | None = option(None, none_unset=True, low=1,
                               help="pixels per image pixel (default: small images are scaled up to at least 64 px)")
    method: str | None = option(None, help="a distillation method")
    format: str = option("pt", choices=("pt", "imagefolder", "eccv2024"), help="pt tensors, an image folder or an "
                                                                              "ECCV-2024 submission")
    tag: str = option("best", help="pt: file names images_TAG.pt, labels_TAG.pt, lr_TAG.pt")
    replace: bool = option(False, switch=True, help="replace a non-empty --out whole (its old files go)")
    baseline: bool = option(False, switch=True, help="first measure the random-real baseline under the run's final "
                                                     "protocol (trains networks)")


_RUNNING = ["device", "seed", "no_progress", "threads"]
_EVAL = ["model", "runs", "eval_epochs", "lr", "eval_fast"]
_DATA = ["dataset", "zca", "val_fraction", "resolution", "data_dir"]


@dataclass(frozen=True)
class Command:
    """A command: its one-line help, the names of the `CommandOptions` fields it takes, and what differs from the
    declaration for it."""

    help: str
    names: tuple[str, ...]
    required: frozenset[str] = frozenset()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    helps: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _command(help: str, names: Iterable[str], required: Iterable[str] = (),
             defaults: Mapping[str, Any] | None = None, helps: Mapping[str, str] | None = None) -> Command:
    return Command(help, tuple(names), frozenset(required), defaults or {}, helps or {})


# The commands whose options are all `CommandOptions` fields; `distill` and `experts` add their config classes'.
COMMANDS: dict[str, Command] = {
    "datasets": _command("list datasets, where they are and how to get them", ["data_dir"]),
    "download": _command("download a standard dataset (checksums verified)", ["name", "data_dir"]),
    "baseline": _command("random-real or full-data baseline",
                         ["kind", *_DATA, "ipc", *_EVAL, *_RUNNING, "json", "quiet"],
                         helps={"ipc": "images per class (random)"}),
    "evaluate": _command("train fresh networks on a distilled set, report test accuracy",
                         ["set", "ipc", "dataset", "val_fraction", "split", "protocol", "eval_models", *_EVAL,
                          "data_dir", *_RUNNING, "json", "quiet"],
                         defaults={"val_fraction": None, "seed": None},  # not given: what the set records
                         helps={"ipc": "evaluate only the first K images per class (boosted sets)",
                                "dataset": "override the dataset stored in the set",
                                "val_fraction": "validation share of the training files (default: the one the set "
                                                "records, else 0.1)",
                                "seed": "seed of the networks' draws (default: the one the set records)"}),
    "show": _command("write a PNG grid of a distilled set",
                     ["set", "out", "max_per_class", "scale"], required=["out"], helps={"out": "PNG file to write"}),
    "presets": _command("list named hyperparameter presets", ["method"]),
    "experts": _command("train expert trajectories (MTT/TESLA)",
                        [*_DATA, "model", "batch", "fast", "out", *_RUNNING], required=["out"],
                        helps={"out": "directory for the expert store",
                               "model": "model to train (default: the dataset's ConvNet)"}),
    "distill": _command("distil a dataset with one of the --method methods",
                        ["device", "no_progress", "threads", "data_dir", "json", "quiet"]),  # --seed: a config key
    "report": _command("write a self-contained HTML report of a run directory",
                       ["run_dir", "out", "baseline", "data_dir", "device"],
                       helps={"out": "HTML file to write (default RUN_DIR/report.html)"}),
    "export": _command("write a set as pt tensors, an image folder or an ECCV-2024 submission",
                       ["set", "format", "out", "replace", "tag"], required=["format", "out"],
                       helps={"out": "directory to write into (new or empty, unless --replace)"}),
    "import-set": _command("convert a published images_*.pt or RaT-BPTT .h5 into a distillery set",
                           ["file", "dataset", "zca", "lr", "val_fraction", "data_dir", "out"],
                           required=["dataset", "out"], defaults={"zca": "none"},
                           helps={"zca": "the space the file's images are in: kornia ZCA (MTT/TESLA/DATM --zca), kip "
                                         "ZCA (RaT-BPTT --zca) or none (mean/std normalised)",
                                  "lr": "the set's training lr (default: lr_*.pt if present)",
                                  "out": ".safetensors file to write"}),
    "import-experts": _command("convert MTT replay_buffer_*.pt files into an expert store",
                               ["dir", "dataset", "model", "zca", "lr", "batch", "val_fraction", "data_dir", "out"],
                               required=["dataset", "model", "out"], defaults={"zca": "none", "lr": 0.01},
                               helps={"model": "the model the buffer was trained with (its layout is checked)",
                                      "zca": "the preprocessing the experts were trained in (MTT: kornia with --zca)",
                                      "lr": "the experts' training lr, recorded (MTT default 0.01)",
                                      "batch": "their batch size, recorded (MTT default 256)",
                                      "out": "directory for the expert store"}),
}


# --- declarations -> argparse --------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are the one `error: ...` line every other bad input gets (exit 2), naming close
    matches of an unknown flag, instead of a usage block.

    `flags` maps each option's name to its spellings (`-h`/`--help`, then what `add_options` adds from the
    declarations): the close matches, and the spelling a user typed, are looked up there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flags: dict[str, list[str]] = {"help": ["-h", "--help"]} if self.add_help else {}

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments: "):
            known = [s for spellings in self.flags.values() for s in spellings]
            unknown = message.split(": ", 1)[1].split()[0].split("=")[0]
            close = difflib.get_close_matches(unknown, known, n=2, cutoff=0.7)
            message += f"; did you mean {' or '.join(close)}?" if close else ""
        self.exit(2, f"error: {self.prog}: {message} (`{self.prog} -h` lists the options)\n")


def parse_bool(text: str) -> bool:
    """true/false (also 1/0, yes/no, on/off) for boolean options."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: expected true/false/on/off (or 1/0, yes/no)")


def _number(kind: type) -> Callable[[str], Any]:
    """argparse type for int/float options whose error says which kind of number was expected."""
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if kind is int else ''} {kind.__name__}") \
                from None

    return parse


def arg_type(annotation: str, none_typed: bool = True) -> Callable[[str], Any]:
    """argparse type for a dataclass field from its (string) annotation; 'none' gives None for optional fields
    that take it as a value (`none_typed`; else None only means "not given")."""
    kind = base_type(annotation)
    base = parse_bool if kind is bool else _number(kind) if kind in (int, float) else str
    if "None" not in annotation or not none_typed:
        return base

    def optional(text: str) -> Any:
        return None if text.lower() == "none" else base(text)

    return optional


def option_help(f: dataclasses.Field, default: Any = None, text: str | None = None, required: bool = False) -> str:
    """--help text of a declared option: its help, its default (unless required, or None where the help already
    says what not giving it does) and its range (% escaped for argparse)."""
    meta = {**f.metadata["option"], "type": str(f.type)}
    words = meta["help"] if text is None else text
    unsaid = default is None and ("default" in words or not meta["none_typed"])  # None: "not given"
    parts = [] if meta["switch"] or meta["positional"] or required or unsaid else [f"default {default}"]
    parts += [] if meta["switch"] or describe(meta).startswith("any value") else [describe(meta)]
    return (f"{words} ({'; '.join(parts)})" if parts else words).replace("%", "%%")


def add_options(parser: OneLineParser, cls: type, names: Iterable[str] | None = None, *, group: str | None = None,
                unset: bool = False, required: Iterable[str] = (), defaults: Mapping[str, Any] | None = None,
                helps: Mapping[str, str] | None = None, aliases: Mapping[str, Iterable[str]] | None = None,
                choices: Mapping[str, Iterable[str]] | None = None) -> None:
    """Add the `option(...)` fields `names` (default: all) of dataclass `cls` to `parser` (under the heading
    `group` where given), recording their spellings in `parser.flags`.

    `unset`: a flag not given is absent from the parsed namespace (so a preset or a derived default can fill it);
    else it gets its declared default, or this command's entry in `defaults`. Boolean options take true/false and
    also stand alone (`--expert-decay` = true); switches are store_true. `aliases` adds command-specific spellings;
    `choices` gives argparse choices fixed only at run time (the registered methods)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if "option" in f.metadata}
    defaults, helps, aliases, choices = defaults or {}, helps or {}, aliases or {}, choices or {}
    required = set(required)
    target = parser.add_argument_group(group) if group is not None else parser
    for name in fields if names is None else names:
        f = fields[name]
        meta = f.metadata["option"]
        default = defaults.get(name, f.default)
        kw: dict[str, Any] = {"help": option_help(f, default, helps.get(name), name in required)}
        if unset:
            kw["default"] = argparse.SUPPRESS
        elif not meta["positional"]:
            kw["default"] = default
        if name in choices:
            kw["choices"] = list(choices[name])
        if meta["positional"]:
            target.add_argument(name, type=arg_type(str(f.type), meta["none_typed"]),
                                **{k: v for k, v in kw.items() if k != "default"})
            continue
        spellings = [flag(name), *meta["aliases"], *aliases.get(name, ())]
        parser.flags.setdefault(name, []).extend(spellings)
        if meta["switch"]:
            target.add_argument(*spellings, dest=name, action="store_true", **kw)
            continue
        if base_type(str(f.type)) is bool:
            kw.update(nargs="?", const=True, metavar="true|false")
        target.add_argument(*spellings, dest=name, type=arg_type(str(f.type), meta["none_typed"]),
                            required=name in required, **kw)


def add_command(parser: OneLineParser, command: str, **extra: Any) -> None:
    """The `CommandOptions` fields `command` takes, with its own defaults, help and requiredness."""
    spec = COMMANDS[command]
    add_options(parser, CommandOptions, spec.names, required=spec.required, defaults=spec.defaults, helps=spec.helps,
                **extra)


def check_command_args(args: argparse.Namespace, more: Iterable[type] = (),
                       typed: Mapping[str, str] | None = None) -> None:
    """UserError naming the first option whose value is not of its declared type or outside its declared range
    (`CommandOptions`, and the classes `more` the command also takes options from), spelled as in `typed` (an
    alias the user typed) where given; `distill`'s configuration options are checked with its resolved
    configuration."""
    command = getattr(args, "command", None)
    unset = {k for k, v in COMMANDS[command].defaults.items() if v is None} if command in COMMANDS else set()
    values = {k: v for k, v in vars(args).items() if not (v is None and k in unset)}  # None: not given
    if command == "distill":
        values = {k: v for k, v in values.items() if k in COMMANDS["distill"].names}
    metas = option_meta(CommandOptions)
    typed = typed or {}
    check_values(CommandOptions, values, lambda n: n if metas[n]["positional"] else typed.get(n, flag(n)))
    for cls in more:
        check_values(cls, values, lambda n: typed.get(n, flag(n)))
