"""Read the published codes' files: distilled sets (MTT/TESLA/DATM `images_*.pt`, RaT-BPTT `.h5`) and MTT expert
buffers (`replay_buffer_{n}.pt`), into a distillery set or expert store.

A published set is a bare tensor in the space its code trained in: mean/std-normalised, or ZCA-whitened (kornia
variant for MTT/TESLA/DATM, KIP variant for RaT-BPTT). The caller names that space (`zca`), and the set gets this
library's fit of the same preprocessing on `dataset`'s train split, so `distillery evaluate` can train on it.
The reference codes fit ZCA on the whole train split; distillery holds out `val_fraction` of it first, so the two
ZCA matrices differ slightly unless `val_fraction=0`.

An MTT buffer is a list of experts, each a list of `epochs + 1` snapshots, each a list of parameter tensors in
`module.parameters()` order (SPEC §4.1). The import checks every snapshot against the model's parameter names and
shapes and refuses a mismatch before writing anything.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from .errors import UserError
from .io import atomic_write_bytes, atomic_write_text
from .synset import SyntheticSet, preprocess_record

# --- distilled sets ---------------------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    """torch.load of plain tensors/lists/dicts only (weights_only), with a one-line error for anything else."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise UserError(f"cannot read {path} as a PyTorch tensor file ({str(err).splitlines()[0][:120]}); "
                        "pass the images_*.pt file the published code saved") from None


def _companion(path: Path, prefix: str) -> Path | None:
    """labels_X.pt / lr_X.pt next to images_X.pt, if present."""
    m = re.fullmatch(r"images_(.*)\.pt", path.name)
    if not m:
        return None
    other = path.with_name(f"{prefix}_{m.group(1)}.pt")
    return other if other.is_file() else None


def read_published_set(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, float | None, str]:
    """(images, labels or None, lr or None, source format) from an images_*.pt (+ labels_*.pt, lr_*.pt) or .h5."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; pass an images_*.pt file (MTT/TESLA/DATM) or a .h5 (RaT-BPTT)")
    if path.suffix in (".h5", ".hdf5"):
        try:
            import h5py
        except ImportError:
            raise UserError("reading .h5 files needs h5py: pip install 'dataset-distillery[h5]'") from None
        try:
            with h5py.File(path, "r") as f:
                if "data" not in f:
                    raise UserError(f"{path} has no 'data' dataset (keys: {', '.join(f.keys())}); a RaT-BPTT "
                                    "checkpoint stores the images as 'data' and the labels as 'label'")
                images = torch.from_numpy(f["data"][()]).float()
                labels = torch.from_numpy(f["label"][()]) if "label" in f else None
        except OSError as err:
            raise UserError(f"cannot read {path} as HDF5 ({err}); pass the .h5 RaT-BPTT saved") from None
        return images, labels, None, "ratbptt-h5"
    obj = _torch_load(path)
    if isinstance(obj, dict):  # a dict {images, labels[, lr]} is accepted too
        if "images" not in obj:
            raise UserError(f"{path} holds a dict without 'images' (keys: {', '.join(map(str, obj))})")
        lr = obj.get("lr")
        return obj["images"].float(), obj.get("labels"), None if lr is None else float(lr), "pt-dict"
    if not isinstance(obj, torch.Tensor):
        raise UserError(f"{path} holds a {type(obj).__name__}, not an images tensor")
    labels_path, lr_path = _companion(path, "labels"), _companion(path, "lr")
    labels = _torch_load(labels_path) if labels_path else None
    lr = None
    if lr_path:
        lr_obj = _torch_load(lr_path)
        lr = float(lr_obj.item() if isinstance(lr_obj, torch.Tensor) else lr_obj)
    return obj.detach().float(), None if labels is None else labels.detach(), lr, "mtt-pt"


def _class_blocked(images: torch.Tensor, labels: torch.Tensor, num_classes: int, path: Path):
    """Hard labels: reorder (stably) into class blocks [0]*ipc + [1]*ipc + ...; refuse unequal class counts.

    Soft/learned labels stay in the file's order: the published codes write class-blocked sets, and a soft label's
    argmax need not be its slot's class."""
    if labels.ndim == 2:
        return images, labels
    hard = labels
    counts = torch.bincount(hard.long(), minlength=num_classes)
    if len(counts) != num_classes or int(counts.min()) != int(counts.max()):
        raise UserError(f"{path} has {counts.tolist()} images per class; a distilled set needs the same number "
                        f"of images in each of the {num_classes} classes")
    order = torch.sort(hard.long(), stable=True).indices
    return images[order], labels[order]


