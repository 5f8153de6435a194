"""A seeded fuzzer over the declarations: every declared option of every command, and every declared argument of
every API function, gets wrong-type and out-of-range values. Each must be refused with exit 2 and exactly one
`error:` line naming the option (API: one `UserError` line naming the keyword), no traceback, before any data is
read, and nothing may be written or changed. Built from the declarations, so new options are fuzzed too."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
from pathlib import Path
from typing import Any

import pytest

import distillery.data
from distillery import api
from distillery.cli import build_parser, main
from distillery.cli.options import CommandOptions
from distillery.distill import DistillOptions, config_classes
from distillery.experts import ExpertConfig
from distillery.methods import list_methods
from distillery.errors import UserError
from distillery.config.options import base_type, option_meta

SEED = 20
POSITIONAL = {"kind": "random", "name": "mnist", "set": "set.safetensors", "run_dir": "rundir", "file": "file.pt",
              "dir": "bufdir"}
REQUIRED = {"out": "out", "format": "pt", "dataset": "digits", "model": "ConvNetD2", "method": "mtt"}


def bad_values(meta: dict[str, Any], rng: random.Random) -> list[str]:
    """Command-line texts the declaration refuses: another type, outside the range, not a choice, not finite."""
    kind = base_type(meta["type"])
    if meta["choices"] is not None:
        return ["no-such-choice", str(rng.randint(-9, 9))]
    if kind is bool:
        return ["maybe", "2"]
    if kind is str:
        return []
    values = ["abc", "1e400x"] + ([] if meta["none_typed"] else ["none"])
    values += ["1.5"] if kind is int else ["nan", "inf", "-inf"]
    low, high = meta["low"], meta["high"]
    step = rng.choice([1, 7, 10 ** rng.randint(1, 9)])
    if low is not None:
        values.append(str(low if meta["low_open"] else low - (step if kind is int else rng.uniform(1e-6, step))))
    if high is not None:
        values.append(str(high if meta["high_open"] else high + (step if kind is int else rng.uniform(1e-6, step))))
    return values


def declarations(command: str) -> dict[str, tuple[dict[str, Any], str | None]]:
    """{dest: (declared metadata, the distill method that takes it)} for every declared option of `command`."""
    found: dict[str, tuple[dict[str, Any], str | None]] = {}
    if command == "distill":
        for method in list_methods():
            for cls in config_classes(method):
                for name, meta in option_meta(cls).items():
                    found.setdefault(name, (meta, method))
        for cls in (DistillOptions, CommandOptions):
            for name, meta in option_meta(cls).items():
                found.setdefault(name, (meta, None))
        return found
    classes = [CommandOptions] + ([ExpertConfig] if command == "experts" else [])
    return {name: (meta, None) for cls in classes for name, meta in option_meta(cls).items()}


def cases() -> list[tuple[str, str, list[str], list[str]]]:
    """(command, dest, argv, the spellings one of which the error line must name), seeded."""
    rng = random.Random(SEED)
    parser = build_parser()
    out = []
    for command, sub in parser.commands.items():
        declared = declarations(command)
        actions = [a for a in sub._actions if a.dest in declared and not isinstance(a, argparse._StoreTrueAction)]
        positionals = [a.dest for a in sub._actions if not a.option_strings and a.dest in POSITIONAL]
        for action in actions:
            meta, method = declared[action.dest]
            for value in ["no-such-choice"] if action.choices else bad_values(meta, rng):
                pos = [value if p == action.dest else POSITIONAL[p] for p in positionals]
                argv = [command, *pos]
                for req in (a for a in sub._actions if a.required and a.option_strings and a.dest != action.dest):
                    argv += [req.option_strings[0], method if req.dest == "method" and method else REQUIRED[req.dest]]
                if command in ("distill", "baseline", "experts") and action.dest != "dataset":
                    argv += ["--dataset", "digits"]
                if action.option_strings:
                    argv += [rng.choice(action.option_strings), value]
                out.append((command, action.dest, argv, action.option_strings or [action.dest]))
    return out


CASES = cases()


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """An empty working folder with one pre-existing file and folder; data reads fail the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTILLERY_DATA", str(tmp_path / "data-root"))
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))

    def refuse(*a, **k):
        raise AssertionError("a dataset was read before the arguments were checked")

    monkeypatch.setattr(distillery.data, "load_dataset", refuse)
    (tmp_path / "rundir").mkdir()
    (tmp_path / "rundir" / "config.json").write_text("{}")
    (tmp_path / "precious.txt").write_text("keep me")
    return tmp_path


def test_the_fuzzer_covers_every_command_and_many_values():
    commands = {c for c, *_ in CASES}
    assert {"baseline", "evaluate", "distill", "experts", "show", "export", "import-set", "import-experts",
            "presets"} <= commands
    assert len(CASES) > 300
    dests = {d for c, d, *_ in CASES if c == "distill"}
    assert {"lr_img", "horizon", "real_epochs", "iterations", "val_fraction", "seed", "threads", "dsa",
            "expert_momentum", "method"} <= dests


def test_every_bad_option_value_is_one_line_before_any_work(sandbox, capsys):
    before = tree(sandbox)
    failures = []
    for command, dest, argv, spellings in CASES:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
              and any(s in lines[0] for s in spellings))
        if not ok:
            failures.append(f"{' '.join(argv)} -> {code}: {err.strip()[:300]}")
    assert not failures, "\n".join(failures[:20])
    assert tree(sandbox) == before


