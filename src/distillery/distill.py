"""`distillery distill`: resolve the configuration (defaults <- preset <- flags), build the method, run the loop.

Method options are generated from each method's config dataclass, so a new hyperparameter needs no CLI code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .cli.options import CommandOptions, DataConfig, add_options, option_help
from .errors import UserError
from .methods import get_method, list_methods
from .config.options import check_known, check_values, flag, option, resumable
from .run.config import LoopConfig


LOOP_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LoopConfig) if f.name != "seed"}
@dataclass
class DistillOptions:
    """`distill`'s options that say what to run and where, beside the configuration values."""

    method: str = option("", help="the distillation method")  # choices: list_methods(), known at run time
    out: str | None = option(None, none_unset=True, help="run directory")
    preset: str | None = option(None, help="a named preset (`distillery presets`); flags override it. Default: the "
                                           "preset for this method, dataset and IPC if there is one, else defaults "
                                           "derived from the data (docs/DEFAULTS.md)")
    resume: bool = option(False, switch=True, help="continue the run in --out from its last checkpoint")
    estimate: bool = option(False, switch=True, help="run 3 iterations and one evaluation epoch, print s/iteration, "
                                                     "peak memory and the projected wall time of the whole run; "
                                                     "writes nothing")
    experts: str | None = option(None, help="expert store (MTT/TESLA); default: train and cache them")
    init_from: str | None = option(None, help="start from a saved set (.safetensors of the same dataset and ipc; "
                                              "RaT-BPTT's --ckptname): its images, and its learned labels when the "
                                              "run learns labels")


def _method_configs() -> dict[str, type]:
    """{method name: its config dataclass}, every registered method."""
    return {name: get_method(name).config_class for name in list_methods()}


def _method_help(name: str, methods: dict[str, type]) -> str:
    """--help text of a method option: each method's own text, prefixed by the methods it applies to; one text
    without a prefix when every method declares the same."""
    texts: dict[str, list[str]] = {}
    for method, cls in methods.items():
        for f in dataclasses.fields(cls):
            if f.name == name:
                texts.setdefault(option_help(f, f.default).replace("%%", "%"), []).append(method)
    if len(texts) == 1 and len(next(iter(texts.values()))) == len(methods):
        return next(iter(texts))
    return " | ".join(f"{', '.join(users)}: {text}" for text, users in texts.items())


def add_distill_args(p: argparse.ArgumentParser) -> None:
    """Options of `distillery distill`: a flag not given is absent from the parsed namespace, so we can tell what
    the user set (`resolve_config`)."""
    add_options(p, DistillOptions, ["method", "out"], required=["method", "out"], choices={"method": list_methods()})
    add_options(p, DistillOptions, ["preset", "resume", "estimate", "experts", "init_from"])
    add_options(p, CommandOptions, ["dataset", "zca", "seed"], unset=True)
    seen = {"seed"}
    methods = _method_configs()
    extra = dict.fromkeys(cls for name in list_methods() for cls in get_method(name).option_classes)
    groups = [("run loop", LoopConfig), *((cls.__doc__.splitlines()[0], cls) for cls in extra),
              ("data", DataConfig), *((f"{m} options", c) for m, c in methods.items())]
    for title, cls in groups:
        names = [f.name for f in dataclasses.fields(cls) if f.name not in seen]
        seen.update(names)
        helps = {n: _method_help(n, methods) for n in names} if cls in methods.values() else None
        add_options(p, cls, names, group=title, unset=True, helps=helps)


def config_classes(method: str) -> list[type]:
    """The option dataclasses whose fields make up a `distill` configuration for `method`."""
    method_cls = get_method(method)
    return [method_cls.config_class, LoopConfig, DataConfig, *method_cls.option_classes]


def resume_may_change(method: str) -> frozenset[str]:
    """The configuration keys `--resume` may change for `method`: its options declared `resumable`."""
    return resumable(config_classes(method))


def given_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration values a `distill` command line gave (a flag not given is absent from `args`)."""
    return {k: v for k, v in vars(args).items() if k in config_keys() or k in ("dataset", "zca", "experts", "seed")}


def config_keys() -> set[str]:
    """Every configuration key some method's `distill` takes."""
    return {f.name for m in list_methods() for cls in config_classes(m) for f in dataclasses.fields(cls)}


def _api_spell(name: str) -> str:
    return f"{name}="


