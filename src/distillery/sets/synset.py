"""The distilled set: images, labels, learned step size, preprocessing and metadata, in one safetensors file.

File layout (`*.safetensors`):
    tensors  `images` (n, C, H, W) float32 in model space, `labels` (n,) int64 or (n, K) float32, and for a
             fitted preprocessing (ZCA) `pixels` (n, C, H, W): the images with it undone, for grids and exports.
             The fitted matrices themselves are not stored (2 x 3072^2 float32 = 75 MB at 32x32, against 0.2 MB
             for 10 images): evaluation refits them from the dataset, which the recorded fingerprint (kind,
             parameters, digest of the exact fit images) identifies, so a set file alone still evaluates and
             displays.
    metadata (the safetensors string header) `distillery` = JSON with label_kind, lr, preprocess meta, and `meta`
             (method, dataset, ipc, config, seed, library version, ...) with `eval`, the evaluation protocols
             the set was selected and is scored under (`evaluation.protocol`, checked field by field at load).
Loading gives back the same tensors bit for bit.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import __version__
from ..errors import UserError, first_line
from ..evaluation.protocol import recorded_protocols
from ..io import atomic_write_bytes

LABEL_KINDS = ("hard", "soft", "learned")


@dataclass
class SyntheticSet:
    """A class-blocked distilled set (`[0]*ipc + [1]*ipc + ...`) plus everything needed to train on it."""

    images: torch.Tensor
    labels: torch.Tensor
    label_kind: str = "hard"
    lr: float | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)  # {"tensors": {...}, "meta": {...}} of the Preprocess
    meta: dict[str, Any] = field(default_factory=dict)
    pixels: torch.Tensor | None = None  # the images with the preprocessing undone, unclamped (read from a file)

    def __post_init__(self) -> None:
        if self.label_kind not in LABEL_KINDS:
            raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {self.label_kind!r}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    @property
    def num_classes(self) -> int:
        """Number of classes (from the metadata, else from the labels)."""
        if "num_classes" in self.meta:
            return int(self.meta["num_classes"])
        return int(self.labels.shape[1]) if self.labels.ndim == 2 else int(self.labels.max()) + 1

    @property
    def ipc(self) -> int:
        """Images per class."""
        return len(self.images) // self.num_classes

    def prefix(self, k: int) -> "SyntheticSet":
        """The first `k` images of every class: a smaller set (meaningful for boosted RaT-BPTT sets)."""
        if not 1 <= k <= self.ipc:
            raise UserError(f"--ipc {k} is not available: this set has {self.ipc} images per class; use 1..{self.ipc}")
        idx = torch.cat([torch.arange(c * self.ipc, c * self.ipc + k) for c in range(self.num_classes)])
        meta = {**self.meta, "ipc": k, "prefix_of_ipc": self.ipc}
        return SyntheticSet(self.images[idx], self.labels[idx], self.label_kind, self.lr, self.preprocess, meta,
                            None if self.pixels is None else self.pixels[idx])

    # --- file format -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write one safetensors file atomically (a fitted preprocessing as `pixels`, not its matrices)."""
        tensors = {"images": self.images.detach().cpu().contiguous(),
                   "labels": self.labels.detach().cpu().contiguous()}
        if self.pixels is not None or self.preprocess.get("tensors"):
            tensors["pixels"] = self._undone().contiguous()
        header = {"format": "distillery.synset/1", "label_kind": self.label_kind, "lr": self.lr,
                  "preprocess_meta": self.preprocess.get("meta", {}),
                  "meta": {"library_version": __version__, **self.meta}}
        text = json.dumps(header, default=_json_default)
        data = st_save(tensors, metadata={"distillery": text, "sha256": _digest(tensors, text)})
        atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticSet":
        """Read a set written by `save`; a missing or corrupt file gets a clear UserError."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"distilled set '{path}' does not exist; pass the .safetensors file a run wrote "
                            "(e.g. RUN_DIR/best.safetensors)")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read distilled set '{path}' ({e.strerror or e}); check the path and its "
                            "permissions") from None
        try:
            tensors = st_load(raw)
            header_len = int.from_bytes(raw[:8], "little")
            metadata = json.loads(raw[8:8 + header_len])["__metadata__"]
            text = metadata["distillery"]
            header = json.loads(text)
        except (SafetensorError, KeyError, ValueError, TypeError) as e:
            raise UserError(f"'{path}' is not a distillery set file (corrupt or another format: {e}); "
                            "re-export it or point at the right file") from None
        if metadata.get("sha256") != _digest(tensors, text):
            raise UserError(f"distilled set '{path}' is damaged (its sha256 is missing or does not match its "
                            "contents); use another copy, or the run's other set (best/last.safetensors)")
        return _checked(path, tensors, header)

    # --- display -----------------------------------------------------------------------------------------------
    def display_images(self) -> torch.Tensor:
        """Images mapped back to [0, 1] with the stored preprocessing undone (ZCA and mean/std)."""
        return self._undone().clamp(0, 1)

    def _undone(self) -> torch.Tensor:
        """The images with the preprocessing undone, unclamped: the stored pixels, else the inverse map."""
        from ..data.preprocess import Preprocess

        if self.pixels is not None:
            return self.pixels.detach().float().cpu()
        x = self.images.detach().float().cpu()
        if self.preprocess.get("meta"):
            meta = {k: v for k, v in self.preprocess["meta"].items() if k != "fingerprint"}
            x = Preprocess.from_state_dict({**meta, **self.preprocess["tensors"]}).inverse(x)
        return x

    def save_grid(self, path: str | Path, max_per_class: int = 10, scale: int | None = None) -> None:
        """Write a PNG grid: one column per class headed by its name, up to `max_per_class` images down it,
        small images scaled up (`distillery.sets.grid`)."""
        buf = io.BytesIO()
        self.grid_image(max_per_class, scale).save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())

    def grid_image(self, max_per_class: int = 10, scale: int | None = None):
        """The grid of `save_grid` as a PIL image (preprocessing undone, class names from the metadata)."""
        from .grid import render_grid

        return render_grid(self.display_images(), self.num_classes, self.ipc, max_per_class,
                           self.meta.get("class_names"), scale)


def _checked(path: Path, tensors: dict[str, torch.Tensor], header: Any) -> SyntheticSet:
    """The set a file holds, after checking every part that training, evaluation and display use: a file that parses
    but holds something else (another writer, a hand edit with a recomputed digest) is refused here, in one line."""
    from ..data.preprocess import Preprocess

    def bad(what: str) -> UserError:
        return UserError(f"distilled set '{path}' {what}; it was not written by distillery or was changed after: use "
                         "another copy, or the run's other set (best/last.safetensors)")

    if not isinstance(header, dict) or not all(isinstance(header.get(k), dict) for k in ("meta", "preprocess_meta")):
        raise bad("has no distillery header (label_kind, lr, meta, preprocess_meta)")
    if "images" not in tensors or "labels" not in tensors:
        raise bad(f"holds no {'images' if 'images' not in tensors else 'labels'} tensor")
    images, labels, meta = tensors["images"], tensors["labels"], header["meta"]
    if not images.is_floating_point() or images.ndim != 4 or len(images) == 0:
        raise bad(f"holds {images.dtype} images of shape {tuple(images.shape)}, not float (N, C, H, W) with N > 0")
    kind, lr = header.get("label_kind"), header.get("lr")
    if kind not in LABEL_KINDS:
        raise bad(f"has label_kind {kind!r}, not one of {', '.join(LABEL_KINDS)}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                           or lr <= 0):
        raise bad(f"has the learning rate {lr!r}, not a finite number > 0")
    num_classes = meta.get("num_classes")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise bad(f"has num_classes {num_classes!r} in its metadata")
    if kind == "hard":
        if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise bad(f"holds {labels.dtype} hard labels of shape {tuple(labels.shape)}, not integer class ids (N,)")
        top = num_classes if num_classes is not None else len(images)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= top):
            raise bad(f"holds class ids {int(labels.min())}..{int(labels.max())}, outside 0..{top - 1}")
    elif labels.ndim != 2 or not labels.is_floating_point() or (num_classes is not None
                                                                and labels.shape[1] != num_classes):
        raise bad(f"holds {labels.dtype} {kind} labels of shape {tuple(labels.shape)}, not float (N, "
                  f"{num_classes if num_classes is not None else 'K'})")
    if len(labels) != len(images):
        raise bad(f"holds {len(images)} images but {len(labels)} labels")
    classes = num_classes if num_classes is not None else (labels.shape[1] if labels.ndim == 2
                                                           else int(labels.max()) + 1)
    if len(images) % classes:
        raise bad(f"holds {len(images)} images, not the same number for each of its {classes} classes")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise bad(f"holds NaN/inf values in '{name}'")
    for key, want in (("dataset", str), ("model", str), ("class_names", list)):
        if key in meta and meta[key] is not None and not isinstance(meta[key], want):
            raise bad(f"has a {type(meta[key]).__name__} as its {key}")
    pre_meta = header["preprocess_meta"]
    if "pixels" in tensors and tensors["pixels"].shape != images.shape:
        raise bad(f"holds pixels of shape {tuple(tensors['pixels'].shape)} for images {tuple(images.shape)}")
    if pre_meta and "pixels" not in tensors:  # display undoes the preprocessing: it must rebuild
        try:
            Preprocess.from_state_dict({k: v for k, v in pre_meta.items() if k != "fingerprint"})
        except Exception as e:  # a preprocessing that cannot be rebuilt fails in many ways (type, key, shape)
            raise bad(f"holds a preprocessing that cannot be rebuilt ({first_line(e, 100)})") from None
    recorded_protocols(meta, f"distilled set '{path}'")  # every field of the recorded evaluation checked too
    return SyntheticSet(images=images, labels=labels, label_kind=kind, lr=lr,
                        preprocess={"tensors": {}, "meta": pre_meta}, meta=meta, pixels=tensors.get("pixels"))


def preprocess_record(pre) -> dict[str, Any]:
    """What a set stores about its preprocessing: the fitted tensors, the parameters and the fingerprint."""
    return {"tensors": pre.tensors(), "meta": {**pre.meta(), "fingerprint": pre.fingerprint()}}


def _digest(tensors: dict[str, torch.Tensor], header: str) -> str:
    """sha256 over the JSON header and every tensor's name, dtype, shape and bytes: what `load` checks."""
    h = hashlib.sha256(header.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    """JSON fallback for numpy scalars, paths and tuples in configs."""
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
