"""The distilled set: images, labels, learned step size, preprocessing and metadata, in one safetensors file.

File layout (`*.safetensors`):
    tensors  `images` (n, C, H, W) float32 in model space, `labels` (n,) int64 or (n, K) float32,
             and the preprocessing tensors under `preprocess.<name>` (mean/std, ZCA matrices).
    metadata (the safetensors string header) `distillery` = JSON with label_kind, lr, preprocess meta, and `meta`
             (method, dataset, ipc, config, seed, library version, ...).
Loading gives back the same tensors bit for bit.
"""

from __future__ import annotations

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

from . import __version__
from .errors import UserError
from .io import atomic_write_bytes

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

    def hard_labels(self) -> torch.Tensor:
        """Class ids (argmax for soft/learned labels)."""
        return self.labels if self.labels.ndim == 1 else self.labels.argmax(1)

    def prefix(self, k: int) -> "SyntheticSet":
        """The first `k` images of every class: a smaller set (meaningful for boosted RaT-BPTT sets)."""
        if not 1 <= k <= self.ipc:
            raise UserError(f"--ipc {k} is not available: this set has {self.ipc} images per class; use 1..{self.ipc}")
        idx = torch.cat([torch.arange(c * self.ipc, c * self.ipc + k) for c in range(self.num_classes)])
        meta = {**self.meta, "ipc": k, "prefix_of_ipc": self.ipc}
        return SyntheticSet(self.images[idx], self.labels[idx], self.label_kind, self.lr, self.preprocess, meta)

    def to(self, device: torch.device | str) -> "SyntheticSet":
        """The same set with its tensors on `device`."""
        return SyntheticSet(self.images.to(device), self.labels.to(device), self.label_kind, self.lr,
                            self.preprocess, self.meta)

    # --- file format -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write one safetensors file atomically."""
        tensors = {"images": self.images.detach().cpu().contiguous(),
                   "labels": self.labels.detach().cpu().contiguous()}
        for name, t in self.preprocess.get("tensors", {}).items():
            tensors[f"preprocess.{name}"] = t.detach().cpu().contiguous()
        header = {"format": "distillery.synset/1", "label_kind": self.label_kind, "lr": self.lr,
                  "preprocess_meta": self.preprocess.get("meta", {}),
                  "meta": {"library_version": __version__, **self.meta}}
        data = st_save(tensors, metadata={"distillery": json.dumps(header, default=_json_default)})
        atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticSet":
        """Read a set written by `save`; a missing or corrupt file gets a clear UserError."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"distilled set '{path}' does not exist; pass the .safetensors file a run wrote "
                            "(e.g. RUN_DIR/best.safetensors)")
        raw = path.read_bytes()
        try:
            tensors = st_load(raw)
            header_len = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8:8 + header_len])["__metadata__"]["distillery"]
            header = json.loads(header)
        except (SafetensorError, KeyError, ValueError, TypeError) as e:
            raise UserError(f"'{path}' is not a distillery set file (corrupt or another format: {e}); "
                            "re-export it or point at the right file") from None
        pre_tensors = {k[len("preprocess."):]: v for k, v in tensors.items() if k.startswith("preprocess.")}
        return cls(images=tensors["images"], labels=tensors["labels"], label_kind=header["label_kind"],
                   lr=header["lr"], preprocess={"tensors": pre_tensors, "meta": header["preprocess_meta"]},
                   meta=header["meta"])

    # --- display -----------------------------------------------------------------------------------------------
    def display_images(self) -> torch.Tensor:
        """Images mapped back to [0, 1] with the stored preprocessing undone (ZCA and mean/std)."""
        from .data.preprocess import Preprocess

        x = self.images.detach().float().cpu()
        if self.preprocess.get("meta"):
            meta = {k: v for k, v in self.preprocess["meta"].items() if k != "fingerprint"}
            x = Preprocess.from_state_dict({**meta, **self.preprocess["tensors"]}).inverse(x)
        return x.clamp(0, 1)

    def save_grid(self, path: str | Path, max_per_class: int = 10) -> None:
        """Write a PNG grid: one column per class, up to `max_per_class` images of it down the column."""
        from PIL import Image

        x = self.display_images()
        c, h, w = x.shape[1:]
        k, ipc = self.num_classes, self.ipc
        rows = min(ipc, max_per_class)
        grid = torch.ones(c, rows * (h + 1) + 1, k * (w + 1) + 1)
        for cls in range(k):
            for j in range(rows):
                top, left = 1 + j * (h + 1), 1 + cls * (w + 1)
                grid[:, top:top + h, left:left + w] = x[cls * ipc + j]
        scale = max(1, math.ceil(256 / max(grid.shape[1], grid.shape[2])))
        arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        arr = arr.repeat(scale, 0).repeat(scale, 1)
        img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())


def preprocess_record(pre) -> dict[str, Any]:
    """What a set stores about its preprocessing: the fitted tensors, the parameters and the fingerprint."""
    return {"tensors": pre.tensors(), "meta": {**pre.meta(), "fingerprint": pre.fingerprint()}}


def _json_default(o: Any) -> Any:
    """JSON fallback for numpy scalars, paths and tuples in configs."""
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
