"""Run checkpoints in a format that cannot run code: one safetensors file whose tensors are the state's tensors and
whose header metadata holds the rest of the state as JSON (SPEC: never unpickle a user-writable file).

A state is a tree of dicts (any int/str keys), lists, tuples, tensors, ints, floats, bools, strings and None: what a
method's `state_dict()` and a torch optimiser's `state_dict()` hold. Tensors are stored by name (`t0`, `t1`, ...);
the JSON tree refers to them as {"tensor": name}; a tuple is {"tuple": [...]}, a dict {"dict": [[key, value], ...]}
(optimiser states have int keys). A sha256 over the tensors' bytes in the header catches damage safetensors cannot
see. `read_checkpoint` is the one reader: it checks the container, the digest, the tree, the loop fields, that every
floating tensor is finite and, given the method's current state as a template, that tensors keep their dtype, rank
and trailing shape; anything else is "checkpoint X is damaged (...)" on one line.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..errors import UserError
from ..io import atomic_write_bytes

CHECKPOINT = "checkpoint.safetensors"  # the run's checkpoint in RUN_DIR, written every `checkpoint_every` iterations
FORMAT = "distillery-checkpoint"
VERSION = "1"
_FIX = "delete it to start the run again from iteration 0 with the same command, or restore it from a copy"


class _Damaged(Exception):
    """Why a checkpoint's content is not a valid state (turned into the one-line UserError by `read_checkpoint`)."""


def _whole(v: Any) -> bool:
    """An int that is not a bool (True and False are ints to Python, not to the format)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON tree of `obj`, its tensors moved (as CPU copies) into `tensors`."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"tensor": name}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        for k in obj:
            if not (isinstance(k, str) or _whole(k)):
                raise TypeError(f"checkpoint state key {k!r} is not a str or int")
        return {"dict": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"checkpoint state holds a {type(obj).__name__}, which the format does not store")


def _decode(node: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    """Rebuild the state from its JSON tree; a node of any other shape is damage."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors, used) for v in node]
    if isinstance(node, dict) and len(node) == 1:
        (tag, value), = node.items()
        if tag == "tensor" and isinstance(value, str) and value in tensors and value not in used:
            used.add(value)
            return tensors[value]
        if tag == "tuple" and isinstance(value, list):
            return tuple(_decode(v, tensors, used) for v in value)
        if tag == "dict" and isinstance(value, list) and all(
                isinstance(p, list) and len(p) == 2 and (isinstance(p[0], str) or _whole(p[0])) for p in value):
            return {k: _decode(v, tensors, used) for k, v in value}
    raise _Damaged(f"unexpected entry {json.dumps(node)[:60]}")


def write_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` (see the module docstring for what it may hold) atomically as a safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    meta = {"format": FORMAT, "version": VERSION, "state": json.dumps(tree), "sha256": _digest(tensors)}
    atomic_write_bytes(path, save_tensors(tensors, metadata=meta))


def _check_loop(state: Any) -> None:
    """The loop's own fields: iteration, best validation accuracy, metric rows, pending evaluation."""
    if not isinstance(state, dict) or not {"it", "best_val", "rows", "method"} <= set(state):
        raise _Damaged("it lacks the loop state")
    it, pending = state["it"], state.get("pending_eval")
    if not _whole(it) or it < 0:
        raise _Damaged(f"iteration {it!r}")
    if not isinstance(state["best_val"], (int, float)) or isinstance(state["best_val"], bool) \
            or math.isnan(state["best_val"]):
        raise _Damaged(f"best validation accuracy {state['best_val']!r}")
    if pending is not None and (not _whole(pending) or not 0 <= pending <= it):
        raise _Damaged(f"pending evaluation {pending!r}")
    rows = state["rows"]
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and isinstance(r.get("it"), int) and all(
                isinstance(k, str) and (v is None or isinstance(v, (int, float))) for k, v in r.items())
            for r in rows):
        raise _Damaged("its metric rows are not numbers")
    if not isinstance(state["method"], dict):
        raise _Damaged("the method state is not a dict")


def _check_like(loaded: Any, template: Any, where: str) -> None:
    """Tensors present in both trees keep dtype, rank and trailing shape (a set may grow along dim 0, an optimiser
    state appear after its first step); dict keys of the template's top level must all be there."""
    if isinstance(template, torch.Tensor):
        if not isinstance(loaded, torch.Tensor):
            raise _Damaged(f"{where} is not a tensor")
        if loaded.dtype != template.dtype or loaded.dim() != template.dim() or \
                (template.dim() and loaded.shape[1:] != template.shape[1:]):
            raise _Damaged(f"{where} is {loaded.dtype} {list(loaded.shape)}, expected {template.dtype} "
                           f"{['*', *template.shape[1:]] if template.dim() else []}")
    elif isinstance(template, dict):
        if not isinstance(loaded, dict):
            raise _Damaged(f"{where} is not a dict")
        for k, v in template.items():
            if k in loaded:
                _check_like(loaded[k], v, f"{where}.{k}")
            elif where == "method":
                raise _Damaged(f"the method state lacks '{k}'")


def read_checkpoint(path: Path, template: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checked state of checkpoint `path`; `template` (the method's current `state_dict()`) also checks the
    method state's tensors. Any fault is one UserError: "checkpoint PATH is damaged (why); what to do"."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read checkpoint {path} ({err.strerror}); {_FIX}") from None
    try:
        tensors = load_tensors(raw)
        meta = _metadata(raw)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise _Damaged("not a distillery checkpoint of this version")
        if meta.get("sha256") != _digest(tensors):
            raise _Damaged("its sha256 does not match")
        used: set[str] = set()
        state = _decode(json.loads(meta.get("state", "")), tensors, used)
        if used != set(tensors):
            raise _Damaged("it holds tensors its state does not use")
        _check_loop(state)
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise _Damaged("it holds NaN/inf values")
        if template is not None:
            _check_like(state["method"], template, "method")
    except _Damaged as err:
        raise UserError(f"checkpoint {path} is damaged ({err}); {_FIX}") from None
    except (SafetensorError, ValueError, TypeError, RecursionError) as err:
        raise UserError(f"checkpoint {path} is damaged ({type(err).__name__}); {_FIX}") from None
    return state


def _metadata(raw: bytes) -> dict[str, str]:
    """The header metadata of a safetensors file held in `raw` (8-byte little-endian length, then JSON)."""
    if len(raw) < 8:
        raise _Damaged("truncated")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise _Damaged("truncated")
    header = json.loads(raw[8:8 + n])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Damaged("no metadata")
    return meta
