"""The `distillery` command line: datasets, baselines, experts, distillation, evaluation, display.

Every command prints one clear `error: ...` line (exit 2) on bad input instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

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


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="evaluation model (default: the dataset's ConvNet)")
    p.add_argument("--runs", type=int, default=5, help="networks trained from scratch (default 5)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {DEFAULT_EVAL_EPOCHS})")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the set's learned lr, else 0.01)")


def _load(args: argparse.Namespace, dataset: str | None = None, zca: str | None = None):
    from .data import load_dataset
    from .device import resolve_device

    name = dataset or args.dataset
    if not name:
        raise UserError("no dataset given; pass --dataset NAME (see `distillery datasets`)")
    zca = None if zca in (None, "none") else zca
    return load_dataset(name, data_dir=args.data_dir, device=resolve_device(args.device), zca=zca,
                        val_fraction=args.val_fraction, seed=0)


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress


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

    path = fetch_dataset(args.name, data_root(args.data_dir))
    print(f"{args.name} is in {path}")


def cmd_baseline(args: argparse.Namespace) -> None:
    """Random-real or full-data baseline with the shared evaluation protocol."""
    from .evaluate import full_data_baseline, random_real_baseline

    ds = _load(args, zca=args.zca)
    lr = args.lr if args.lr is not None else 0.01
    if args.kind == "random":
        if args.ipc is None:
            raise UserError("baseline random needs --ipc K (real images per class)")
        epochs = args.epochs or DEFAULT_EVAL_EPOCHS
        res = random_real_baseline(ds, args.ipc, runs=args.runs, model=args.model, epochs=epochs, lr=lr,
                                   seed=args.seed, progress=_progress(args))
        what = f"random real, {args.ipc} images per class"
    else:
        epochs = args.epochs or 30
        res = full_data_baseline(ds, runs=args.runs, model=args.model, epochs=epochs, lr=lr, seed=args.seed,
                                 progress=_progress(args))
        what = f"full data ({len(ds.train.x)} training images)"
    print(f"{ds.spec.name} ({ds.preprocess.kind}) {what}, {res.model}, {epochs} epochs, lr {lr:g}: test accuracy {res}")


def _load_for_set(args: argparse.Namespace, s) -> Any:
    """Load the dataset a set was distilled on, with the same preprocessing, and check it matches."""
    meta = s.preprocess.get("meta", {})
    zca = {"zca-kornia": "kornia", "zca-kip": "kip"}.get(meta.get("kind"))
    ds = _load(args, dataset=args.dataset or s.meta.get("dataset"), zca=zca)
    theirs, ours = meta.get("fingerprint"), ds.preprocess.fingerprint()
    if theirs and theirs != ours:
        raise UserError("this set was made with a different preprocessing (mean/std or ZCA fit) than the dataset "
                        "loaded now; evaluate it on the same dataset files and --val-fraction it was distilled with")
    return ds


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Train fresh networks on a distilled set and report test accuracy."""
    from .evaluate import evaluate_set
    from .synset import SyntheticSet

    s = SyntheticSet.load(args.set)
    if args.ipc is not None:
        s = s.prefix(args.ipc)
    ds = _load_for_set(args, s)
    lr = args.lr if args.lr is not None else (s.lr if s.lr is not None else 0.01)
    epochs = args.epochs or DEFAULT_EVAL_EPOCHS
    res = evaluate_set(s.images, s.labels, ds, args.model or s.meta.get("model"), runs=args.runs, epochs=epochs,
                       lr=lr, seed=args.seed, split=args.split, progress=_progress(args))
    print(f"{args.set} ({s.meta.get('method', '?')}, {ds.spec.name}, {s.ipc} images per class, {s.label_kind} "
          f"labels) on {res.model}, {epochs} epochs, lr {lr:.4g}: {res}")


def cmd_show(args: argparse.Namespace) -> None:
    """Write a PNG grid of a distilled set (normalisation and ZCA undone)."""
    from .synset import SyntheticSet

    s = SyntheticSet.load(args.set)
    s.save_grid(args.out, max_per_class=args.max_per_class)
    print(f"wrote {args.out} ({s.num_classes} class columns x {min(s.ipc, args.max_per_class)} images)")


def cmd_presets(args: argparse.Namespace) -> None:
    """List the named presets and their values."""
    from .presets import PRESETS, list_presets

    for name in list_presets(args.method):
        p = {k: v for k, v in PRESETS[name].items() if k != "note"}
        print(f"{name}\n    {json.dumps(p)}\n    source: {PRESETS[name]['note']}")


def cmd_experts(args: argparse.Namespace) -> None:
    """Train expert trajectories on the real data and store them."""
    from .device import resolve_device
    from .experts import train_experts

    ds = _load(args, zca=args.zca)
    model = args.model or ds.spec.default_model
    train_experts(ds, model, args.num_experts, epochs=args.epochs, lr=args.lr, batch=args.batch, out_dir=args.out,
                  device=resolve_device(args.device), seed=args.seed, progress=_progress(args))
    print(f"{args.num_experts} experts of {model} on {ds.spec.name} are in {args.out}")


def cmd_distill(args: argparse.Namespace) -> None:
    """Distil a dataset with MTT, TESLA or RaT-BPTT into RUN_DIR."""
    from .distill import distill_from_args

    distill_from_args(args)


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
    p.add_argument("name", help="mnist | fashion-mnist | cifar10 | cifar100")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("baseline", help="random-real or full-data baseline")
    p.add_argument("kind", choices=["random", "full"])
    _add_data(p)
    p.add_argument("--ipc", type=int, default=None, help="images per class (random)")
    _add_eval(p)
    _add_common(p)
    p.set_defaults(func=cmd_baseline, runs=None)

    p = sub.add_parser("evaluate", help="train fresh networks on a distilled set, report test accuracy")
    p.add_argument("set", help="a .safetensors distilled set")
    p.add_argument("--ipc", type=int, default=None, help="evaluate only the first K images per class (boosted sets)")
    p.add_argument("--dataset", default=None, help="override the dataset stored in the set")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--split", default="test", choices=["test", "val"])
    _add_eval(p)
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("show", help="write a PNG grid of a distilled set")
    p.add_argument("set")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--max-per-class", type=int, default=10)
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
    p.add_argument("--out", required=True, help="directory for the expert store")
    _add_common(p)
    p.set_defaults(func=cmd_experts)

    p = sub.add_parser("distill", help="distil a dataset (MTT, TESLA or RaT-BPTT)")
    add_distill_args(p)
    _add_common(p)
    p.set_defaults(func=cmd_distill)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distillery` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "runs", 0) is None:
        args.runs = 5 if args.command != "baseline" or args.kind == "random" else 1
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a distillation can be continued with the same command and --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
