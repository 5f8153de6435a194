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

Each kind of file has one reader that checks what it returns before anything uses it (types, shapes, dtypes, finite
values, ranges; docs/INTEROP.md lists them): `read_pt_set`, `read_h5_set` (with RaT-BPTT's learned labels from the
`.pth` beside a final `.h5`), `read_replay_buffer`. `.pt`/`.pth` files are read only with `weights_only=True`.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..checks import check_trajectory, real_dtype, require_finite
from ..errors import UserError, first_line
from ..evaluation.protocol import published_protocol
from .synset import SyntheticSet, preprocess_record

if TYPE_CHECKING:
    from ..experts import ExpertStore

# --- distilled sets ---------------------------------------------------------------------------------------------
IMAGE_LIMIT = 1e4  # |value| far beyond what images reach in a model space (mean/std or ZCA), even distilled ones
FIX_SET = "pass the images_*.pt / .h5 file the published code saved"


@dataclass
class PublishedSet:
    """What a published set file held, checked: images (float, or uint8 / whole-number pixels when `pixels`), labels
    (None: none in the files), lr (None: none in the files), and where each came from, for the import message."""

    images: torch.Tensor
    labels: torch.Tensor | None
    lr: float | None
    source: str
    labels_from: str
    lr_from: str
    pixels: bool = False


def read_torch_file(path: Path, fix: str) -> Any:
    """torch.load of plain tensors/lists/dicts only (weights_only: nothing in the file can run code), with a one-line
    error for anything else: an empty, truncated or damaged file, or pickled objects."""
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickle protocols: the file is refused or read anyway
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling and zip errors come in many types
        raise UserError(f"cannot read {path} as a PyTorch tensor file ({first_line(err, 120)}); {fix}") from None


def _images(x: Any, path: Path) -> tuple[torch.Tensor, bool]:
    """Checked images (float32) and whether they are raw pixels 0..255 (uint8, or floats that are all whole
    numbers in 0..255 with some above 1) rather than images in model space."""
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{path} holds a {type(x).__name__}, not an images tensor; {FIX_SET}")
    if not real_dtype(x):
        raise UserError(f"{path} holds {x.dtype} images; images are real numbers (float, or uint8 pixels): "
                        f"{FIX_SET}")
    if x.ndim not in (2, 4) or x.numel() == 0:
        raise UserError(f"{path} holds images of shape {tuple(x.shape)}; a set is (N, C, H, W) or (N, C*H*W) with "
                        f"N > 0: {FIX_SET}")
    x = x.detach()
    require_finite(x, str(path), "the images", "the set diverged while it was distilled; use an earlier one")
    if x.dtype == torch.uint8:
        return x.float(), True
    x = x.float()
    if float(x.min()) >= 0 and float(x.max()) <= 255 and float(x.max()) > 1 and bool((x == x.round()).all()):
        return x, True
    if float(x.abs().max()) > IMAGE_LIMIT:
        raise UserError(f"{path}: image values reach {float(x.abs().max()):.3g}, beyond any model space (|x| <= "
                        f"{IMAGE_LIMIT:g}); the file is damaged or not a set: {FIX_SET}")
    return x, False


def _labels(y: Any, path: Path) -> torch.Tensor:
    """Checked labels: integer class ids >= 0 (N,) as int64, or finite soft/learned labels (N, K) as float32."""
    if not isinstance(y, torch.Tensor):
        raise UserError(f"{path} holds a {type(y).__name__}, not a labels tensor; labels are class ids (N,) or "
                        "soft labels (N, K)")
    if not real_dtype(y):
        raise UserError(f"{path} holds {y.dtype} labels; labels are integer class ids (N,) or float soft labels (N, K)")
    y = y.detach()
    if y.ndim == 1:
        if y.is_floating_point():
            raise UserError(f"{path} holds 1-D {y.dtype} labels; hard labels are integer class ids, soft labels "
                            "(N, K) floats")
        if len(y) and int(y.min()) < 0:
            raise UserError(f"{path} holds the class id {int(y.min())}; class ids run from 0")
        return y.long()
    if y.ndim == 2:
        require_finite(y, str(path), "the soft labels", "the labels diverged while they were learned; use an "
                                                         "earlier set")
        return y.float()
    raise UserError(f"{path} holds labels of shape {tuple(y.shape)}; labels are (N,) class ids or (N, K) soft labels")


