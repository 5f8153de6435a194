"""What each `distillery` command does: one function per command, taking the parsed arguments and returning the
numbers `--json`/`--quiet` print (or None)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import UserError
from ..evaluation.protocol import DEFAULT_EVAL_EPOCHS


def _checked_eval_fast(args: argparse.Namespace) -> bool:
    """Whether --eval-fast is on; on is refused (UserError) before any data is read where the device is not CUDA."""
    from ..device import resolve_device
    from ..config.validate import check_cuda

    if args.eval_fast == "on":
        check_cuda("--eval-fast", resolve_device(args.device))
    return args.eval_fast == "on"


def _load_dataset(args: argparse.Namespace, dataset: str | None = None, zca: str | None = None) -> Any:
    """The dataset `args` name (or `dataset`), read from --data-dir onto --device with the given --zca."""
    from ..data import load_dataset
    from ..device import resolve_device

    name = dataset or args.dataset
    if not name:
        raise UserError("no dataset given; pass --dataset NAME (see `distillery datasets`)")
    zca = None if zca in (None, "none") else zca
    resolution = getattr(args, "resolution", None)
    if resolution is None and name.startswith("imagefolder:"):  # the resolution rule of distill (docs/DEFAULTS.md)
        from ..config.defaults import data_facts

        resolution = data_facts(name, args.val_fraction).resolution
    return load_dataset(name, data_dir=args.data_dir, device=resolve_device(args.device), zca=zca,
                        val_fraction=args.val_fraction, seed=0, resolution=resolution)


def _progress(args: argparse.Namespace) -> bool:
    """Whether progress bars are shown (not --no-progress)."""
    return not args.no_progress


def _result_json(res: Any) -> dict[str, Any]:
    """An EvalResult as the JSON-able numbers --json prints (accuracies are fractions)."""
    return {"model": res.model, "epochs": res.epochs, "lr": res.lr, "split": res.split, "runs": len(res.accs),
            "mean": res.mean, "std": res.std, "accs": list(res.accs)}


def cmd_datasets(args: argparse.Namespace) -> None:
    """What is available locally, where, and how to get the rest."""
    from ..data import dataset_status

    rows = dataset_status(args.data_dir)
    width = max(len(r.name) for r in rows)
    for r in rows:
        state = "available" if r.available else "missing  "
        print(f"{r.name:<{width}}  {state}  {r.location if r.available else r.how_to_get}")
    print("your own images: --dataset imagefolder:PATH (PATH/train/<class>/*, PATH/test/<class>/*)")


def cmd_download(args: argparse.Namespace) -> None:
    """Download a standard dataset from its canonical address (checksums verified)."""
    from ..data import data_root
    from ..data.download import fetch_dataset
    from ..io import ensure_dir

    path = fetch_dataset(args.name, ensure_dir(data_root(args.data_dir), "--data-dir"))
    print(f"{args.name} is in {path}")


def cmd_baseline(args: argparse.Namespace) -> dict[str, Any] | None:
    """Random-real or full-data baseline with the shared evaluation protocol."""
    from ..evaluation.dsa import full_data_baseline, random_real_baseline

    fast = _checked_eval_fast(args)
    ds = _load_dataset(args, zca=args.zca)
    lr = args.lr if args.lr is not None else 0.01
    if args.kind == "random":
        if args.ipc is None:
            raise UserError("baseline random needs --ipc K (real images per class)")
        epochs = DEFAULT_EVAL_EPOCHS if args.eval_epochs is None else args.eval_epochs
        res = random_real_baseline(ds, args.ipc, runs=args.runs, model=args.model, epochs=epochs, lr=lr,
                                   seed=args.seed, progress=_progress(args), fast=fast)
        what = f"random real, {args.ipc} images per class"
    else:
        epochs = 30 if args.eval_epochs is None else args.eval_epochs
        res = full_data_baseline(ds, runs=args.runs, model=args.model, epochs=epochs, lr=lr, seed=args.seed,
                                 progress=_progress(args), fast=fast)
        what = f"full data ({len(ds.train.x)} training images)"
    print(f"{ds.spec.name} ({ds.preprocess.kind}) {what}, {res.model}, {epochs} epochs, lr {lr:g}: test accuracy {res}")
    return {"command": "baseline", "kind": args.kind, "dataset": ds.spec.name, "preprocessing": ds.preprocess.kind,
            "ipc": args.ipc, **_result_json(res)}


def _load_for_set(args: argparse.Namespace, s) -> Any:
    """Load the dataset a set was distilled on, with the same preprocessing, and check it matches; an image folder
    that moved is named with --dataset imagefolder:NEW (same classes and image size)."""
    from pathlib import Path

    from ..data.preprocess import zca_flag

    meta = s.preprocess.get("meta", {})
    zca = zca_flag(meta.get("kind"))
    made_for = s.meta.get("dataset")
    folders = [str(n).startswith("imagefolder:") for n in (args.dataset or "", made_for or "")]
    moved = all(folders) and _dataset_key(args.dataset) != _dataset_key(made_for)
    if args.dataset and made_for and _dataset_key(args.dataset) != _dataset_key(made_for) and not moved:
        raise UserError(f"{args.set} was made for dataset {made_for}, not {args.dataset}; evaluate it without "
                        f"--dataset (or with --dataset {made_for})")
    if folders[1] and not args.dataset and not Path(made_for[len("imagefolder:"):]).is_dir():
        raise UserError(f"{args.set} was distilled on {made_for}, which is gone; if the folder moved, pass "
                        "--dataset imagefolder:NEW_PATH")
    if moved and getattr(args, "resolution", None) is None:
        args.resolution = s.images.shape[-1]  # the set's own size, whatever the folder's images are
    ds = _load_dataset(args, dataset=args.dataset or made_for, zca=zca)
    if moved:  # the same images elsewhere: the classes and image size must be the set's (the fingerprint then
        # compares the images themselves through the preprocessing fit)
        want = (s.meta.get("class_names"), s.num_classes, list(s.images.shape[1:]))
        got = (list(ds.spec.class_names), ds.spec.num_classes, [ds.spec.channels, *ds.spec.im_size])
        if want != got:
            raise UserError(f"{args.dataset} does not hold the images {args.set} was distilled on ({made_for}): "
                            f"classes {got[0]} and images {got[2]}, the set has {want[0]} and {want[2]}; pass the "
                            "folder it was distilled on")
    theirs, ours = meta.get("fingerprint"), ds.preprocess.fingerprint()
    if theirs and theirs != ours:
        raise UserError(f"{args.set} was made for {made_for} preprocessed differently (another mean/std or ZCA fit: "
                        "other dataset files or --val-fraction); evaluate it on the files and --val-fraction it was "
                        "distilled with")
    return ds


def _dataset_key(name: str) -> str:
    """A dataset name as the library spells it: 'MNIST' -> 'mnist', image folders by their absolute path."""
    from pathlib import Path

    from ..data.registry import IMAGEFOLDER_PREFIX, canonical_name

    if name.startswith(IMAGEFOLDER_PREFIX):
        return IMAGEFOLDER_PREFIX + str(Path(name[len(IMAGEFOLDER_PREFIX):]).expanduser().resolve())
    return canonical_name(name)


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train fresh networks on a distilled set under the protocol it records, flags overriding single fields, and
    report test accuracy (torchrun: the runs split across ranks)."""
    from ..device import resolve_device
    from ..distributed import init_from_env, is_main_process
    from ..evaluation.protocol import recorded_protocols
    from ..evaluation.score import evaluate_synset, model_table, parse_models, result_entry, resolve_protocol
    from ..sets.synset import SyntheticSet

    init_from_env(resolve_device(args.device))
    fast = _checked_eval_fast(args)
    s = SyntheticSet.load(args.set)
    if args.ipc is not None:
        s = s.prefix(args.ipc)
    given_fraction = args.val_fraction
    if args.val_fraction is None:  # the split the set was selected on (its preprocessing was fitted without it)
        recorded = recorded_protocols(s.meta)
        args.val_fraction = recorded[0].val_fraction if recorded else 0.1
    ds = _load_for_set(args, s)
    proto, sources = resolve_protocol(s, ds.spec, args.protocol, {
        "--model": ("model", args.model), "--runs": ("runs", args.runs), "--seed": ("seed", args.seed),
        "--eval-epochs": ("epochs", args.eval_epochs), "--lr": ("lr", args.lr), "--val-fraction": ("val_fraction",
                                                                                         given_fraction)})
    models = parse_models(args.eval_models, ds.spec) or [proto.model]
    results = {m: evaluate_synset(s, ds, proto.replace(model=m), split=args.split, progress=_progress(args),
                                  distributed=True, fast=fast) for m in models}
    if not is_main_process():
        return None
    res = results[models[0]]
    if args.eval_models:
        sources = {**sources, "model": "--eval-models"}
    print(f"{args.set} ({s.meta.get('method', '?')}, {ds.spec.name}, {s.ipc} images per class, {s.label_kind} "
          f"labels), {proto.replace(model=models[0]).describe(sources)}:")
    if args.eval_models:
        print(model_table(results))
    else:
        print(f"on {res.model}: {res}")
    out = {"command": "evaluate", "set": args.set, "dataset": ds.spec.name, "ipc": s.ipc,
           "label_kind": s.label_kind, "protocol": proto.name, "eval_protocol": proto.as_json(), "sources": sources,
           **_result_json(res)}
    if args.eval_models:
        out["models"] = {m: result_entry(r) for m, r in results.items()}
    return out


