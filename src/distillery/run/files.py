"""The one checked reader of each run-directory file a run writes and later commands read back: config.json,
result.json, report.json and metrics.csv.

A missing file is None (a run stopped early has no result.json); a file whose bytes, syntax or content are not what
a run writes is one UserError, "NAME in RUN_DIR is damaged: why; what to do", never a traceback or a silent {}.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from ..errors import UserError, first_line

_FIXES = {"config.json": "restore it, or delete the run directory to start over",
          "metrics.csv": "restore it, or continue the run with --resume, which rewrites it from the checkpoint",
          "result.json": "restore it, or continue the run with --resume, which measures and writes it again",
          "report.json": "delete it: `distillery report --baseline` measures it again"}


def _damaged(run_dir: Path, name: str, why: str) -> UserError:
    """The one-line error for a damaged run file."""
    return UserError(f"{name} in {run_dir} is damaged: {why}; {_FIXES[name]}")


def _text(run_dir: Path, name: str) -> str | None:
    """The file's UTF-8 text, None when it does not exist."""
    path = Path(run_dir) / name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}); check its permissions") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _damaged(Path(run_dir), name, f"byte {err.start} is not UTF-8 text") from None


def read_json_file(run_dir: str | Path, name: str) -> dict[str, Any] | None:
    """A JSON object file of RUN_DIR (config.json, result.json, report.json), checked; None when missing."""
    run_dir = Path(run_dir)
    text = _text(run_dir, name)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as err:
        raise _damaged(run_dir, name, f"not JSON ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise _damaged(run_dir, name, f"it holds a JSON {type(data).__name__}, not an object")
    return data


def read_config(run_dir: str | Path) -> dict[str, Any] | None:
    """config.json: an object whose `history`, if any, is a list of objects; None when missing."""
    cfg = read_json_file(run_dir, "config.json")
    if cfg is not None:
        history = cfg.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise _damaged(Path(run_dir), "config.json", "its history is not a list of entries")
        if not isinstance(cfg.get("environment", {}), dict):
            raise _damaged(Path(run_dir), "config.json", "its environment is not an object")
    return cfg


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    """result.json: an object whose `best` and `last`, if present, are objects with a numeric test_mean."""
    result = read_json_file(run_dir, "result.json")
    for key in ("best", "last"):
        if result is not None and key in result:
            entry = result[key]
            if not isinstance(entry, dict) or not isinstance(entry.get("test_mean"), (int, float)):
                raise _damaged(Path(run_dir), "result.json", f"its '{key}' entry has no test accuracy")
    return result


def read_metrics(run_dir: str | Path) -> list[dict[str, float]] | None:
    """metrics.csv as rows {column: value} (empty cells left out): an `it` column of whole numbers and numbers
    everywhere else; None when missing."""
    run_dir = Path(run_dir)
    text = _text(run_dir, "metrics.csv")
    if text is None:
        return None
    rows: list[dict[str, float]] = []
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames and "it" not in reader.fieldnames:
            raise ValueError("no 'it' column")
        for n, row in enumerate(reader, start=2):
            if None in row or any(v is None for v in row.values()):
                raise ValueError(f"line {n} has another number of cells than the header")
            values = {k: float(v) for k, v in row.items() if v != ""}
            it = values.get("it")
            if it is None or not math.isfinite(it) or it != int(it) or it < 0:
                raise ValueError(f"line {n} has no iteration number")
            rows.append(values)
    except (ValueError, csv.Error) as err:
        raise _damaged(run_dir, "metrics.csv", first_line(err)) from None
    return rows
