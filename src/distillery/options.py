"""Options declared once: a dataclass field carries its default, its allowed range and its help text.

    @dataclass
    class MyConfig:
        ipc: int = option(1, low=1, help="images per class")
        grad: str = option("unrolled", choices=("unrolled", "checkpointed", "tesla"))
        batch_syn: int | None = option(None, low=1, none_ok=True, help="None: the whole set")

`check_options(cfg)` (or `check_values(cls, mapping)`) then raises one `UserError` naming the flag, the value and the
allowed range, before any data is read or any expert is trained. The CLI reads the same metadata for its help.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

from .errors import UserError


def option(default: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           choices: Iterable[Any] | None = None, none_ok: bool = False, help: str = "",
           high_open: bool = False, none_unset: bool = False, resumable: bool = False) -> Any:
    """A dataclass field whose metadata records the allowed values (`low <= v <= high`; `low < v` if low_open,
    `v < high` if high_open). None passes if `none_ok` or the default is None; messages offer `none` as a value
    unless `none_unset` (None then only stands for a flag that was not given and cannot be typed). `resumable`:
    `--resume` may change it (it steers the optimisation or the loop, not what a checkpoint's state means)."""
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "none_ok": none_ok or default is None, "none_typed": (none_ok or default is None) and not none_unset,
            "choices": tuple(choices) if choices is not None else None, "help": help, "resumable": resumable}
    return dataclasses.field(default=default, metadata={"option": meta})


def redefault(cls: type, name: str, default: Any) -> Any:
    """Option `name` of dataclass `cls` with another default: a subclass field that keeps its one declaration."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=default, metadata=field.metadata)


def resumable(classes: Iterable[type]) -> frozenset[str]:
    """The options of these dataclasses that `--resume` may change (declared with `resumable=True`)."""
    return frozenset(name for cls in classes for name, meta in option_meta(cls).items() if meta.get("resumable"))


def flag(name: str) -> str:
    """The command-line spelling of a field name: batch_syn -> --batch-syn."""
    return "--" + name.replace("_", "-")


def describe(meta: Mapping[str, Any]) -> str:
    """The allowed range in words, for error messages and --help."""
    if meta.get("choices"):
        text = "one of " + ", ".join(str(c) for c in meta["choices"])
    else:
        low, high = meta.get("low"), meta.get("high")
        parts = []
        if low is not None:
            parts.append(f"{'>' if meta.get('low_open') else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if meta.get('high_open') else '<='} {high:g}")
        text = " and ".join(parts) or "any value"
    return text + (" (or none)" if meta.get("none_typed") else "")


def check_value(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Raise UserError if `value` is outside the declared range of option `name`."""
    if value is None:
        if meta.get("none_ok"):
            return
        raise UserError(f"{flag(name)} needs a value ({describe(meta)})")
    bad = False
    if meta.get("choices") is not None:
        bad = value not in meta["choices"]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = meta.get("low"), meta.get("high")
        bad = not math.isfinite(value) or (low is not None and (value <= low if meta.get("low_open") else value < low)) \
            or (high is not None and (value >= high if meta.get("high_open") else value > high))
    if bad:
        raise UserError(f"{flag(name)} {value!r} is out of range: it must be {describe(meta)}")


def option_meta(cls: type) -> dict[str, Mapping[str, Any]]:
    """{field name: range metadata} for every `option(...)` field of dataclass `cls`."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(cls) if "option" in f.metadata}


def check_values(cls: type, values: Mapping[str, Any]) -> None:
    """Check every declared option of `cls` that appears in `values`."""
    for name, meta in option_meta(cls).items():
        if name in values:
            check_value(name, values[name], meta)


def check_options(cfg: Any) -> None:
    """Check every declared option of a dataclass instance."""
    check_values(type(cfg), dataclasses.asdict(cfg))