def resolve_config(method: str, given: Mapping[str, Any], preset: str | None = None,
                   api: bool = False) -> dict[str, Any]:
    """Defaults of the method, then a preset (named, else the one for this method/dataset/IPC) or defaults derived
    from the data, then every value in `given` (the flags a command line gave, or the API's keywords); `given` is
    checked for types and ranges against the declarations first, the whole configuration before any data is read.
    `api`: name keys as keywords (`lr_img=`) rather than flags in messages."""
    from .data.registry import IMAGEFOLDER_PREFIX, canonical_name
    from .config.defaults import data_facts
    from .config.presets import get_preset, preset_for
    from .config.validate import check_config

    spell = _api_spell if api else flag
    if method not in list_methods():
        raise UserError(f"unknown {'method' if api else '--method'} {method!r}; one of {', '.join(list_methods())}")
    method_cls = get_method(method)
    classes = config_classes(method)
    own = {f.name for cls in classes for f in dataclasses.fields(cls)} | {"dataset", "zca", "experts", "seed"}
    for key in given:  # a value another method takes: refused rather than silently unused
        if key not in own:
            users = [m for m in list_methods()
                     if key in {f.name for c in config_classes(m) for f in dataclasses.fields(c)}]
            if not users:
                check_known([key], sorted(own), f"distill --method {method}", spell)
            option = "method=" if api else "--method "
            raise UserError(f"{spell(key)} is an option of {option}{' / '.join(users)}; {option}{method} does not use "
                            "it")
    for cls in classes:
        check_values(cls, given, spell)
    check_values(CommandOptions, {k: v for k, v in given.items() if k in ("dataset", "zca", "seed")}, spell)
    check_values(DistillOptions, {k: v for k, v in given.items() if k == "experts"}, spell)
    config: dict[str, Any] = {f.name: f.default for cls in classes for f in dataclasses.fields(cls)}
    config.pop("seed", None)
    config.update(method_cls.fixed, method=method, dataset=None, zca=None)
    flags = dict(given)
    name = preset
    dataset = flags.get("dataset")
    if name is None and dataset is not None:
        if not dataset.startswith(IMAGEFOLDER_PREFIX):
            dataset = canonical_name(dataset)
        name = preset_for(method, dataset, flags.get("ipc", config["ipc"]))
    if name is not None:
        chosen = get_preset(name)
        if chosen["method"] != method:
            raise UserError(f"preset {name} is for --method {chosen['method']}, not {method}")
        config.update({k: v for k, v in chosen.items() if k != "note"})
        config["defaults_from"] = f"preset {name}"
    dataset = flags.get("dataset", config.get("dataset"))
    if not dataset:
        raise UserError(f"no dataset given; pass {spell('dataset')}NAME or a preset" if api else
                        "no dataset given; pass --dataset NAME or a --preset")
    facts = data_facts(dataset, flags.get("val_fraction", config["val_fraction"]),
                       flags.get("resolution", config.get("resolution")))
    if name is None:
        config.update(method_cls.derive_defaults(facts, flags.get("ipc", config["ipc"])))
        config["defaults_from"] = "derived from the data (docs/DEFAULTS.md)"
    method_cls.check_given(flags, spell, api)
    config["resolution"] = facts.resolution
    config.update(flags)
    config.setdefault("seed", 0)
    if config["zca"] == "none":
        config["zca"] = None
    if name is not None and "zca" not in flags:
        _check_store_preprocessing(config, name)
    check_config(config, classes, facts)
    method_cls.check_config(config, facts)
    from .experts import ExpertConfig, store_recipe

    if config.get("experts") is not None and ExpertConfig in classes:  # record the store used, not a recipe unused
        config.update(store_recipe(config["experts"], config.get("max_files"), config.get("max_experts")))
    return config


def _check_store_preprocessing(config: dict[str, Any], preset: str) -> None:
    """A given --experts store whose preprocessing is not the ZCA a preset chose: say the preset chose it (the
    fingerprint check at open would only say the fingerprints differ)."""
    if config.get("experts") is None:
        return
    from .data.preprocess import zca_flag
    from .experts import read_manifest

    kind = read_manifest(config["experts"])["preprocess"]["kind"]

    theirs = zca_flag(kind) if kind == "standard" or zca_flag(kind) else kind  # an unknown kind is named as is
    if theirs != config["zca"]:
        raise UserError(f"preset {preset} chose --zca {config['zca'] or 'none'} but the experts in {config['experts']} "
                        f"were trained with --zca {theirs or 'none'}; pass --zca {theirs or 'none'} (or train experts "
                        f"with --zca {config['zca'] or 'none'})")


