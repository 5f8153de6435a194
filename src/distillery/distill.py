"""`distillery distill`: resolve the configuration (defaults <- preset <- flags), build the method, run the loop.

Method options are generated from each method's config dataclass, so a new hyperparameter needs no CLI code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .options import describe, option
from .run import LoopConfig


@dataclass
class ExpertConfig:
    """The experts an MTT/TESLA run trains and caches when no --experts store is given."""

    num_experts: int = option(10, low=1, help="expert trajectories to train")
    expert_epochs_train: int = option(50, low=1, help="epochs of every expert (>= max_start_epoch - 1 + expert_epochs)")
    expert_lr: float = option(0.01, low=0, low_open=True, help="SGD learning rate of the experts")
    expert_momentum: float = option(0.0, low=0, high=1, high_open=True,
                                    help="SGD momentum of the experts (MTT buffer.py --mom; published 0)")
    expert_l2: float = option(0.0, low=0, help="SGD weight decay of the experts (buffer.py --l2; published 0)")
    expert_decay: bool = option(False, help="expert lr x0.1 once epoch E // 2 + 1 of E is done, momentum restarted "
                                            "(buffer.py --decay; published off)")
    # these two also apply to a given --experts store
    max_files: int | None = option(None, low=1, help="use only the first N groups of 10 experts by index (MTT "
                                                     "distill.py --max_files: files of 10 experts)")
    max_experts: int | None = option(None, low=1, help="use only the first N experts of each group of 10 (MTT "
                                                       "distill.py --max_experts, per file)")


@dataclass
class DataConfig:
    """How `distill` reads its dataset."""

    val_fraction: float = option(0.1, low=0, high=1, high_open=True,
                                 help="share of the train split held out for validation/selection")
    resolution: int | None = option(None, low=1, help="imagefolder: side to resize to (default: the images' own, "
                                                      "at most 64)")


LOOP_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LoopConfig) if f.name != "seed"}
EXPERT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ExpertConfig)}


def _method_configs() -> dict[str, type]:
    from .methods.mtt import MTTConfig
    from .methods.ratbptt import RaTBPTTConfig

    return {"mtt": MTTConfig, "tesla": MTTConfig, "ratbptt": RaTBPTTConfig}


def _parse_bool(text: str) -> bool:
    """true/false (also 1/0, yes/no, on/off) for boolean options; anything else is an argparse error."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _arg_type(annotation: str):
    """argparse type for a dataclass field from its (string) annotation; 'none' gives None for optional fields."""
    if "bool" in annotation:
        base = _parse_bool
    elif "float" in annotation:
        base = float
    elif "int" in annotation:
        base = int
    else:
        base = str
    if "None" not in annotation:
        return base

    def optional(text: str):
        return None if text.lower() == "none" else base(text)

    optional.__name__ = base.__name__  # argparse names the type in its error message
    return optional


def _option_help(prefix: str, f: dataclasses.Field) -> str:
    """--help text of a generated flag: the option's help, its default and its range (% escaped for argparse)."""
    meta = f.metadata.get("option", {})
    text = f"{prefix}{meta.get('help', '')} (default {f.default}; {describe(meta)})" if meta else \
        f"{prefix}default {f.default}"
    return text.replace("%", "%%")


def _method_help(name: str, methods: dict[str, type]) -> str:
    """--help text of a method option: each method's own text, prefixed by the methods it applies to; one text
    without a prefix when every method declares the same."""
    texts: dict[str, list[str]] = {}
    for method, cls in methods.items():
        for f in dataclasses.fields(cls):
            if f.name == name:
                texts.setdefault(_option_help("", f), []).append(method)
    if len(texts) == 1 and len(next(iter(texts.values()))) == len(methods):
        return next(iter(texts))
    return " | ".join(f"{', '.join(users)}: {text}" for text, users in texts.items())


