"""The `distillery` command line: datasets, baselines, experts, distillation, evaluation, display.

Every command prints one clear `error: ...` line (exit 2) on bad input instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from typing import Any

from .cli_options import check_command_args
from .errors import UserError

DEFAULT_EVAL_EPOCHS = 300


# --- shared option groups ---------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="where dataset files are (default: $DISTILLERY_DATA, ./data)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random draw (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: PyTorch's choice; 1 is fastest on a busy machine)")


def _add_data(p: argparse.ArgumentParser, zca_default: Any = None) -> None:
    p.add_argument("--dataset", default=None, help="dataset name (`distillery datasets` lists them)")
    p.add_argument("--zca", default=zca_default, choices=["kornia", "kip", "none"],
                   help="ZCA whitening: kornia (MTT/TESLA), kip (RaT-BPTT) or none")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training split held out for validation/selection (default 0.1)")
    p.add_argument("--resolution", type=int, default=None,
                   help="imagefolder: side to resize to (default: the images' own, at most 64, as distill)")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="evaluation model (default: a set's distillation model; baselines: the dataset's ConvNet)")
    p.add_argument("--runs", type=int, default=5, help="networks trained from scratch (default 5)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {DEFAULT_EVAL_EPOCHS})")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the set's learned lr, else 0.01)")
    p.add_argument("--eval-fast", default="off", choices=["off", "on"],
                   help="on (CUDA): train the networks from captured CUDA graphs (models without BatchNorm)")


def _fast(args: argparse.Namespace) -> bool:
    """--eval-fast on, refused before any data is read where the device is not CUDA."""
    from .device import resolve_device
    from .validate import check_cuda

    if args.eval_fast == "on":
        check_cuda("--eval-fast", resolve_device(args.device))
    return args.eval_fast == "on"


def _load(args: argparse.Namespace, dataset: str | None = None, zca: str | None = None):
    from .data import load_dataset
    from .device import resolve_device

    name = dataset or args.dataset
    if not name:
        raise UserError("no dataset given; pass --dataset NAME (see `distillery datasets`)")
    zca = None if zca in (None, "none") else zca
    resolution = getattr(args, "resolution", None)
    if resolution is None and name.startswith("imagefolder:"):  # the resolution rule of distill (docs/DEFAULTS.md)
        from .defaults import data_facts

        resolution = data_facts(name, args.val_fraction).resolution
    return load_dataset(name, data_dir=args.data_dir, device=resolve_device(args.device), zca=zca,
                        val_fraction=args.val_fraction, seed=0, resolution=resolution)


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress


def _add_output(p: argparse.ArgumentParser) -> None:
    """--json / --quiet: the numbers as one JSON object on the last line of stdout (alone with --quiet)."""
    p.add_argument("--json", action="store_true", help="print the numbers as one JSON object as the last line")
    p.add_argument("--quiet", action="store_true", help="print only that JSON object (no other output, no bars)")


def _numbers(res) -> dict[str, Any]:
    """An EvalResult as JSON-able numbers (accuracies are fractions)."""
    return {"model": res.model, "epochs": res.epochs, "lr": res.lr, "split": res.split, "runs": len(res.accs),
            "mean": res.mean, "std": res.std, "accs": list(res.accs)}


def _print_result(args: argparse.Namespace, func) -> None:
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


# --- commands ---------------------------------------------------------------------------------------------------
def cmd_datasets(args: argparse.Namespace) -> None:
    """What is available locally, where, and how to get the rest."""
    from .data import dataset_status

    rows = dataset_status(args.data_dir)
    width = max(len(r.name) for r in rows)
    for r in rows:
        state = "available" if r.available else "missing  "
        print(f"{r.name:<{width}}  {state}  {r.location if r.available else r.how_to_get}")
    print("your own images: --dataset imagefolder:PATH (PATH/train/<class>/*, PATH/test/<class>/*)")


def cmd_download(args: argparse.Namespace) -> None:
    """Download a standard dataset from its canonical address (checksums verified)."""
    from .data import data_root
    from .data.download import fetch_dataset
    from .io import ensure_dir

    path = fetch_dataset(args.name, ensure_dir(data_root(args.data_dir), "--data-dir"))
    print(f"{args.name} is in {path}")


def cmd_baseline(args: argparse.Namespace) -> None:
    """Random-real or full-data baseline with the shared evaluation protocol."""
    from .evaluate import full_data_baseline, random_real_baseline

    fast = _fast(args)
    ds = _load(args, zca=args.zca)
    lr = args.lr if args.lr is not None else 0.01
    if args.kind == "random":
        if args.ipc is None:
            raise UserError("baseline random needs --ipc K (real images per class)")
        epochs = DEFAULT_EVAL_EPOCHS if args.epochs is None else args.epochs
        res = random_real_baseline(ds, args.ipc, runs=args.runs, model=args.model, epochs=epochs, lr=lr,
                                   seed=args.seed, progress=_progress(args), fast=fast)
        what = f"random real, {args.ipc} images per class"
    else:
        epochs = 30 if args.epochs is None else args.epochs
        res = full_data_baseline(ds, runs=args.runs, model=args.model, epochs=epochs, lr=lr, seed=args.seed,
                                 progress=_progress(args), fast=fast)
        what = f"full data ({len(ds.train.x)} training images)"
    print(f"{ds.spec.name} ({ds.preprocess.kind}) {what}, {res.model}, {epochs} epochs, lr {lr:g}: test accuracy {res}")
    return {"command": "baseline", "kind": args.kind, "dataset": ds.spec.name, "preprocessing": ds.preprocess.kind,
            "ipc": args.ipc, **_numbers(res)}


def _load_for_set(args: argparse.Namespace, s) -> Any:
    """Load the dataset a set was distilled on, with the same preprocessing, and check it matches."""
    meta = s.preprocess.get("meta", {})
    zca = {"zca-kornia": "kornia", "zca-kip": "kip"}.get(meta.get("kind"))
    made_for = s.meta.get("dataset")
    if args.dataset and made_for and _dataset_key(args.dataset) != _dataset_key(made_for):
        raise UserError(f"{args.set} was made for dataset {made_for}, not {args.dataset}; evaluate it without "
                        f"--dataset (or with --dataset {made_for})")
    ds = _load(args, dataset=args.dataset or made_for, zca=zca)
    theirs, ours = meta.get("fingerprint"), ds.preprocess.fingerprint()
    if theirs and theirs != ours:
        raise UserError(f"{args.set} was made for {made_for} preprocessed differently (another mean/std or ZCA fit: "
                        "other dataset files or --val-fraction); evaluate it on the files and --val-fraction it was "
                        "distilled with")
    return ds


def _dataset_key(name: str) -> str:
    """A dataset name as the library spells it: 'MNIST' -> 'mnist', image folders by their absolute path."""
    from pathlib import Path

    from .data.registry import IMAGEFOLDER_PREFIX, canonical_name

    if name.startswith(IMAGEFOLDER_PREFIX):
        return IMAGEFOLDER_PREFIX + str(Path(name[len(IMAGEFOLDER_PREFIX):]).expanduser().resolve())
    return canonical_name(name)


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Train fresh networks on a distilled set and report test accuracy (torchrun: the runs split across ranks)."""
    from .device import resolve_device
    from .distributed import init_from_env, is_main_process
    from .set_eval import evaluate_synset, model_table, parse_models, record, set_protocol
    from .synset import SyntheticSet

    init_from_env(resolve_device(args.device))
    fast = _fast(args)
    s = SyntheticSet.load(args.set)
    if args.ipc is not None:
        s = s.prefix(args.ipc)
    protocol = args.protocol or set_protocol(s.meta)
    ds = _load_for_set(args, s)
    models = parse_models(args.eval_models, ds.spec) or [args.model or s.meta.get("model") or ds.spec.default_model]
    epochs = DEFAULT_EVAL_EPOCHS if args.epochs is None else args.epochs
    results = {m: evaluate_synset(s, ds, protocol=protocol, model=m, runs=args.runs, epochs=epochs, lr=args.lr,
                                  seed=args.seed, split=args.split, progress=_progress(args), distributed=True,
                                  fast=fast) for m in models}
    if not is_main_process():
        return None
    res = results[models[0]]
    how = (f"{epochs} epochs, lr {res.lr:.4g}" if protocol == "dsa" else
           f"{s.meta.get('rat_eval', {}).get('inner_opt', 'adam')} lr {res.lr:.4g}, step count chosen on validation")
    whose = "as asked" if args.protocol else "the set's own"
    print(f"{args.set} ({s.meta.get('method', '?')}, {ds.spec.name}, {s.ipc} images per class, {s.label_kind} "
          f"labels), {protocol} protocol, {whose} ({how}):")
    if args.eval_models:
        print(model_table(results))
    else:
        print(f"on {res.model}: {res}")
    out = {"command": "evaluate", "set": args.set, "dataset": ds.spec.name, "ipc": s.ipc,
           "label_kind": s.label_kind, "protocol": protocol, **_numbers(res)}
    if args.eval_models:
        out["models"] = {m: record(r) for m, r in results.items()}
    return out