def cmd_show(args: argparse.Namespace) -> None:
    """Write a PNG grid of a distilled set (normalisation and ZCA undone)."""
    from ..sets.synset import SyntheticSet

    s = SyntheticSet.load(args.set)
    s.save_grid(args.out, max_per_class=args.max_per_class, scale=args.scale)
    print(f"wrote {args.out} ({s.num_classes} class columns x {min(s.ipc, args.max_per_class)} images)")


def cmd_presets(args: argparse.Namespace) -> None:
    """List the named presets and their values."""
    from ..config.presets import PRESETS, budget, list_presets

    for name in list_presets(args.method):
        p = {k: v for k, v in PRESETS[name].items() if k != "note"}
        print(f"{name}\n    {json.dumps(p)}\n    budget: {budget(name)}\n    source: {PRESETS[name]['note']}")


def cmd_experts(args: argparse.Namespace) -> None:
    """Train expert trajectories on the real data and store them (torchrun: rank r trains experts r, r + G, ...)."""
    from ..device import resolve_device
    from ..distributed import init_from_env, is_main_process
    from ..experts import train_experts
    from ..io import ensure_dir
    from ..config.validate import check_cuda

    device = resolve_device(args.device)
    if args.fast == "on":
        check_cuda("--fast", device)
    ensure_dir(args.out)  # before the data are read
    device = init_from_env(device)
    ds = _load_dataset(args, zca=args.zca)
    model = args.model or ds.spec.default_model
    train_experts(ds, model, args.num_experts, epochs=args.expert_epochs_train, lr=args.expert_lr, batch=args.batch,
                  out_dir=args.out, device=device, seed=args.seed, progress=_progress(args),
                  momentum=args.expert_momentum, weight_decay=args.expert_l2, decay=args.expert_decay,
                  fast=args.fast == "on")
    if is_main_process():
        print(f"{args.num_experts} experts of {model} on {ds.spec.name} are in {args.out}")


