"""`distillery distill`: resolve the configuration (defaults <- preset <- flags), build the method, run the loop.

Method options are generated from each method's config dataclass, so a new hyperparameter needs no CLI code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from .errors import UserError

LOOP_DEFAULTS = {"iterations": 1000, "eval_every": 100, "eval_runs": 3, "eval_epochs": 300, "eval_model": None,
                 "final_eval_runs": 5, "checkpoint_every": 10}
EXPERT_DEFAULTS = {"num_experts": 10, "expert_epochs_train": 50, "expert_lr": 0.01}


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
    """argparse type for a dataclass field from its (string) annotation."""
    if "bool" in annotation:
        return _parse_bool
    if "float" in annotation:
        return float
    if "int" in annotation:
        return lambda s: None if s.lower() == "none" else int(s)
    return str


def add_distill_args(p: argparse.ArgumentParser) -> None:
    """Options of `distillery distill`; every default is None so we can tell what the user set."""
    p.add_argument("--method", required=True, choices=["mtt", "tesla", "ratbptt"])
    p.add_argument("--preset", default=None, help="a named preset (`distillery presets`); flags override it")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--dataset", default=None)
    p.add_argument("--zca", default=None, choices=["kornia", "kip", "none"])
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--experts", default=None, help="expert store (MTT/TESLA); default: train and cache them")
    for name in [*LOOP_DEFAULTS, *EXPERT_DEFAULTS]:
        p.add_argument("--" + name.replace("_", "-"), default=None,
                       type=str if name == "eval_model" else (float if name == "expert_lr" else int))
    seen = {"seed", *LOOP_DEFAULTS, *EXPERT_DEFAULTS}
    group = p.add_argument_group("method options (defaults: the method's config, then the preset)")
    for method, cls in _method_configs().items():
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            group.add_argument("--" + f.name.replace("_", "-"), default=None, type=_arg_type(str(f.type)),
                               help=f"{method}: default {f.default}")


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults of the method, then the preset, then every flag the user gave."""
    from .presets import get_preset

    cls = _method_configs()[args.method]
    config: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(cls)}
    if args.method == "tesla":
        config["grad"] = "tesla"
    config.update(LOOP_DEFAULTS)
    if args.method in ("mtt", "tesla"):
        config.update(EXPERT_DEFAULTS)
    config.update(method=args.method, dataset=None, zca=None)
    if args.preset:
        preset = get_preset(args.preset)
        if preset["method"] != args.method:
            raise UserError(f"preset {args.preset} is for --method {preset['method']}, not {args.method}")
        config.update({k: v for k, v in preset.items() if k != "note"})
    for key in list(config) + ["val_fraction", "experts", "seed"]:
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    if config["zca"] == "none":
        config["zca"] = None
    if not config.get("dataset"):
        raise UserError("no dataset given; pass --dataset NAME or a --preset")
    return config


def _experts_for(config: dict[str, Any], ds, device, progress: bool):
    """Open the expert store the run needs, training and caching it first if no --experts was given."""
    from .experts import ExpertStore, train_experts
    from .models import FunctionalModel, create_model

    spec = ds.spec
    model = config["model"] or spec.default_model
    fm = FunctionalModel(create_model(model, spec.channels, spec.num_classes, spec.im_size))
    path = config.get("experts")
    if path is None:
        cache = Path(os.environ.get("DISTILLERY_CACHE", Path.home() / ".cache" / "distillery"))
        key = (f"{spec.name.replace(':', '_').replace('/', '_')}-{model}-{ds.preprocess.fingerprint()[:10]}"
               f"-n{config['num_experts']}-e{config['expert_epochs_train']}-lr{config['expert_lr']:g}-s{config['seed']}")
        path = cache / "experts" / key
        print(f"no --experts given: training {config['num_experts']} experts x {config['expert_epochs_train']} "
              f"epochs into the cache {path} (reused by later runs)")
        train_experts(ds, model, config["num_experts"], epochs=config["expert_epochs_train"], lr=config["expert_lr"],
                      out_dir=path, device=device, seed=config["seed"], progress=progress)
    return ExpertStore.open(path, expect_dataset=spec.name, expect_model=model,
                            expect_fingerprint=ds.preprocess.fingerprint(), expect_layout=fm)


def build_method(config: dict[str, Any], ds, device, progress: bool = True):
    """Instantiate the method object for the shared loop."""
    cls = _method_configs()[config["method"]]
    cfg = cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})
    if config["method"] in ("mtt", "tesla"):
        from .methods.mtt import MTT

        return MTT(ds, _experts_for(config, ds, device, progress), cfg)
    from .methods.ratbptt import RaTBPTT

    return RaTBPTT(ds, cfg)


def distill_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The whole `distill` command: config, data, method, loop."""
    from .data import load_dataset
    from .device import resolve_device
    from .distributed import init_from_env, is_main_process
    from .run import LoopConfig, prepare_run_dir, run_distillation

    config = resolve_config(args)
    device = init_from_env(resolve_device(args.device))
    if is_main_process():
        prepare_run_dir(args.out, config, args.resume)
    run_dir = Path(args.out)
    ds = load_dataset(config["dataset"], data_dir=args.data_dir, device=device, zca=config["zca"],
                      val_fraction=config["val_fraction"], seed=0)
    progress = not args.no_progress
    method = build_method(config, ds, device, progress)
    loop = LoopConfig(**{k: config[k] for k in LOOP_DEFAULTS}, seed=config["seed"])
    print(f"distilling {ds.spec.name} with {config['method']} ({config['ipc']} images per class) into {run_dir}")
    return run_distillation(method, ds, run_dir, loop, resume=args.resume, progress=progress)