def describe_defaults(config: dict[str, Any]) -> str:
    """One line saying where the defaults of this run came from, with the derived values."""
    source = config["defaults_from"]
    if not source.startswith("derived"):
        return f"defaults: {source} (flags override it)"
    keys = ["ipc", "zca", "resolution", *get_method(config["method"]).derived_keys, "iterations", "eval_every"]
    values = ", ".join(f"{k}={config[k]}" for k in keys if k in config)
    return f"no preset for {config['method']} on {config['dataset']} at IPC {config['ipc']}: defaults {source}: {values}"


def distill_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The whole `distill` command from its parsed command line."""
    return run_distill(args.method, args.out, given_from_args(args), args.preset, resume=args.resume,
                       estimate=args.estimate, device=args.device, data_dir=args.data_dir,
                       progress=not args.no_progress, init_from=args.init_from)


def run_distill(method: str, out: str | Path, given: Mapping[str, Any], preset: str | None = None, *,
                resume: bool = False, estimate: bool = False, device: str = "auto", data_dir: str | None = None,
                progress: bool = True, init_from: str | None = None, api: bool = False) -> dict[str, Any]:
    """Config, data, method, loop: `distill` from the values a user gave (`resolve_config`)."""
    from .data import load_dataset
    from .device import resolve_device
    from .distributed import init_from_env, is_main_process, rank_and_world
    from .run.loop import run_distillation
    from .run.resume import prepare_run_dir

    started = time.time()
    config = resolve_config(method, given, preset, api=api)
    init = None
    if init_from:
        from .sets.init_from import load_init_set

        config["init_from"] = init_from
        init = load_init_set(init_from, config)  # checked before any data is read
    device = init_from_env(resolve_device(device))
    from .config.validate import check_fast

    check_fast(config, device)  # --fast on needs CUDA: refused before any data is read or anything is written
    config["processes"] = rank_and_world()[1]  # G x trajectories segments per iteration: --resume keeps G
    if is_main_process():
        print(describe_defaults(config))
        if not estimate:  # --estimate writes nothing
            prepare_run_dir(out, config, resume, resume_may_change(method))
    run_dir = Path(out)
    loaded = time.perf_counter()
    ds = load_dataset(config["dataset"], data_dir=data_dir, device=device, zca=config["zca"],
                      val_fraction=config["val_fraction"], seed=0, resolution=config["resolution"])
    setup_s = time.perf_counter() - loaded
    from .run.estimate import check_host_memory, estimate_run, oom_explained

    # before experts or steps: a CPU run whose step cannot fit in the memory available is refused with the setting
    memory = check_host_memory(config, ds.spec) if device.type == "cpu" else None
    from .evaluation.score import parse_models

    parse_models(config.get("eval_models"), ds.spec)  # a model that cannot take these images: say so now
    if init is not None:
        from .sets.init_from import check_init_set

        check_init_set(init, ds)
    t = time.time()
    method_obj = get_method(method).build(config, ds, device, progress, estimate)
    setup_seconds = time.time() - t  # MTT/TESLA: training (or checking) the experts
    if init is not None:
        method_obj.init_from(init)
        print(f"initialised from {init_from}")
    loop = LoopConfig(**{k: config[k] for k in LOOP_DEFAULTS}, seed=config["seed"])
    loop.iterations, budget = method_obj.budget(config)
    if budget:
        print(budget)
    if estimate:
        return estimate_run(method_obj, ds, {**config, "iterations": loop.iterations}, device, setup_s=setup_s,
                            memory=memory)
    print(f"distilling {ds.spec.name} with {config['method']} ({config['ipc']} images per class) into {run_dir}")
    with oom_explained(config, "distillation"):
        result = run_distillation(method_obj, ds, run_dir, loop, resume=resume, progress=progress)
    if is_main_process():  # the HTML report, with the random-real baseline under the same protocol
        from .evaluation.score import measure_baseline
        from .io import atomic_write_text
        from .report import write_report

        t = time.time()
        baseline = measure_baseline(ds, run_dir, progress)
        # result.json's `seconds` is the loop with its evaluations; the other parts of the command apart, and in all
        result.update(seconds_experts=setup_seconds, seconds_baseline=time.time() - t,
                      seconds_total=time.time() - started)
        atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2))
        print(f"report: {write_report(run_dir, baseline=baseline, device=device, from_run=True)}")
    return result