# --- the API -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    ds = distillery.data.load_dataset("digits")
    x, y = ds.random_set(1, __import__("torch").Generator().manual_seed(0))
    return ds, x, y


def api_calls(ds, x, y, tmp: Path) -> dict[str, tuple[Any, dict[str, Any]]]:
    """A valid call of every API function (a function and its keywords), the base the fuzzer changes one by one."""
    return {
        "evaluate_set": (lambda **k: api.evaluate_set(x, y, ds, **k), {"runs": 1, "epochs": 1, "lr": 0.01,
                                                                         "batch": 256, "seed": 0, "split": "val",
                                                                         "model": "ConvNetD2", "progress": False}),
        "random_real_baseline": (lambda **k: api.random_real_baseline(ds, **k),
                                 {"ipc": 1, "runs": 1, "epochs": 1, "lr": 0.01, "seed": 0, "split": "val",
                                  "progress": False}),
        "load_dataset": (api.load_dataset, {"name": "digits", "zca": None, "val_fraction": 0.1, "seed": 0,
                                            "resolution": None}),
        "import_set": (api.import_set, {"path": tmp / "file.pt", "dataset": "digits", "zca": "none",
                                        "val_fraction": 0.1, "lr": 0.01}),
        "import_experts": (api.import_experts, {"directory": tmp / "bufdir", "dataset": "digits",
                                                "model": "ConvNetD2", "out": tmp / "store", "zca": "none",
                                                "val_fraction": 0.1, "lr": 0.01, "batch": 256}),
        "export_set": (lambda **k: api.export_set(**k), {"s": api.SyntheticSet(x, y, "hard", None, {}, {}),
                                                         "fmt": "pt", "out": tmp / "exported", "tag": "best"}),
        "write_report": (api.write_report, {"run_dir": tmp / "rundir", "out": tmp / "r.html", "baseline": False}),
        "distill": (lambda **k: api.distill("mtt", k.pop("out", tmp / "run"), **k),
                    {"dataset": "digits", "ipc": 1, "iterations": 2, "lr_img": 100.0, "seed": 0, "threads": 1,
                     "val_fraction": 0.1}),
    }


def api_bad_values(meta: dict[str, Any], rng: random.Random) -> list[Any]:
    """Python values the declaration refuses: other types, out of range, not finite, not a choice."""
    kind = base_type(meta["type"])
    wrong = {int: ["1", 1.5, True, [1]], float: ["0.01", True, float("nan"), float("inf")], bool: ["yes", 1, None],
             str: [3, 1.5, b"x", ["a"]]}[kind]
    values = list(wrong)
    if meta["choices"] is not None:
        values.append("no-such-choice")
    low, high = meta["low"], meta["high"]
    if kind in (int, float) and low is not None:
        values.append(low if meta["low_open"] else low - rng.choice([1, 3, 10 ** 6]))
    if kind in (int, float) and high is not None:
        values.append(high if meta["high_open"] else high + rng.choice([1, 3, 10 ** 6]))
    return values


def test_every_bad_api_argument_is_one_user_error(sandbox, digits, monkeypatch):
    """Every declared keyword of every API function, and unknown keywords and bad paths, refused before work."""
    ds, x, y = digits
    rng = random.Random(SEED)
    declared = option_meta(CommandOptions)
    distill_meta = {n: m for cls in config_classes("mtt") for n, m in option_meta(cls).items()}

    def meta_for(function: str, key: str) -> dict[str, Any] | None:
        if function == "distill" and key in distill_meta:
            return distill_meta[key]
        return declared.get({"epochs": "eval_epochs", "fmt": "format"}.get(key, key))

    before = tree(sandbox)
    failures, count = [], 0
    for name, (call, base) in api_calls(ds, x, y, sandbox).items():
        fuzz: list[tuple[str, Any]] = [("no_such_keyword", 1)] + ([("s", "set.safetensors")] if "s" in base else [])
        fuzz += [(k, v) for k in ("out", "path", "directory", "run_dir") if k in base for v in (None, 3, "")
                 if not (k == "out" and name == "write_report" and v is None)]
        for key in base:
            meta = meta_for(name, key)
            if meta is None or key in ("path", "directory", "run_dir", "out", "s"):
                continue
            fuzz += [(key, v) for v in api_bad_values(meta, rng)]
        for key, value in fuzz:
            if value is None and key in base and base[key] is None:
                continue  # None is this keyword's default
            kwargs = {**base, key: value}
            count += 1
            try:
                call(**kwargs)
                failures.append(f"{name}({key}={value!r}) was accepted")
            except UserError as e:
                if "\n" in str(e) or not (key in str(e) or "no option" in str(e)):
                    failures.append(f"{name}({key}={value!r}): {e}")
            except Exception as e:  # noqa: BLE001  (the fuzzer reports every other exception as a failure)
                failures.append(f"{name}({key}={value!r}): {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures[:20])
    assert count > 80, count
    assert tree(sandbox) == before


def test_declarations_are_dataclass_fields():
    """The fuzzer reads `option(...)` metadata: every field it fuzzes is one."""
    for cls in (CommandOptions, DistillOptions, ExpertConfig):
        assert all("option" in f.metadata for f in dataclasses.fields(cls))