def add_distill_args(p: argparse.ArgumentParser) -> None:
    """Options of `distillery distill`; every default is None so we can tell what the user set."""
    p.add_argument("--method", required=True, choices=["mtt", "tesla", "ratbptt"])
    p.add_argument("--preset", default=None, help="a named preset (`distillery presets`); flags override it. "
                   "Default: the preset for this method, dataset and IPC if there is one, else defaults derived "
                   "from the data (docs/DEFAULTS.md)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--estimate", action="store_true", help="run 3 iterations and one evaluation epoch, print "
                   "s/iteration, peak memory and the projected wall time of the whole run; writes nothing")
    p.add_argument("--dataset", default=None)
    p.add_argument("--zca", default=None, choices=["kornia", "kip", "none"])
    p.add_argument("--experts", default=None, help="expert store (MTT/TESLA); default: train and cache them")
    p.add_argument("--init-from", default=None, metavar="SET",
                   help="start from a saved set (.safetensors of the same dataset and ipc; RaT-BPTT's --ckptname): "
                        "its images, and its learned labels when the run learns labels")
    seen = {"seed"}
    methods = _method_configs()
    groups = [("run loop", LoopConfig), ("experts (MTT/TESLA, when no --experts is given)", ExpertConfig),
              ("data", DataConfig), *((f"{m} options", c) for m, c in methods.items())]
    for title, cls in groups:
        group = p.add_argument_group(title)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            group.add_argument("--" + f.name.replace("_", "-"), default=None, type=_arg_type(str(f.type)),
                               help=_method_help(f.name, methods) if cls in methods.values() else _option_help("", f))


def config_classes(method: str) -> list[type]:
    """The option dataclasses whose fields make up a `distill` configuration for `method`."""
    classes = [_method_configs()[method], LoopConfig, DataConfig]
    return classes + [ExpertConfig] if method in ("mtt", "tesla") else classes