def _lr(v: Any, where: str, fix: str = "pass --lr instead") -> float:
    """A checked learning rate: one real finite number > 0 (a 0-d or 1-element tensor, or a Python number)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or not real_dtype(v):
            raise UserError(f"{where} holds a {v.dtype} tensor of shape {tuple(v.shape)}, not one learning rate; "
                            f"{fix}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{where} holds a {type(v).__name__}, not a learning rate; {fix}")
    if not math.isfinite(v) or v <= 0:
        raise UserError(f"{where}: the learning rate {v:.6g} cannot train anything (it must be a finite number > 0); "
                        f"{fix}")
    return float(v)


def _companion(path: Path, prefix: str) -> Path | None:
    """labels_X.pt / lr_X.pt next to images_X.pt, if present."""
    m = re.fullmatch(r"images_(.*)\.pt", path.name)
    if not m:
        return None
    other = path.with_name(f"{prefix}_{m.group(1)}.pt")
    return other if other.is_file() else None


def read_pt_set(path: Path, read_lr: bool = True) -> PublishedSet:
    """An MTT/TESLA/DATM images_X.pt with labels_X.pt and lr_X.pt beside it when present, or one .pt holding a
    dict {images, labels[, lr]}; every part checked (the lr only when `read_lr`: --lr replaces it)."""
    obj = read_torch_file(path, FIX_SET)
    if isinstance(obj, dict):
        if "images" not in obj:
            raise UserError(f"{path} holds a dict without 'images' (keys: {', '.join(map(str, obj))}); "
                            "a dict set is {images, labels[, lr]}")
        images, pixels = _images(obj["images"], path)
        labels = None if obj.get("labels") is None else _labels(obj["labels"], path)
        lr = None if obj.get("lr") is None or not read_lr else _lr(obj["lr"], f"{path}['lr']")
        return PublishedSet(images, labels, lr, "pt-dict",
                            "labels from its 'labels'" if labels is not None else "class-blocked hard labels: the "
                            f"dict in {path.name} has no 'labels'",
                            "lr from its 'lr'" if lr is not None else f"none: the dict in {path.name} has no 'lr'",
                            pixels)
    images, pixels = _images(obj, path)
    labels_path, lr_path = _companion(path, "labels"), _companion(path, "lr") if read_lr else None
    labels = None if labels_path is None else _labels(read_torch_file(labels_path, FIX_SET), labels_path)
    labels_from = f"labels from {labels_path.name}" if labels_path else \
        f"class-blocked hard labels: no labels file beside {path.name}"
    if labels is not None and labels.ndim == 2 and bool((labels < 0).any()):
        # DATM saves its learned soft labels as logits and trains on softmax(labels) (its SoftCrossEntropy);
        # distillery trains on the targets themselves, so they become those probabilities here
        labels = torch.softmax(labels, 1)
        labels_from += " (logits, as DATM saves them: softmax applied, the targets DATM trains on)"
    lr = None if lr_path is None else _lr(read_torch_file(lr_path, "pass --lr instead"), str(lr_path))
    return PublishedSet(images, labels, lr, "mtt-pt", labels_from,
                        f"lr from {lr_path.name}" if lr_path else
                        f"none: no lr file beside {path.name} (MTT and TESLA save none)", pixels)


def _h5_array(f: Any, name: str, path: Path) -> np.ndarray | None:
    """Dataset `name` of an open HDF5 file as a real-number array, None when absent; a group, an external link,
    a virtual dataset, a scalar or non-numeric data (bytes, strings, complex, compound) are refused."""
    import h5py

    link = f.get(name, getlink=True)
    if link is None:
        return None
    if isinstance(link, h5py.ExternalLink):
        raise UserError(f"{path}: '{name}' is a link to another file ({link.filename}); a RaT-BPTT .h5 holds its "
                        "data itself: pass the file the link points to")
    node = f[name]
    if not isinstance(node, h5py.Dataset):
        raise UserError(f"{path}: '{name}' is a {type(node).__name__}, not a dataset; RaT-BPTT writes '{name}' as an "
                        "array: pass the .h5 it saved")
    if node.is_virtual:
        raise UserError(f"{path}: '{name}' is a virtual dataset (it reads other files); pass a .h5 that holds its "
                        "data itself")
    if node.dtype.kind not in "fiu" or node.shape is None or len(node.shape) == 0:
        raise UserError(f"{path}: '{name}' holds {node.dtype} data of shape {node.shape}; RaT-BPTT writes "
                        f"'{name}' as a float array: pass the .h5 it saved")
    return np.asarray(node[()])


def _rat_pth_labels(pth: Path, data: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """RaT-BPTT's learned labels from the .pth it saves beside the .h5 (`label_state_dict['module.label.weight']`,
    written only by a --train_y run), and a sentence saying where the labels came from."""
    ck = read_torch_file(pth, "it holds RaT-BPTT's learned labels: restore it, or move it away to import the "
                              "set with class-blocked hard labels")
    if not isinstance(ck, dict):
        raise UserError(f"{pth} holds a {type(ck).__name__}, not RaT-BPTT's checkpoint dict; move it away to import "
                        "the set with class-blocked hard labels")
    state = ck.get("label_state_dict")
    if state is None:
        return None, f"class-blocked hard labels: no label in the .h5 and none in {pth.name} (a run without --train_y)"
    weight = state.get("module.label.weight") if isinstance(state, dict) else None
    if weight is None:
        raise UserError(f"{pth}: label_state_dict has no 'module.label.weight' tensor; move it away to import the "
                        "set with class-blocked hard labels")
    labels = _labels(weight, pth)
    if labels.ndim != 2:
        raise UserError(f"{pth}: module.label.weight has shape {tuple(labels.shape)}, not (N, K) learned labels")
    said = f"learned labels from {pth.name}"
    saved = (ck.get("model_state_dict") or {}).get("module.data.weight") if isinstance(
        ck.get("model_state_dict"), dict) else None
    if isinstance(saved, torch.Tensor) and saved.shape == data.shape and not torch.equal(saved.float(), data):
        said += (f" (saved at epoch {ck.get('epoch')}, whose images differ from the .h5's: the labels are those of "
                 "RaT-BPTT's last evaluation, not of its final step)")
    return labels, said


def read_h5_set(path: Path) -> PublishedSet:
    """A RaT-BPTT .h5 (`data`, and `label` when it has one) with the learned labels of the .pth beside it when the
    .h5 has none (RaT-BPTT's final write keeps only `data` and `grad`)."""
    try:
        import h5py
    except ImportError:
        raise UserError("reading .h5 files needs h5py: pip install 'dataset-distillery[h5]'") from None
    try:
        with h5py.File(path, "r") as f:
            data = _h5_array(f, "data", path)
            if data is None:
                raise UserError(f"{path} has no 'data' dataset (keys: {', '.join(f.keys())}); a RaT-BPTT "
                                "checkpoint stores the images as 'data' and the labels as 'label'")
            label = _h5_array(f, "label", path)
    except UserError:
        raise
    except Exception as err:  # h5py raises OSError, KeyError, ValueError, ... on damaged files
        raise UserError(f"cannot read {path} as HDF5 ({first_line(err, 120)}); pass the .h5 RaT-BPTT saved") from None
    images, pixels = _images(torch.from_numpy(data), path)
    if label is not None:
        return PublishedSet(images, _labels(torch.from_numpy(label), path), None, "ratbptt-h5",
                            f"labels from {path.name}'s 'label'", "none: RaT-BPTT saves none", pixels)
    pth = path.with_suffix(".pth")
    if pth.is_file():
        labels, said = _rat_pth_labels(pth, images)
    else:
        labels, said = None, f"class-blocked hard labels: no label in the .h5 and no {pth.name} beside it"
    return PublishedSet(images, labels, None, "ratbptt-h5", said, "none: RaT-BPTT saves none", pixels)


def read_published_set(path: str | Path, read_lr: bool = True) -> PublishedSet:
    """The checked contents of an images_*.pt (+ labels_*.pt, lr_*.pt), a dict .pt or a RaT-BPTT .h5 (+ .pth);
    `read_lr=False` leaves a saved lr unread (the caller has its own)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; pass an images_*.pt file (MTT/TESLA/DATM) or a .h5 (RaT-BPTT)")
    return read_h5_set(path) if path.suffix in (".h5", ".hdf5") else read_pt_set(path, read_lr)


def _class_blocked(images: torch.Tensor, labels: torch.Tensor, num_classes: int, path: Path):
    """Hard labels: reorder (stably) into class blocks [0]*ipc + [1]*ipc + ...; refuse unequal class counts.

    Soft/learned labels stay in the file's order: the published codes write class-blocked sets, and a soft label's
    argmax need not be its slot's class."""
    if labels.ndim == 2:
        return images, labels
    counts = torch.bincount(labels, minlength=num_classes)
    if int(counts.min()) != int(counts.max()):
        raise UserError(f"{path} has {counts.tolist()} images per class; a distilled set needs the same number "
                        f"of images in each of the {num_classes} classes")
    order = torch.sort(labels, stable=True).indices
    return images[order], labels[order]


def import_set(path: str | Path, dataset: str, zca: str | None = None, data_dir: str | None = None,
               val_fraction: float = 0.1, lr: float | None = None) -> SyntheticSet:
    """A published set as a SyntheticSet on `dataset`, its images taken to be in the space `zca` names.

    `meta["source"]` says where the labels and the lr came from (`labels`, `lr`) and whether raw pixels were
    preprocessed on import (`images`)."""
    from ..data import load_dataset
    from ..data.registry import get_spec

    path = Path(path)
    zca = None if zca in (None, "none") else zca
    if zca not in (None, "kornia", "kip"):
        raise UserError(f"--zca {zca!r}: choose kornia (MTT/TESLA/DATM), kip (RaT-BPTT) or none (mean/std)")
    if lr is not None:
        lr = _lr(lr, "--lr", "pass the learning rate the set is meant to be trained with")
    spec = get_spec(dataset)
    got = read_published_set(path, read_lr=lr is None)
    images, labels = got.images, got.labels
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
    if len(labels) != len(images) or (labels.ndim == 2 and labels.shape[1] != spec.num_classes):
        raise UserError(f"{path}: labels of shape {tuple(labels.shape)} do not fit {len(images)} images of "
                        f"{spec.num_classes} classes ({got.labels_from})")
    if labels.ndim == 1 and int(labels.max()) >= spec.num_classes:
        raise UserError(f"{path}: class id {int(labels.max())} in the labels, but {spec.name} has "
                        f"{spec.num_classes} classes (0..{spec.num_classes - 1}); pass the matching --dataset")
    kind = "hard" if labels.ndim == 1 else ("learned" if got.source == "ratbptt-h5" else "soft")
    images, labels = _class_blocked(images, labels, spec.num_classes, path)
    ds = load_dataset(dataset, data_dir=data_dir, zca=zca, val_fraction=val_fraction, seed=0)
    source = {"file": str(path), "format": got.source, "space": ds.preprocess.kind, "labels": got.labels_from,
              "lr": got.lr_from if lr is None else f"--lr {lr:g} (given; a saved lr is not read)"}
    if got.pixels:  # raw 0..255 pixels: bring them into the model space the set is trained in
        images = ds.preprocess.transform(images / 255)
        source["images"] = f"raw pixels 0..255, preprocessed on import ({ds.preprocess.kind})"
    if got.lr is None and lr is None:
        source["lr"] += "; `distillery evaluate` trains it with --lr, default 0.01"
    meta = {"method": "imported", "dataset": ds.spec.name, "ipc": ipc, "num_classes": ds.spec.num_classes,
            "class_names": list(ds.spec.class_names), "model": ds.spec.default_model, "source": source}
    lr = lr if lr is not None else got.lr
    # the evaluation of the code the file came from: MTT/TESLA's evaluate_synset or RaT-BPTT's test()
    meta["eval"] = [published_protocol(got.source, ds.spec.default_model, lr, ds.spec.dsa_strategy,
                                       val_fraction).as_json()]
    return SyntheticSet(images.contiguous(), labels.contiguous(), kind, lr,
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
        if not t.is_floating_point():
            raise UserError(f"{where}: parameter {i} ({name}) is {t.dtype}, not a float tensor; pass the "
                            "replay_buffer_*.pt files MTT's buffer.py saved")
    if len(snapshot) != len(names):
        raise UserError(f"{where} has {len(snapshot)} parameter tensors, the model {len(names)}; the buffer was "
                        "trained with another model (pass its --model)")
    return torch.cat([t.detach().reshape(-1).float() for t in snapshot])


FIX_BUFFER = ("retrain the experts with MTT's buffer.py on a GPU (or with `.cpu().clone()` in its two "
              "`timestamps.append` lines), or train them with `distillery experts`")


def read_replay_buffer(path: Path, names: list[str], shapes: list[tuple[int, ...]],
                       epochs: int | None = None) -> list[torch.Tensor]:
    """The experts of one MTT replay_buffer_*.pt as flat (epochs + 1, P) float32 trajectories, each checked: the
    model's layout, `epochs` epochs (when given; else as many as the first expert), finite, never standing still."""
    buffer = read_torch_file(path, "pass the replay_buffer_*.pt files MTT's buffer.py saved")
    if not isinstance(buffer, list) or not buffer:
        raise UserError(f"{path} holds a {type(buffer).__name__ if buffer != [] else 'empty list'}, not a list of "
                        "expert trajectories (lists of per-epoch parameter lists)")
    out = []
    for e, expert in enumerate(buffer):
        where = f"{path.name} expert {e}"
        if not isinstance(expert, list) or len(expert) < 2:
            raise UserError(f"{where} is not a list of at least 2 epoch snapshots (init and one epoch); pass the "
                            "replay_buffer_*.pt files MTT's buffer.py saved")
        if epochs is None:
            epochs = len(expert) - 1
        if len(expert) != epochs + 1:
            raise UserError(f"{where} has {len(expert) - 1} epochs, earlier experts {epochs}; "
                            "import buffers of one training run together")
        trajectory = torch.stack([flatten_snapshot(s, names, shapes, f"{where} epoch {t}")
                                  for t, s in enumerate(expert)])
        check_trajectory(trajectory, where, FIX_BUFFER)
        out.append(trajectory)
    return out


def import_experts(directory: str | Path, dataset: str, model: str, out: str | Path, zca: str | None = None,
                   data_dir: str | None = None, val_fraction: float = 0.1, lr: float = 0.01, batch: int = 256,
                   decay: bool = False) -> "ExpertStore":
    """Convert MTT's replay_buffer_*.pt files into an expert store at `out` and open it.

    Every file is read and checked (`read_replay_buffer`) before the data are loaded or anything is written.
    `lr`, `batch`, `decay` record the recipe the buffer was trained with (MTT's defaults); they are not in the files.
    Momentum and weight decay are recorded as buffer.py's defaults, 0 (its --mom and --l2).
    """
    from ..data import load_dataset
    from ..data.registry import get_spec
    from ..experts import MANIFEST, ExpertStore, new_manifest, split_accuracy, write_expert, write_manifest
    from ..models import FunctionalModel, create_model, has_batchnorm

    out = Path(out)
    lr = _lr(lr, "--lr", "pass the learning rate the experts were trained with (MTT's default 0.01)")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"--batch must be an integer >= 1 (got {batch!r}): it records the experts' training recipe")
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
    epochs = None
    for path in files:  # check everything first: a refused import loads no data and writes nothing
        epochs = len(read_replay_buffer(path, names, shapes, epochs)[0]) - 1
    ds = load_dataset(dataset, data_dir=data_dir, zca=zca, val_fraction=val_fraction, seed=0)
    manifest = new_manifest(ds, model, fm, epochs=epochs, lr=lr, decay=decay, momentum=0.0, weight_decay=0.0,
                            batch=batch, seed=None)
    manifest["source"] = {"format": "mtt-replay-buffer", "files": [str(f) for f in files]}
    cpu = torch.device("cpu")
    for path in files:
        for e, trajectory in enumerate(read_replay_buffer(path, names, shapes, epochs)):
            k = len(manifest["experts"])
            manifest["experts"].append(write_expert(
                out, k, trajectory, manifest["layout"]["hash"], None, source=f"{path.name}[{e}]",
                val_acc=split_accuracy(fm, trajectory[-1], ds.val, cpu),
                test_acc=split_accuracy(fm, trajectory[-1], ds.test, cpu)))
    write_manifest(out, manifest)
    return ExpertStore.open(out, expect_dataset=ds.spec.name, expect_model=model,
                            expect_fingerprint=ds.preprocess.fingerprint(), expect_layout=fm)