def cmd_distill(args: argparse.Namespace) -> dict[str, Any] | None:
    """Distil a dataset with the --method method into RUN_DIR."""
    from ..distill import distill_from_args

    return {"command": "distill", "run_dir": args.out, **distill_from_args(args)}


def cmd_report(args: argparse.Namespace) -> None:
    """Write the self-contained HTML report of a run directory."""
    from ..report import write_report

    baseline = None
    if args.baseline:  # measure the random-real baseline on the run's dataset and preprocessing
        from ..evaluation.score import run_baseline

        baseline = run_baseline(args.run_dir, args.data_dir, args.device)
    print(f"wrote {write_report(args.run_dir, out=args.out, baseline=baseline)}")


def cmd_export(args: argparse.Namespace) -> None:
    """Write a distilled set as published-code tensors, an image folder or an ECCV-2024 submission."""
    from ..sets.export import export_set
    from ..sets.synset import SyntheticSet

    files = export_set(SyntheticSet.load(args.set), args.format, args.out, tag=args.tag, replace=args.replace)
    print(f"wrote {len(files)} files into {args.out} ({args.format})")


def cmd_import_set(args: argparse.Namespace) -> None:
    """Convert an MTT/TESLA/DATM images_*.pt or a RaT-BPTT .h5 into a distillery set."""
    from ..evaluation.protocol import EvalProtocol
    from ..sets.imports import import_set

    s = import_set(args.file, args.dataset, zca=args.zca, data_dir=args.data_dir, val_fraction=args.val_fraction,
                   lr=args.lr)
    s.save(args.out)
    source = s.meta["source"]
    print(f"wrote {args.out}: {len(s.images)} images ({s.ipc} per class), {s.label_kind} labels, lr {s.lr}, "
          f"images taken to be in {source['space']} space (--zca {args.zca or 'none'})")
    for part in ("images", "labels", "lr"):  # where each part came from, and what was assumed
        if part in source:
            print(f"  {part}: {source[part]}")
    origin = "RaT-BPTT test()" if s.meta["source"]["format"] == "ratbptt-h5" else "MTT/TESLA evaluate_synset"
    print(f"evaluation recorded as the source code's ({origin}): "
          f"{EvalProtocol.from_json(s.meta['eval'][0]).describe()}; `distillery evaluate` uses it (flags override)")


def cmd_import_experts(args: argparse.Namespace) -> None:
    """Convert MTT replay_buffer_*.pt files into an expert store, checking the parameter layout."""
    from ..sets.imports import import_experts

    store = import_experts(args.dir, args.dataset, args.model, args.out, zca=args.zca, data_dir=args.data_dir,
                           val_fraction=args.val_fraction, lr=args.lr, batch=args.batch)
    print(f"wrote {store.num_experts} experts x {store.epochs} epochs of {args.model} into {args.out}")