def cmd_show(args: argparse.Namespace) -> None:
    """Write a PNG grid of a distilled set (normalisation and ZCA undone)."""
    from .synset import SyntheticSet

    s = SyntheticSet.load(args.set)
    if args.max_per_class < 1 or (args.scale is not None and args.scale < 1):
        raise UserError("--per-class and --scale must be at least 1")
    s.save_grid(args.out, max_per_class=args.max_per_class, scale=args.scale)
    print(f"wrote {args.out} ({s.num_classes} class columns x {min(s.ipc, args.max_per_class)} images)")


def cmd_presets(args: argparse.Namespace) -> None:
    """List the named presets and their values."""
    from .presets import PRESETS, budget, list_presets

    for name in list_presets(args.method):
        p = {k: v for k, v in PRESETS[name].items() if k != "note"}
        print(f"{name}\n    {json.dumps(p)}\n    budget: {budget(name)}\n    source: {PRESETS[name]['note']}")


# `distillery experts` flags of MTT buffer.py's recipe -> the ExpertConfig option (declared once) they set.
_EXPERT_RECIPE = {"momentum": "expert_momentum", "l2": "expert_l2", "decay": "expert_decay"}


def _add_expert_recipe(p: argparse.ArgumentParser) -> None:
    """--momentum (--mom), --l2, --decay, with the defaults and help of `distill`'s --expert-* options."""
    from .distill import ExpertConfig
    from .options import describe, option_meta

    meta = option_meta(ExpertConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(ExpertConfig)}
    for name, field in _EXPERT_RECIPE.items():
        text = f"{meta[field]['help']} (default {defaults[field]}; {describe(meta[field])})".replace("%", "%%")
        if name == "decay":
            p.add_argument("--decay", action="store_true", help=meta[field]["help"])
        else:
            p.add_argument(f"--{name}", *(["--mom"] if name == "momentum" else []), type=float,
                           default=defaults[field], help=text)