def config_defaults(method: str) -> dict[str, Any]:
    """The declared default of each key of a `method` configuration: what a run recorded before the key existed
    did (`--resume` of such a run accepts the key at this value). `processes` is not an option: one process."""
    return {**{f.name: f.default for cls in config_classes(method) for f in dataclasses.fields(cls)}, "processes": 1}


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults of the method, then a preset (named, else the one for this method/dataset/IPC) or defaults derived
    from the data, then every flag the user gave; checked as a whole before any data is read."""
    from .data.registry import IMAGEFOLDER_PREFIX, canonical_name
    from .defaults import data_facts, derive_defaults
    from .presets import get_preset, preset_for
    from .validate import check_config

    classes = config_classes(args.method)
    config: dict[str, Any] = {f.name: f.default for cls in classes for f in dataclasses.fields(cls)}
    config.pop("seed", None)
    if args.method == "tesla":
        config["grad"] = "tesla"
    config.update(method=args.method, dataset=None, zca=None)
    flags = {key: getattr(args, key) for key in [*config, "experts", "seed"] if getattr(args, key, None) is not None}
    name = args.preset
    dataset = flags.get("dataset")
    if name is None and dataset is not None:
        if not dataset.startswith(IMAGEFOLDER_PREFIX):
            dataset = canonical_name(dataset)
        name = preset_for(args.method, dataset, flags.get("ipc", config["ipc"]))
    if name is not None:
        preset = get_preset(name)
        if preset["method"] != args.method:
            raise UserError(f"preset {name} is for --method {preset['method']}, not {args.method}")
        config.update({k: v for k, v in preset.items() if k not in ("note", "budget")})
        config["defaults_from"] = f"preset {name}"
    dataset = flags.get("dataset", config.get("dataset"))
    if not dataset:
        raise UserError("no dataset given; pass --dataset NAME or a --preset")
    facts = data_facts(dataset, flags.get("val_fraction", config["val_fraction"]),
                       flags.get("resolution", config.get("resolution")))
    if name is None:
        config.update(derive_defaults(args.method, facts, flags.get("ipc", config["ipc"])))
        config["defaults_from"] = "derived from the data (docs/DEFAULTS.md)"
    config["resolution"] = facts.resolution
    config.update(flags)
    config.setdefault("seed", 0)
    if config["zca"] == "none":
        config["zca"] = None
    check_config(config, classes, facts)
    if config.get("experts") is not None and ExpertConfig in classes:  # record the store used, not a recipe unused
        from .experts import store_recipe

        config.update(store_recipe(config["experts"], config.get("max_files"), config.get("max_experts")))
    return config


def describe_defaults(config: dict[str, Any]) -> str:
    """One line saying where the defaults of this run came from, with the derived values."""
    source = config["defaults_from"]
    if not source.startswith("derived"):
        return f"defaults: {source} (flags override it)"
    keys = ["ipc", "zca", "resolution", "syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr",
            "num_experts", "expert_epochs_train", "horizon", "window", "real_batch", "lr", "iterations", "eval_every"]
    values = ", ".join(f"{k}={config[k]}" for k in keys if k in config)
    return f"no preset for {config['method']} on {config['dataset']} at IPC {config['ipc']}: defaults {source}: {values}"


def _experts_for(config: dict[str, Any], ds, device, progress: bool, estimate: bool = False):
    """Open the expert store the run needs, training and caching it first if no --experts was given (`estimate`:
    refuse with the projected cost instead), and limit it to --max-files / --max-experts."""
    from .experts import ExpertStore, limit_experts, time_expert_epoch, train_experts
    from .models import FunctionalModel, create_model

    spec = ds.spec
    model = config["model"] or spec.default_model
    fm = FunctionalModel(create_model(model, spec.channels, spec.num_classes, spec.im_size))
    path = config.get("experts")
    if path is None:
        cache = Path(os.environ.get("DISTILLERY_CACHE", Path.home() / ".cache" / "distillery"))
        recipe = {"m": config["expert_momentum"], "wd": config["expert_l2"], "decay": int(config["expert_decay"])}
        key = (f"{spec.name.replace(':', '_').replace('/', '_')}-{model}-{ds.preprocess.fingerprint()[:10]}"
               f"-n{config['num_experts']}-e{config['expert_epochs_train']}-lr{config['expert_lr']:g}-s{config['seed']}"
               + "".join(f"-{k}{v:g}" for k, v in recipe.items() if v))  # the published recipe keeps its old key
        path = cache / "experts" / key
        if estimate and not _complete_store(path, config["num_experts"]):
            raise expert_cost_error(config, time_expert_epoch(ds, model, lr=config["expert_lr"]))
        print(f"no --experts given: training {config['num_experts']} experts x {config['expert_epochs_train']} "
              f"epochs into the cache {path} (reused by later runs)")
        train_experts(ds, model, config["num_experts"], epochs=config["expert_epochs_train"], lr=config["expert_lr"],
                      out_dir=path, device=device, seed=config["seed"], progress=progress,
                      momentum=config["expert_momentum"], weight_decay=config["expert_l2"],
                      decay=config["expert_decay"], fast=config.get("fast") == "on")  # --fast on: experts too
    store = ExpertStore.open(path, expect_dataset=spec.name, expect_model=model,
                             expect_fingerprint=ds.preprocess.fingerprint(), expect_layout=fm)
    return limit_experts(store, config.get("max_files"), config.get("max_experts"))


def _complete_store(path: Path, num_experts: int) -> bool:
    """Whether the cached store at `path` already holds `num_experts` finished experts."""
    import json

    try:
        return len(json.loads((path / "manifest.json").read_text())["experts"]) >= num_experts
    except (OSError, ValueError, KeyError):
        return False


def expert_cost_error(config: dict[str, Any], epoch_s: float) -> UserError:
    """`--estimate` without --experts: what training the run's experts would cost, and how to avoid it."""
    from .estimate import duration

    n, epochs = config["num_experts"], config["expert_epochs_train"]
    needed = config["max_start_epoch"] - 1 + config["expert_epochs"]
    return UserError(f"--estimate trains no experts, and without --experts this run would first train {n} experts x "
                     f"{epochs} epochs: about {duration(n * epochs * epoch_s)} here ({duration(epoch_s)} per expert "
                     f"epoch, timed on 2 batches); train a smaller store first (the run reads {needed} epochs: "
                     f"`distillery experts --num-experts 2 --epochs {needed}` with this dataset and --zca) and pass "
                     "--experts DIR")


