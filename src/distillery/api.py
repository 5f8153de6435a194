"""The Python API: what the command line does, from a notebook or a script, as strict as the command line.

    from distillery.api import SyntheticSet, distill, evaluate_set, load_dataset

`distill(method, out, preset=None, **options)` runs `distillery distill` (options are its flags with underscores:
`iterations=20`, `eval_every=10`, `threads=1`) and returns what result.json holds; the other names are the library's
own functions: `load_dataset` (data), `evaluate_set` and `random_real_baseline` (the shared evaluation protocol),
`SyntheticSet.load` (a distilled set), `export_set` / `import_set` / `import_experts` (other codes' formats) and
`write_report` (the HTML report). Every argument is checked against the declarations the command line uses (types
and ranges, `cli.options.CommandOptions`) before any work: bad input is one `UserError` line naming the keyword.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Any, Callable

from . import data as _data
from .evaluation import dsa as _evaluate
from .sets import export as _export
from .sets import imports as _imports
from . import report as _report
from .cli.options import CommandOptions
from .errors import UserError
from .config.options import check_known, check_value, option_meta
from .sets.synset import SyntheticSet

__all__ = ["SyntheticSet", "distill", "evaluate_set", "export_set", "import_experts", "import_set", "load_dataset",
           "random_real_baseline", "write_report"]

_DECLARED = option_meta(CommandOptions)
# keyword of an API function -> the CommandOptions declaration it is checked against (where the names differ)
_SAME_AS = {"epochs": "eval_epochs", "fmt": "format", "directory": "dir", "path": "file"}
# keywords naming a file or folder: a str or os.PathLike
_PATHS = ("out", "run_dir", "path", "directory", "data_dir", "experts", "init_from")


def _check_path(where: str, name: str, value: Any, optional: bool) -> None:
    """A file or folder keyword: a str or os.PathLike (None only where the function takes it)."""
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise UserError(f"{where}: {name}={value!r} is not a path; pass a str or pathlib.Path")


def _checked(func: Callable[..., Any], loaded: bool = False) -> Callable[..., Any]:
    """`func` with its arguments checked first: unknown keywords (with close matches), declared options (type and
    range; None only where `func`'s default is None), paths, a set `s`, and (`loaded`) its `dataset` argument, a
    loaded Dataset rather than a name."""
    signature = inspect.signature(func)
    where = f"{func.__name__}()"

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_known(kwargs, signature.parameters, where, lambda n: f"{n}=")
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise UserError(f"{where}: {e}") from None
        for name, value in bound.arguments.items():
            default = signature.parameters[name].default
            if name in _PATHS:
                _check_path(where, name, value, optional=default is None)
            declared = _SAME_AS.get(name, name)
            if name == "s" and not isinstance(value, SyntheticSet):
                raise UserError(f"{where}: s={type(value).__name__} is not a distilled set; pass "
                                "SyntheticSet.load(PATH)")
            if name == "dataset" and loaded:
                if value is not None or default is not None:
                    _check_dataset(where, value)
            elif declared in _DECLARED and name not in (*_PATHS, "device") and (value is not None or
                                                                              default is not None):
                if hasattr(value, "item") and not isinstance(value, (str, bool)):
                    value = bound.arguments[name] = value.item()  # a numpy scalar (a tensor's too): the number
                meta = {**_DECLARED[declared], "none_ok": default is None}
                check_value(name, value, meta, lambda n: f"{where}: {n}=")
                if declared == "zca" and value == "none":
                    bound.arguments[name] = None
        return func(*bound.args, **bound.kwargs)

    return wrapper


def _check_dataset(where: str, ds: Any) -> None:
    """The `dataset` a set is trained or drawn on: a loaded `Dataset`."""
    if not isinstance(ds, _data.Dataset):
        raise UserError(f"{where}: dataset={type(ds).__name__} is not a loaded dataset; pass load_dataset(NAME)")


def _tensors(where: str, x: Any, y: Any, ds: Any) -> tuple[Any, Any]:
    """(x, y) of `evaluate_set` as tensors on the dataset's device and dtype, checked against the dataset: images
    (N, C, H, W) of its shape, finite; labels N class indices in range, or N x classes finite soft labels."""
    import torch

    _check_dataset(where, ds)
    spec = ds.spec
    try:
        x, y = torch.as_tensor(x), torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{where}: x and y must be tensors, arrays or nested lists of numbers ({e})") from None
    shape = (spec.channels, *spec.im_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != shape or len(x) == 0:
        raise UserError(f"{where}: x has shape {tuple(x.shape)}; {spec.name} needs (N, {', '.join(map(str, shape))}) "
                        "images with N >= 1")
    if not (x.is_floating_point() and torch.isfinite(x).all()):
        raise UserError(f"{where}: x must hold finite floating-point images (in the dataset's preprocessed space)")
    if y.dim() == 1 and not y.is_floating_point() and y.dtype != torch.bool:
        if len(y) != len(x):
            raise UserError(f"{where}: {len(y)} labels for {len(x)} images; pass one label per image")
        if int(y.min()) < 0 or int(y.max()) >= spec.num_classes:
            raise UserError(f"{where}: labels must be class indices 0..{spec.num_classes - 1}, found "
                            f"{int(y.min())}..{int(y.max())}")
        y = y.long()
    elif y.dim() == 2 and y.is_floating_point():
        if tuple(y.shape) != (len(x), spec.num_classes) or not torch.isfinite(y).all():
            raise UserError(f"{where}: soft labels must be finite, shape ({len(x)}, {spec.num_classes}); got "
                            f"{tuple(y.shape)}")
    else:
        raise UserError(f"{where}: y must be N class indices (integers) or N x {spec.num_classes} soft labels "
                        f"(floats); got {y.dtype} of shape {tuple(y.shape)}")
    device = ds.train.x.device
    return x.to(device=device, dtype=ds.train.x.dtype), y.to(device=device, dtype=y.dtype if y.dim() == 1 else
                                                               ds.train.x.dtype)


load_dataset = _checked(_data.load_dataset)
random_real_baseline = _checked(_evaluate.random_real_baseline, loaded=True)
export_set = _checked(_export.export_set)
import_set = _checked(_imports.import_set)
import_experts = _checked(_imports.import_experts)
_evaluate_set = _checked(_evaluate.evaluate_set, loaded=True)


@functools.wraps(_evaluate.evaluate_set)
def evaluate_set(x: Any, y: Any, dataset: Any, *args: Any, **kwargs: Any) -> Any:
    """`evaluate.evaluate_set` with its arguments checked: (x, y) may be tensors, numpy arrays or lists."""
    x, y = _tensors("evaluate_set()", x, y, dataset)
    return _evaluate_set(x, y, dataset, *args, **kwargs)


# distill()'s keywords beyond the configuration keys: how the run is done (the same names as the CLI's flags)
_RUN_KEYWORDS = ("resume", "estimate", "device", "data_dir", "no_progress", "init_from", "threads")


def distill(method: str, out: str | Path, preset: str | None = None, **options: Any) -> dict[str, Any]:
    """Distil like `distillery distill --method METHOD --out OUT [--preset P] --flag value ...`; returns result.json.

    The configuration is built from the keywords directly (`distill.resolve_config`, as the CLI does from its
    flags) and checked against the same declarations; nothing is read or written before that."""
    from .distill import DistillOptions, config_keys, run_distill
    from .methods import list_methods
    from .config.options import check_values

    if not isinstance(method, str):
        raise UserError(f"distill(): method={method!r} is not a str; pass one of {', '.join(list_methods())}")
    _check_path("distill()", "out", out, optional=False)
    if preset is not None and not isinstance(preset, str):
        raise UserError(f"distill(): preset={preset!r} is not a str; `distillery presets` lists the names")
    keys = sorted(config_keys() | {"dataset", "zca", "experts", "seed"})
    check_known(options, [*keys, *_RUN_KEYWORDS], "distill()", lambda n: f"{n}=")
    for name in _PATHS:
        if options.get(name) is not None:  # a pathlib.Path is as good as a str; the configuration records the str
            _check_path("distill()", name, options[name], optional=False)
            options[name] = os.fspath(options[name])
    run = {k: options.pop(k) for k in _RUN_KEYWORDS if k in options}
    spell = lambda n: f"distill(): {n}="  # noqa: E731
    check_values(CommandOptions, {k: v for k, v in run.items() if k in _DECLARED}, spell)
    check_values(DistillOptions, {k: v for k, v in run.items() if k in ("resume", "estimate", "init_from")}, spell)
    if run.get("threads"):
        import torch

        torch.set_num_threads(run["threads"])
    from .hostmem import keep_freed_memory

    keep_freed_memory()  # as the command line does
    return run_distill(method, out, options, preset, resume=run.get("resume", False),
                       estimate=run.get("estimate", False), device=run.get("device", "auto"),
                       data_dir=run.get("data_dir"), progress=not run.get("no_progress", False),
                       init_from=run.get("init_from"), api=True)


@_checked
def write_report(run_dir: str | Path, out: str | Path | None = None, baseline: bool = False,
                 data_dir: str | None = None, device: str = "auto") -> Path:
    """Write RUN_DIR/report.html (or `out`), as `distillery report`; `baseline`: first measure the random-real
    baseline under the run's final protocol (trains networks on the run's dataset, found in `data_dir`)."""
    from .evaluation.score import run_baseline

    return _report.write_report(run_dir, out, baseline=run_baseline(run_dir, data_dir, device) if baseline else None)