def _check_expert_recipe(args: argparse.Namespace) -> None:
    """One UserError, naming the flag as typed, for a --momentum / --l2 outside its declared range."""
    from .distill import ExpertConfig
    from .options import check_value, option_meta

    meta = option_meta(ExpertConfig)
    for name, field in _EXPERT_RECIPE.items():
        check_value(name, getattr(args, name), meta[field])


def cmd_experts(args: argparse.Namespace) -> None:
    """Train expert trajectories on the real data and store them (torchrun: rank r trains experts r, r + G, ...)."""
    from .device import resolve_device
    from .distributed import init_from_env, is_main_process
    from .experts import train_experts
    from .io import ensure_dir
    from .validate import check_cuda

    _check_expert_recipe(args)
    device = resolve_device(args.device)
    if args.fast == "on":
        check_cuda("--fast", device)
    ensure_dir(args.out)  # before the data are read
    device = init_from_env(device)
    ds = _load(args, zca=args.zca)
    model = args.model or ds.spec.default_model
    train_experts(ds, model, args.num_experts, epochs=args.epochs, lr=args.lr, batch=args.batch, out_dir=args.out,
                  device=device, seed=args.seed, progress=_progress(args), momentum=args.momentum,
                  weight_decay=args.l2, decay=args.decay, fast=args.fast == "on")
    if is_main_process():
        print(f"{args.num_experts} experts of {model} on {ds.spec.name} are in {args.out}")