def import_set(path: str | Path, dataset: str, zca: str | None = None, data_dir: str | None = None,
               val_fraction: float = 0.1, lr: float | None = None) -> SyntheticSet:
    """A published set as a SyntheticSet on `dataset`, its images taken to be in the space `zca` names."""
    from .data import load_dataset
    from .data.registry import get_spec

    path = Path(path)
    zca = None if zca in (None, "none") else zca
    if zca not in (None, "kornia", "kip"):
        raise UserError(f"--zca {zca!r}: choose kornia (MTT/TESLA/DATM), kip (RaT-BPTT) or none (mean/std)")
    spec = get_spec(dataset)
    images, labels, file_lr, source = read_published_set(path)
    shape = (spec.channels, *spec.im_size)
    flat = spec.channels * spec.im_size[0] * spec.im_size[1]
    if images.ndim == 2 and images.shape[1] == flat:  # RaT-BPTT keeps its images as (n, c*h*w) embedding rows
        images = images.view(len(images), *shape)
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise UserError(f"{path} holds images of shape {tuple(images.shape)}, but {spec.name} images are "
                        f"(n, {', '.join(map(str, shape))}); pass the matching --dataset")
    if len(images) % spec.num_classes:
        raise UserError(f"{path} has {len(images)} images, not a multiple of the {spec.num_classes} classes")
    ipc = len(images) // spec.num_classes
    if labels is None:  # the published codes build class-blocked labels; assume them when no labels file exists
        labels = torch.arange(spec.num_classes).repeat_interleave(ipc)
    if len(labels) != len(images) or labels.ndim not in (1, 2) or (labels.ndim == 2 and
                                                                  labels.shape[1] != spec.num_classes):
        raise UserError(f"{path}: labels of shape {tuple(labels.shape)} do not fit {len(images)} images of "
                        f"{spec.num_classes} classes")
    if labels.ndim == 1:
        labels, kind = labels.long(), "hard"
    else:
        labels, kind = labels.float(), "learned" if source == "ratbptt-h5" else "soft"
        probabilities = bool((labels >= 0).all()) and torch.allclose(labels.sum(1), torch.ones(len(labels)), atol=1e-3)
        if source == "mtt-pt" and not probabilities:  # logits (DATM's labels_*.pt): it trains on their softmax
            labels, kind = torch.softmax(labels, 1), "learned"
    images, labels = _class_blocked(images, labels, spec.num_classes, path)
    ds = load_dataset(dataset, data_dir=data_dir, zca=zca, val_fraction=val_fraction, seed=0)
    meta = {"method": "imported", "dataset": ds.spec.name, "ipc": ipc, "num_classes": ds.spec.num_classes,
            "class_names": list(ds.spec.class_names), "model": ds.spec.default_model,
            "source": {"file": str(path), "format": source, "space": ds.preprocess.kind}}
    return SyntheticSet(images.contiguous(), labels.contiguous(), kind, lr if lr is not None else file_lr,
                        preprocess_record(ds.preprocess), meta)


