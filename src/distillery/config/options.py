"""Options declared once: a dataclass field carries its type (the annotation), default, allowed range and help text.

    @dataclass
    class MyConfig:
        ipc: int = option(1, low=1, help="images per class")
        grad: str = option("unrolled", choices=("unrolled", "checkpointed", "tesla"))
        batch_syn: int | None = option(None, low=1, none_ok=True, help="None: the whole set")

`check_options(cfg)` (or `check_values(cls, mapping)`) then raises one `UserError` naming the flag, the value and the
allowed type or range, before any data is read or any expert is trained. The CLI builds every parser from the same
metadata (`cli.options.add_options`), and the Python API checks its keywords against it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from typing import Any, Callable, Iterable, Mapping

from ..errors import UserError


def option(default: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           choices: Iterable[Any] | None = None, none_ok: bool = False, help: str = "",
           high_open: bool = False, none_unset: bool = False, aliases: Iterable[str] = (), switch: bool = False,
           positional: bool = False, resumable: bool = False) -> Any:
    """A dataclass field whose metadata records the allowed values (`low <= v <= high`; `low < v` if low_open,
    `v < high` if high_open). None passes if `none_ok` or the default is None; messages offer `none` as a value
    unless `none_unset` (None then only stands for a flag that was not given and cannot be typed). `resumable`:
    `--resume` may change it (it steers the optimisation or the loop, not what a checkpoint's state means).

    Command-line shape: `aliases` are further spellings (a published flag), `switch` a flag without a value
    (store_true), `positional` an argument without a flag."""
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "none_ok": none_ok or default is None, "none_typed": (none_ok or default is None) and not none_unset,
            "choices": tuple(choices) if choices is not None else None, "help": help,
            "aliases": tuple(aliases), "switch": switch, "positional": positional, "resumable": resumable}
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
    elif meta.get("type") and base_type(meta["type"]) is bool:
        text = "true or false"
    else:
        low, high = meta.get("low"), meta.get("high")
        parts = []
        if low is not None:
            parts.append(f"{'>' if meta.get('low_open') else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if meta.get('high_open') else '<='} {high:g}")
        text = " and ".join(parts) or "any value"
    return text + (" (or none)" if meta.get("none_typed") else "")


def base_type(annotation: str) -> type:
    """The value type an option's (string) annotation declares: bool, int, float or str."""
    for kind in (bool, float, int):
        if kind.__name__ in annotation:
            return kind
    return str


def _type_ok(value: Any, kind: type) -> bool:
    """Whether `value` is of the declared kind (numpy scalars included; an int is a float, a bool is neither)."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, str)


def check_value(name: str, value: Any, meta: Mapping[str, Any], spell: Callable[[str], str] = flag) -> None:
    """Raise UserError if `value` is not of the declared type (when the metadata has one, as `option_meta` gives) or
    outside the declared range of option `name`; `spell` writes the name (a flag for the CLI, `name=` for the API)."""
    if value is None:
        if meta.get("none_ok"):
            return
        raise UserError(f"{spell(name)} needs a value ({describe(meta)})")
    said = f"{spell(name)}{value!r}" if spell(name).endswith("=") else f"{spell(name)} {value!r}"
    kind = base_type(meta["type"]) if meta.get("type") else None
    if kind is not None and not _type_ok(value, kind):
        allowed = describe(meta)
        raise UserError(f"{said} is of type {type(value).__name__}, not {kind.__name__}"
                        + ("" if allowed == "any value" else f": it must be {allowed}"))
    bad = False
    if meta.get("choices") is not None:
        bad = value not in meta["choices"]
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UserError(f"{said} is not a finite number: it must be {describe(meta)}")
        low, high = meta.get("low"), meta.get("high")
        bad = (low is not None and (value <= low if meta.get("low_open") else value < low)) \
            or (high is not None and (value >= high if meta.get("high_open") else value > high))
    if bad:
        raise UserError(f"{said} is out of range: it must be {describe(meta)}")


def option_meta(cls: type) -> dict[str, Mapping[str, Any]]:
    """{field name: metadata, with the field's annotation as "type"} for every `option(...)` field of `cls`."""
    return {f.name: {**f.metadata["option"], "type": str(f.type)} for f in dataclasses.fields(cls)
            if "option" in f.metadata}


def check_values(cls: type, values: Mapping[str, Any], spell: Callable[[str], str] = flag) -> None:
    """Check every declared option of `cls` that appears in `values` (type and range)."""
    for name, meta in option_meta(cls).items():
        if name in values:
            check_value(name, values[name], meta, spell)


def check_known(given: Iterable[str], known: Iterable[str], where: str, spell: Callable[[str], str] = flag) -> None:
    """UserError naming the first of `given` that is not in `known`, with the close matches (typos, old names)."""
    known = list(known)
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(spell(c) for c in close)}?" if close else ""
            raise UserError(f"{where} has no option {spell(name)}{hint}")


def check_options(cfg: Any) -> None:
    """Check every declared option of a dataclass instance."""
    check_values(type(cfg), dataclasses.asdict(cfg))