def cmd_distill(args: argparse.Namespace) -> None:
    """Distil a dataset with MTT, TESLA or RaT-BPTT into RUN_DIR."""
    from .distill import distill_from_args

    return {"command": "distill", "run_dir": args.out, **distill_from_args(args)}


def cmd_report(args: argparse.Namespace) -> None:
    """Write the self-contained HTML report of a run directory."""
    from pathlib import Path

    from .report import _read_json, write_report

    ds = None
    if args.baseline:  # measure the random-real baseline on the run's dataset and preprocessing
        from .data import load_dataset
        from .device import resolve_device

        config = _read_json(Path(args.run_dir) / "config.json")
        if not config.get("dataset"):
            raise UserError(f"{args.run_dir}/config.json names no dataset; --baseline needs a finished run's dir")
        ds = load_dataset(config["dataset"], data_dir=args.data_dir, device=resolve_device(args.device),
                          zca=config.get("zca"), val_fraction=config.get("val_fraction", 0.1), seed=0)
    print(f"wrote {write_report(args.run_dir, out=args.out, dataset=ds, baseline=args.baseline)}")


def cmd_export(args: argparse.Namespace) -> None:
    """Write a distilled set as published-code tensors, an image folder or an ECCV-2024 submission."""
    from .export import export_set
    from .synset import SyntheticSet

    files = export_set(SyntheticSet.load(args.set), args.format, args.out, tag=args.tag)
    print(f"wrote {len(files)} files into {args.out} ({args.format})")


def cmd_import_set(args: argparse.Namespace) -> None:
    """Convert an MTT/TESLA/DATM images_*.pt or a RaT-BPTT .h5 into a distillery set."""
    from .imports import import_set

    s = import_set(args.file, args.dataset, zca=args.zca, data_dir=args.data_dir, val_fraction=args.val_fraction,
                   lr=args.lr)
    s.save(args.out)
    print(f"wrote {args.out}: {len(s.images)} images ({s.ipc} per class), {s.label_kind} labels, lr {s.lr}, "
          f"images taken to be in {s.meta['source']['space']} space (--zca {args.zca or 'none'})")


def cmd_import_experts(args: argparse.Namespace) -> None:
    """Convert MTT replay_buffer_*.pt files into an expert store, checking the parameter layout."""
    from .imports import import_experts

    store = import_experts(args.dir, args.dataset, args.model, args.out, zca=args.zca, data_dir=args.data_dir,
                           val_fraction=args.val_fraction, lr=args.lr, batch=args.batch)
    print(f"wrote {store.num_experts} experts x {store.epochs} epochs of {args.model} into {args.out}")