# --- expert buffers ---------------------------------------------------------------------------------------------
def buffer_files(directory: str | Path) -> list[Path]:
    """replay_buffer_0.pt, replay_buffer_1.pt, ... in numeric order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"'{directory}' is not a directory; pass the folder holding MTT's replay_buffer_*.pt files")
    files = [p for p in directory.iterdir() if re.fullmatch(r"replay_buffer_\d+\.pt", p.name)]
    if not files:
        raise UserError(f"no replay_buffer_<n>.pt files in {directory}; pass the folder MTT's buffer.py wrote "
                        "(…/{dataset}/{model})")
    return sorted(files, key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def flatten_snapshot(snapshot: Any, names: list[str], shapes: list[tuple[int, ...]], where: str) -> torch.Tensor:
    """One epoch's parameter list as a flat float32 vector, after checking it against the model's layout."""
    if not isinstance(snapshot, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in snapshot):
        raise UserError(f"{where} is not a list of parameter tensors; an MTT buffer is a list of experts, each a "
                        "list of epochs, each a list of tensors in module.parameters() order")
    for i, (t, name, shape) in enumerate(zip(snapshot, names, shapes)):
        if tuple(t.shape) != tuple(shape):
            raise UserError(f"{where}: parameter {i} has shape {tuple(t.shape)} but the model's {name} is "
                            f"{tuple(shape)}; the buffer was trained with another model or width (pass its --model)")
    if len(snapshot) != len(names):
        raise UserError(f"{where} has {len(snapshot)} parameter tensors, the model {len(names)}; the buffer was "
                        "trained with another model (pass its --model)")
    return torch.cat([t.detach().reshape(-1).float() for t in snapshot])


def import_experts(directory: str | Path, dataset: str, model: str, out: str | Path, zca: str | None = None,
                   data_dir: str | None = None, val_fraction: float = 0.1, lr: float = 0.01, batch: int = 256,
                   decay: bool = False) -> "ExpertStore":
    """Convert MTT's replay_buffer_*.pt files into an expert store at `out` and open it.

    `lr`, `batch`, `decay` record the recipe the buffer was trained with (MTT's defaults); they are not in the files.
    """
    from .data import load_dataset
    from .data.registry import get_spec
    from .experts import FORMAT, FORMAT_VERSION, MANIFEST, ExpertStore, layout_of, split_accuracy
    from .models import FunctionalModel, create_model, has_batchnorm

    out = Path(out)
    if not lr > 0 or batch < 1:
        raise UserError(f"--lr must be positive and --batch at least 1 (got {lr}, {batch}): they record the "
                        "experts' training recipe")
    if (out / MANIFEST).exists():
        raise UserError(f"{out} already holds an expert store; pass a new --out")
    zca = None if zca in (None, "none") else zca
    files = buffer_files(directory)
    spec = get_spec(dataset)
    template = create_model(model, spec.channels, spec.num_classes, spec.im_size)
    if has_batchnorm(template):
        raise UserError(f"model '{model}' has BatchNorm, whose running statistics are not in the flat parameters "
                        "trajectory matching uses; MTT buffers of such models cannot be matched")
    fm = FunctionalModel(template)
    names, shapes = list(fm.names), [tuple(s) for s in fm.shapes]
    first = _torch_load(files[0])
    if not isinstance(first, list) or not first or not isinstance(first[0], list) or not first[0]:
        raise UserError(f"{files[0]} is not a list of expert trajectories (lists of per-epoch parameter lists)")
    flatten_snapshot(first[0][0], names, shapes, f"{files[0].name} expert 0 epoch 0")  # refuse before loading data
    ds = load_dataset(dataset, data_dir=data_dir, zca=zca, val_fraction=val_fraction, seed=0)
    layout = layout_of(fm)
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dataset": ds.spec.name, "model": model,
        "channels": spec.channels, "num_classes": spec.num_classes, "im_size": list(spec.im_size),
        "preprocess": {"kind": ds.preprocess.kind, "fingerprint": ds.preprocess.fingerprint()},
        "epochs": None, "lr": lr, "decay": decay, "batch": batch, "dsa_strategy": spec.dsa_strategy, "seed": None,
        "layout": layout, "torch_version": torch.__version__, "experts": [],
        "source": {"format": "mtt-replay-buffer", "files": [str(f) for f in files]}}
    k = 0
    for n, path in enumerate(files):
        buffer, first = (first if n == 0 else _torch_load(path)), None
        if not isinstance(buffer, list):
            raise UserError(f"{path} is not a list of expert trajectories")
        for e, expert in enumerate(buffer):
            where = f"{path.name} expert {e}"
            if not isinstance(expert, list) or len(expert) < 2:
                raise UserError(f"{where} is not a list of at least 2 epoch snapshots")
            if manifest["epochs"] is None:
                manifest["epochs"] = len(expert) - 1
            if len(expert) != manifest["epochs"] + 1:
                raise UserError(f"{where} has {len(expert) - 1} epochs, earlier experts {manifest['epochs']}; "
                                "import buffers of one training run together")
            trajectory = torch.stack([flatten_snapshot(s, names, shapes, f"{where} epoch {t}")
                                      for t, s in enumerate(expert)])
            meta = {"format": FORMAT, "expert": str(k), "seed": "imported", "layout_hash": layout["hash"]}
            data = safetensors_bytes({"trajectory": trajectory.contiguous()}, metadata=meta)
            entry = {"index": k, "file": f"expert_{k:04d}.safetensors", "seed": None,
                     "sha256": hashlib.sha256(data).hexdigest(), "source": f"{path.name}[{e}]",
                     "val_acc": split_accuracy(fm, trajectory[-1], ds.val, torch.device("cpu")),
                     "test_acc": split_accuracy(fm, trajectory[-1], ds.test, torch.device("cpu"))}
            atomic_write_bytes(out / entry["file"], data)
            manifest["experts"].append(entry)
            k += 1
        del buffer
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return ExpertStore.open(out, expect_dataset=ds.spec.name, expect_model=model,
                            expect_fingerprint=ds.preprocess.fingerprint(), expect_layout=fm)
