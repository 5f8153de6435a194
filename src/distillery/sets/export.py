"""Write a distilled set in formats other tools read: `pt` (the published codes' tensors), `imagefolder`, `eccv2024`.

    pt           DIR/images_{tag}.pt  float32 (N, C, H, W) in the set's model space (mean/std or ZCA, as distilled)
                 DIR/labels_{tag}.pt  int64 (N,) or float32 (N, K);  DIR/lr_{tag}.pt  0-d float32 (learned step size)
                 the names MTT/TESLA/DATM save (`images_best.pt`, ...), so their evaluation scripts load them
    imagefolder  DIR/{c:03d}_{class name}/{j:04d}.png at the native resolution with the preprocessing undone, and
                 DIR/labels.json: every file's class and label vector, lr, label kind and preprocessing
    eccv2024     DIR/cifar100.pt or DIR/tinyimagenet.pt: the `res/` folder of the ECCV-2024 dataset-distillation
                 challenge (see docs/INTEROP.md for which parts of that layout are verified)
Every format also writes DIR/export.json saying what the tensors are. Files go through `distillery.io`.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..io import atomic_save_torch, atomic_write_bytes, atomic_write_text, replaced_dir
from .synset import SyntheticSet

FORMATS = ("pt", "imagefolder", "eccv2024")
# The challenge's submission file per dataset and the mean/std its reference test tensors are normalised with.
ECCV2024 = {"cifar100": ("cifar100.pt", (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
            "tiny-imagenet": ("tinyimagenet.pt", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def export_set(s: SyntheticSet, fmt: str, out: str | Path, tag: str = "best", replace: bool = False) -> list[Path]:
    """Write `s` in format `fmt` into directory `out`; return the files written.

    A non-empty `out` is refused unless `replace`; the export is written into a temp folder beside `out` which then
    takes its place whole, so `out` never mixes old and new files and a failed export leaves it as it was."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if fmt == "pt" and not re.fullmatch(r"[\w.-]+", tag):
        raise UserError(f"--tag {tag!r} must be letters, digits, '_', '-' or '.'")
    if fmt == "eccv2024" and s.meta.get("dataset") not in ECCV2024:
        raise UserError(f"the ECCV-2024 challenge has tracks for cifar100 and tiny-imagenet only, this set is "
                        f"'{s.meta.get('dataset')}'; export it with --format pt or imagefolder")
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise UserError(f"out must be a folder path, got {out!r}")
    out = Path(out)
    with replaced_dir(out, replace) as tmp:
        if fmt == "pt":
            files = _export_pt(s, tmp, tag)
        elif fmt == "imagefolder":
            files = _export_imagefolder(s, tmp)
        else:
            files = _export_eccv2024(s, tmp)
        rel = [str(f.relative_to(tmp)) for f in files] + ["export.json"]
        info = {"format": fmt, "dataset": s.meta.get("dataset"), "num_classes": s.num_classes, "ipc": s.ipc,
                "label_kind": s.label_kind, "lr": s.lr, "preprocessing": _preprocess_meta(s), "files": rel[:-1]}
        atomic_write_text(tmp / "export.json", json.dumps(info, indent=1))
    return [out / r for r in rel]


def _preprocess_meta(s: SyntheticSet) -> dict[str, Any]:
    """The set's preprocessing parameters (kind, eps/reg or mean/std, fingerprint), without the matrices."""
    return dict(s.preprocess.get("meta", {}))


def _export_pt(s: SyntheticSet, out: Path, tag: str) -> list[Path]:
    """images/labels/lr tensors as the published codes save them, in the set's model space."""
    files = [out / f"images_{tag}.pt", out / f"labels_{tag}.pt"]
    atomic_save_torch(s.images.detach().cpu().float().contiguous(), files[0])
    atomic_save_torch(s.labels.detach().cpu().contiguous(), files[1])
    if s.lr is not None:
        files.append(out / f"lr_{tag}.pt")
        atomic_save_torch(torch.tensor(float(s.lr)), files[2])
    return files


def _folder_name(c: int, name: str) -> str:
    """`007_horse`: the index first, so sorted folder names give the label order (torchvision ImageFolder)."""
    return f"{c:03d}_" + (re.sub(r"[^\w.-]+", "_", name).strip("_") or str(c))


def _export_imagefolder(s: SyntheticSet, out: Path) -> list[Path]:
    """PNGs at native resolution with the preprocessing undone, one folder per class, plus labels.json."""
    from PIL import Image

    x = (s.display_images().permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    names = s.meta.get("class_names") or [str(c) for c in range(s.num_classes)]
    files, records = [], []
    for i, arr in enumerate(x):
        c, j = divmod(i, s.ipc)  # class-blocked: slot i belongs to class i // ipc (soft labels may argmax elsewhere)
        rel = f"{_folder_name(c, str(names[c]))}/{j:04d}.png"
        img = Image.fromarray(arr[..., 0], "L") if arr.shape[-1] == 1 else Image.fromarray(arr, "RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write_bytes(out / rel, buf.getvalue())
        files.append(out / rel)
        label = s.labels[i].tolist()
        records.append({"file": rel, "class": c, "label": label})
    kind = _preprocess_meta(s).get("kind")
    side = {"format": "distillery-imagefolder/1", "dataset": s.meta.get("dataset"), "class_names": list(names),
            "label_kind": s.label_kind, "lr": s.lr, "preprocessing": _preprocess_meta(s),
            "pixels": "[0, 255] after undoing the preprocessing" + (
                "; zca-kip is not exactly invertible: each image is min-max scaled for display" if kind == "zca-kip"
                else ""),
            "images": records}
    atomic_write_text(out / "labels.json", json.dumps(side, indent=1))
    return files + [out / "labels.json"]


def _export_eccv2024(s: SyntheticSet, out: Path) -> list[Path]:
    """The challenge's `res/` folder: one images tensor in its mean/std space, class-blocked (labels by position)."""
    name, mean, std = ECCV2024[s.meta["dataset"]]
    x01 = s.display_images()
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    images = ((x01 - mean_t) / std_t).float().contiguous()
    atomic_save_torch(images, out / name)
    return [out / name]