def _add_interop_parsers(sub) -> None:
    """report, export, import-set, import-experts."""
    p = sub.add_parser("report", help="write a self-contained HTML report of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="HTML file to write (default RUN_DIR/report.html)")
    p.add_argument("--baseline", action="store_true",
                   help="first measure the random-real baseline under the run's final protocol (trains networks)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write a set as pt tensors, an image folder or an ECCV-2024 submission")
    p.add_argument("set", help="a .safetensors distilled set")
    p.add_argument("--format", required=True, choices=["pt", "imagefolder", "eccv2024"])
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument("--tag", default="best", help="pt: file names images_TAG.pt, labels_TAG.pt, lr_TAG.pt")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-set", help="convert a published images_*.pt or RaT-BPTT .h5 into a distillery set")
    p.add_argument("file", help="images_*.pt (labels_*.pt, lr_*.pt beside it are read too) or a .h5")
    p.add_argument("--dataset", required=True)
    p.add_argument("--zca", default="none", choices=["kornia", "kip", "none"],
                   help="the space the file's images are in: kornia ZCA (MTT/TESLA/DATM --zca), kip ZCA "
                        "(RaT-BPTT --zca) or none (mean/std normalised)")
    p.add_argument("--lr", type=float, default=None, help="the set's training lr (default: lr_*.pt if present)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help=".safetensors file to write")
    p.set_defaults(func=cmd_import_set)

    p = sub.add_parser("import-experts", help="convert MTT replay_buffer_*.pt files into an expert store")
    p.add_argument("dir", help="the folder holding replay_buffer_0.pt, replay_buffer_1.pt, ...")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True, help="the model the buffer was trained with (its layout is checked)")
    p.add_argument("--zca", default="none", choices=["kornia", "kip", "none"],
                   help="the preprocessing the experts were trained in (MTT: kornia with --zca)")
    p.add_argument("--lr", type=float, default=0.01, help="the experts' training lr, recorded (MTT default 0.01)")
    p.add_argument("--batch", type=int, default=256, help="their batch size, recorded (MTT default 256)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="directory for the expert store")
    p.set_defaults(func=cmd_import_experts)


# --- parser -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    from .distill import add_distill_args

    parser = argparse.ArgumentParser(prog="distillery", description="Dataset distillation: MTT, TESLA, RaT-BPTT.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("datasets", help="list datasets, where they are and how to get them")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("download", help="download a standard dataset (checksums verified)")
    p.add_argument("name", help="mnist | fashion-mnist | cifar10 | cifar100 | svhn | tiny-imagenet")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("baseline", help="random-real or full-data baseline")
    p.add_argument("kind", choices=["random", "full"])
    _add_data(p)
    p.add_argument("--ipc", type=int, default=None, help="images per class (random)")
    _add_eval(p)
    _add_common(p)
    _add_output(p)
    p.set_defaults(func=cmd_baseline, runs=None)

    p = sub.add_parser("evaluate", help="train fresh networks on a distilled set, report test accuracy")
    p.add_argument("set", help="a .safetensors distilled set")
    p.add_argument("--ipc", type=int, default=None, help="evaluate only the first K images per class (boosted sets)")
    p.add_argument("--dataset", default=None, help="override the dataset stored in the set")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--protocol", default=None, choices=["dsa", "rat"],
                   help="dsa: MTT/TESLA's evaluate_synset (SGD, DSA, --epochs, --lr); rat: RaT-BPTT's test() "
                        "(inner optimiser, flip_rotate, 300/600/1000/3000 steps chosen on validation). "
                        "Default: the protocol the set was distilled for")
    p.add_argument("--eval-models", default=None, metavar="M1,M2,...",
                   help="the cross-architecture table: one row per model, e.g. ConvNet,AlexNet,VGG11,ResNet18_AP,"
                        "ResNet18 (default: --model, else the set's distillation model)")
    _add_eval(p)
    _add_common(p)
    _add_output(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("show", help="write a PNG grid of a distilled set")
    p.add_argument("set")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--per-class", "--max-per-class", dest="max_per_class", type=int, default=10,
                   help="images of each class shown, K (default 10)")
    p.add_argument("--scale", type=int, default=None,
                   help="pixels per image pixel (default: small images are scaled up to at least 64 px)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("presets", help="list named hyperparameter presets")
    p.add_argument("--method", default=None, choices=["mtt", "tesla", "ratbptt"])
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("experts", help="train expert trajectories (MTT/TESLA)")
    _add_data(p)
    p.add_argument("--model", default=None)
    p.add_argument("--num-experts", type=int, default=10)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=256)
    _add_expert_recipe(p)
    p.add_argument("--fast", default="off", choices=["off", "on"],
                   help="on (CUDA): every minibatch step replays a captured CUDA graph (same numbers up to rounding)")
    p.add_argument("--out", required=True, help="directory for the expert store")
    _add_common(p)
    p.set_defaults(func=cmd_experts)

    p = sub.add_parser("distill", help="distil a dataset (MTT, TESLA or RaT-BPTT)")
    add_distill_args(p)
    _add_common(p)
    _add_output(p)
    p.set_defaults(func=cmd_distill)
    _add_interop_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distillery` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # declared ranges first: nothing is read or trained with a value that cannot work
        check_command_args(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "runs", 0) is None:
        args.runs = 5 if args.command != "baseline" or args.kind == "random" else 1
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    from .hostmem import keep_freed_memory

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
        print(f"{'terminated' if terminated else 'interrupted'}; {_way_on(args)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it stops exactly as on Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM handler: behave like SIGINT."""
    raise Terminated()


def _way_on(args: argparse.Namespace) -> str:
    """After an interrupt: what the interrupted command kept and how to go on."""
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


if __name__ == "__main__":
    sys.exit(main())