def build_method(config: dict[str, Any], ds, device, progress: bool = True, estimate: bool = False):
    """Instantiate the method object for the shared loop (`estimate`: train no experts, see `_experts_for`)."""
    cls = _method_configs()[config["method"]]
    cfg = cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})
    if config["method"] in ("mtt", "tesla"):
        from .methods.mtt import MTT

        return MTT(ds, _experts_for(config, ds, device, progress, estimate), cfg)
    from .methods.ratbptt import RaTBPTT

    return RaTBPTT(ds, cfg)


def distill_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The whole `distill` command: config, data, method, loop."""
    from .data import load_dataset
    from .device import resolve_device
    from .distributed import init_from_env, is_main_process, rank_and_world
    from .run import prepare_run_dir, run_distillation

    config = resolve_config(args)
    init = None
    if getattr(args, "init_from", None):
        from .init_from import load_init_set

        config["init_from"] = args.init_from
        init = load_init_set(args.init_from, config)  # checked before any data is read
    device = init_from_env(resolve_device(args.device))
    from .validate import check_fast

    check_fast(config, device)  # --fast on needs CUDA: refused before any data is read or anything is written
    config["processes"] = rank_and_world()[1]  # G x trajectories segments per iteration: --resume keeps G
    estimate = getattr(args, "estimate", False)
    if is_main_process():
        print(describe_defaults(config))
        if not estimate:  # --estimate writes nothing
            prepare_run_dir(args.out, config, args.resume, config_defaults(args.method))
    run_dir = Path(args.out)
    loaded = time.perf_counter()
    ds = load_dataset(config["dataset"], data_dir=args.data_dir, device=device, zca=config["zca"],
                      val_fraction=config["val_fraction"], seed=0, resolution=config["resolution"])
    setup_s = time.perf_counter() - loaded
    from .estimate import check_host_memory, estimate_run, is_host_oom, out_of_memory

    # before experts or steps: a CPU run whose step cannot fit in the memory available is refused with the setting
    memory = check_host_memory(config, ds.spec) if device.type == "cpu" else None
    progress = not args.no_progress
    from .set_eval import parse_models

    parse_models(config.get("eval_models"), ds.spec)  # a model that cannot take these images: say so now
    if init is not None:
        from .init_from import check_init_set

        check_init_set(init, ds)
    method = build_method(config, ds, device, progress, estimate)
    if init is not None:
        from .init_from import apply_init_set

        apply_init_set(method, init)
        print(f"initialised from {args.init_from}")
    loop = LoopConfig(**{k: config[k] for k in LOOP_DEFAULTS}, seed=config["seed"])
    if config.get("epochs"):  # RaT-BPTT's budget in passes over the real data (the published --epochs)
        steps = method.setup.steps_per_epoch
        loop.iterations = config["epochs"] * steps
        print(f"budget: {config['epochs']} epochs x {steps} outer steps per pass over the real data = "
              f"{loop.iterations} iterations")
    if estimate:
        return estimate_run(method, ds, {**config, "iterations": loop.iterations}, device, setup_s=setup_s,
                            memory=memory)
    print(f"distilling {ds.spec.name} with {config['method']} ({config['ipc']} images per class) into {run_dir}")
    import torch  # noqa: PLC0415  (torch is imported lazily in this module)

    try:
        result = run_distillation(method, ds, run_dir, loop, resume=args.resume, progress=progress)
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory(config, "distillation") from None
    except (MemoryError, RuntimeError) as err:
        if not is_host_oom(err):
            raise
        raise out_of_memory(config, "distillation", "host memory") from None
    if is_main_process():  # the HTML report, with the random-real baseline under the same protocol
        from .report import write_report

        page = write_report(run_dir, dataset=ds, device=device, from_run=True, progress=progress)
        print(f"report: {page}")
    return result
