"""Expert trajectories for MTT and TESLA (SPEC §4.1): train them, store them, check them, read them lazily.

Training recipe (the reference `buffer.py`, kept exact on purpose, SPEC P18): every expert starts from its own
random init, then runs `epochs` passes of plain SGD (by default no momentum, no weight decay, constant lr unless
`decay`: buffer.py's --mom, --l2, --decay are the `momentum`, `weight_decay`, `decay` arguments) with
cross-entropy on shuffled minibatches of `batch` images of `ds.train` (the last minibatch of an epoch may be
smaller), each minibatch augmented with ordinary non-siamese DSA using the dataset's strategy. Parameters are
saved after every epoch; index 0 is the init. Data stay on the device; there is no DataLoader.

Randomness: expert k of a run with `seed` uses `s = seed * 100003 + k` twice: `init_seeded(model, ..., seed=s)`
for its init, and one `torch.Generator` on the device seeded with `s` for its data order (one `randperm` per epoch)
and its augmentation (one DSA draw per minibatch). Nothing is shared between experts, so training them one at a
time or side by side gives the same trajectories.

Store format (format_version 1), a directory:

    manifest.json            what the experts are and which are finished (below)
    expert_0000.safetensors  one tensor `trajectory`, float32, shape (epochs + 1, P); row e = parameters after e
                             epochs in `module.parameters()` order; header metadata repeats expert index, seed and
                             layout hash so a shard copied into the wrong store is caught
    ...
    .partial/expert_0007/epoch_0012.safetensors
                             only while training: `theta` (P,) after epoch 12, `rng` (the expert's generator
                             state) and, with momentum, `momentum` (P,), so an interrupted run resumes from the
                             last finished epoch; removed once the
                             expert's shard is written
    .partial/expert_0007.lock  flock-ed by the one process training expert 7 (removed when it is done): two
                             commands sharing a store or the cache split the experts and wait for each other

manifest.json keys: format ("distillery-experts"), format_version, dataset, model, channels, num_classes,
im_size [h, w], preprocess {kind, fingerprint} (from `ds.preprocess`; ZCA and non-ZCA experts never mix, SPEC
P6), epochs, lr, decay, momentum, weight_decay (absent in older stores: 0), batch, dsa_strategy, seed, layout
{names, shapes, num_params, hash} (parameters() order; hash = sha256 of the JSON list of [name, shape] pairs,
SPEC P10), torch_version, and experts: a list of
{index, file, seed, sha256, val_acc, test_acc} for the finished experts (val_acc is null without a validation
split; test accuracy is only reported, never used to select anything).

Every file is written atomically (`distillery.io`); the manifest is rewritten after each finished expert, so a
killed run loses at most the epoch in progress. BatchNorm models are refused: their running statistics are not in
the flat parameter vector that MTT/TESLA match (SPEC §1.3).

Several processes (`torchrun --nproc_per_node G -m distillery.cli experts ...`, docs/SCALING.md): rank r trains
experts r, r + G, r + 2G, ... into the same directory. Each manifest update is a read, add, atomic rewrite under an
exclusive `flock` on `.manifest.lock`, so processes finishing experts at the same time never lose an entry. Since an
expert depends only on its index, the store equals a single-process one (bit-equal trajectories and the same
manifest at the same thread count; the shard bytes and their sha256 differ between any two processes, because
safetensors orders header metadata keys randomly per process), and a half-finished run resumes with any number of
processes.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from .augment import Augment
from .checks import check_trajectory
from .device import resolve_device
from .distributed import barrier, is_main_process, rank_and_world
from .errors import UserError
from .evaluation.parallel import map_runs
from .evaluation.training import FlatSGD, capturable, plain_step
from .io import atomic_write_bytes, atomic_write_text, inside
from .models import FunctionalModel, create_model, has_batchnorm, init_seeded
from .options import option
from .validate import check_cuda

if TYPE_CHECKING:
    from .data import Dataset, Split

FORMAT = "distillery-experts"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".manifest.lock"
PARTIAL = ".partial"
# Stores up to this size are kept in memory after the first read when `cache=None`.
AUTO_CACHE_BYTES = 512 * 2**20
# Experts per file in MTT's replay buffers (buffer.py --save_interval): the unit of distill.py's --max_files.
EXPERTS_PER_FILE = 10
# Shards (resolved path, sha256) already hashed by this process: each is verified once, on first use.
_VERIFIED: set[tuple[str, str]] = set()
# Manifest keys that must agree before an existing directory is resumed.
_CONFIG_KEYS = ("format_version", "dataset", "model", "channels", "num_classes", "im_size", "preprocess",
                "epochs", "lr", "decay", "momentum", "weight_decay", "batch", "dsa_strategy", "seed", "layout")
_FIX = "retrain with `distillery experts` for this setting or pass the matching --experts dir"


@dataclass
class ExpertConfig:
    """The experts an MTT/TESLA run trains and caches when no --experts store is given."""

    num_experts: int = option(10, low=1, help="expert trajectories to train")
    expert_epochs_train: int = option(50, low=1, help="epochs of every expert (>= max_start_epoch - 1 + expert_epochs)")
    expert_lr: float = option(0.01, low=0, low_open=True, help="SGD learning rate of the experts")
    expert_momentum: float = option(0.0, low=0, high=1, high_open=True,
                                    help="SGD momentum of the experts (MTT buffer.py --mom; published 0)")
    expert_l2: float = option(0.0, low=0, help="SGD weight decay of the experts (buffer.py --l2; published 0)")
    expert_decay: bool = option(False, help="expert lr x0.1 once epoch E // 2 + 1 of E is done, momentum restarted "
                                            "(buffer.py --decay; published off)")
    # these two also apply to a given --experts store
    max_files: int | None = option(None, low=1, help="use only the first N groups of 10 experts by index (MTT "
                                                     "distill.py --max_files: files of 10 experts)")
    max_experts: int | None = option(None, low=1, help="use only the first N experts of each group of 10 (MTT "
                                                       "distill.py --max_experts, per file)")


# `distillery experts` takes these ExpertConfig options, also under further spellings (MTT buffer.py's and ours)
EXPERTS_COMMAND_ALIASES = {"num_experts": (), "expert_epochs_train": ("--train-epochs",), "expert_lr": ("--lr",),
                           "expert_momentum": ("--momentum", "--mom"), "expert_l2": ("--l2",),
                           "expert_decay": ("--decay",)}


def expert_seed(seed: int, k: int) -> int:
    """The seed of expert `k` in a run with `seed`: its init and its generator (data order, augmentation)."""
    return seed * 100003 + k


def layout_of(fm: FunctionalModel) -> dict:
    """Parameter names, shapes, count and a hash of them: what a flat vector's meaning depends on (SPEC P10)."""
    pairs = [[name, list(shape)] for name, shape in zip(fm.names, fm.shapes)]
    digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()
    return {"names": list(fm.names), "shapes": [list(s) for s in fm.shapes], "num_params": fm.num_params,
            "hash": digest}


def epoch_lr(lr: float, epoch: int, epochs: int, decay: bool) -> float:
    """Learning rate of 0-based `epoch`: constant, or x0.1 once epoch `epochs // 2 + 1` is done (buffer.py)."""
    return lr * 0.1 if decay and epoch > epochs // 2 + 1 else lr


def train_experts(ds: Dataset, model: str, num_experts: int, epochs: int = 50, lr: float = 0.01, batch: int = 256, *,
                  out_dir: str | Path, device: str | torch.device | None = None, seed: int = 0,
                  decay: bool = False, progress: bool = True, momentum: float = 0.0,
                  weight_decay: float = 0.0, fast: bool = False) -> ExpertStore:
    """Train experts 0..num_experts-1 into `out_dir` (resuming whatever is already there) and open the store.

    `momentum`, `weight_decay`, `decay`: buffer.py's --mom, --l2 and --decay (torch.optim.SGD's update, dampening 0;
    the momentum restarts from zero when the lr decays, as buffer.py builds a new optimiser then). 0, 0, False is the
    published recipe.
    `fast` (CUDA only): every minibatch step replays a captured CUDA graph (`evaluation.training.FlatSGD`), equal up
    to float rounding; a model with buffers (not capturable) trains as usual.
    Device: `device`, or where `ds.train.x` lives when None. `progress` shows a bar and prints each expert's
    val/test accuracy. With torch.distributed initialised (torchrun) every rank must call this: rank r trains experts
    r, r + G, ... and all ranks return once the whole store is finished.
    """
    for name, value in (("num_experts", num_experts), ("epochs", epochs), ("batch", batch)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if not lr > 0:
        raise UserError(f"lr must be positive, got {lr}")
    if not (0 <= momentum < 1 and weight_decay >= 0):
        raise UserError(f"expert momentum must be in [0, 1) and weight decay >= 0, got {momentum} and {weight_decay}")
    device = ds.train.x.device if device is None else resolve_device(device)
    if fast:
        check_cuda("--fast", device)
    spec = ds.spec
    template = create_model(model, spec.channels, spec.num_classes, spec.im_size).to(device)
    if has_batchnorm(template):
        raise UserError(f"model '{model}' has BatchNorm, whose running statistics are not part of the flat "
                        "parameters trajectory matching uses; train experts with a non-BN model such as ConvNet")
    fm = FunctionalModel(template)
    out = Path(out_dir)
    rank, world = rank_and_world()
    with _manifest_lock(out):  # torchrun ranks start at once: one creates the manifest, the others check it
        manifest = _start_manifest(out, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dataset": spec.name, "model": model,
            "channels": spec.channels, "num_classes": spec.num_classes, "im_size": list(spec.im_size),
            "preprocess": {"kind": ds.preprocess.kind, "fingerprint": ds.preprocess.fingerprint()},
            "epochs": epochs, "lr": lr, "decay": decay, "momentum": momentum, "weight_decay": weight_decay,
            "batch": batch, "dsa_strategy": spec.dsa_strategy,
            "seed": seed, "layout": layout_of(fm), "torch_version": torch.__version__, "experts": [],
        })
    done = {e["index"] for e in manifest["experts"]}
    mine = range(rank, num_experts, world)  # this process's experts: r, r + G, r + 2G, ...
    for k in sorted(done.intersection(mine)):  # snapshots left by a run killed right after an expert's manifest entry
        if not _partial_dir(out, k).exists():
            continue
        with _expert_lock(out, k, wait=False) as held:
            if held:
                shutil.rmtree(_partial_dir(out, k), ignore_errors=True)
    todo = [k for k in mine if k not in done]
    train = (ds.train.x.to(device), ds.train.y.to(device))
    augment = Augment(spec.dsa_strategy)

    def init(s: int) -> torch.Tensor:
        return fm.flatten(init_seeded(model, spec.channels, spec.num_classes, spec.im_size, s)).detach().to(device)

    bar = tqdm(total=len(todo) * epochs, desc=f"experts {model}", unit="ep", disable=not (progress and rank == 0))
    def run_expert(k: int, wait: bool = False) -> bool:
        """Train expert k under its lock; False when another process holds it now (`wait`: wait for it instead),
        skipped when another process finished it."""
        with _expert_lock(out, k, wait=wait) as held:
            if not held:
                return False
            with _manifest_lock(out):
                finished = {e["index"] for e in _read_manifest(out / MANIFEST)["experts"]}
            if k in finished:
                shutil.rmtree(_partial_dir(out, k), ignore_errors=True)
                bar.update(epochs)
                return True
            own = FunctionalModel(copy.deepcopy(template))  # functional_call swaps a module's parameters: one a thread
            final = _train_expert(own, init, train, augment, k, seed, epochs, lr, batch, decay, out, bar, momentum,
                                  weight_decay, fast)
            entry = _finish_expert(out, own, ds, device, manifest, k, expert_seed(seed, k), final, epochs)
            if progress:
                val = "n/a" if entry["val_acc"] is None else f"{entry['val_acc']:.2%}"
                tqdm.write(f"expert {k}: val acc {val}, test acc {entry['test_acc']:.2%}")
        return True

    # experts side by side on the CPU, one thread each (`parallel.map_runs`): equal to one after another. Experts
    # another process is training (two commands sharing a store or the cache) are left to it, then waited for.
    done_now = map_runs(run_expert, todo, device)
    for k, ran in zip(todo, done_now):
        if not ran:
            tqdm.write(f"expert {k} is being trained by another process into {out}; waiting for it")
            run_expert(k, wait=True)
    bar.close()
    barrier()  # every rank's experts are finished before anyone opens the store or tidies up
    partial = out / PARTIAL
    if is_main_process() and partial.is_dir() and not any(partial.iterdir()):
        try:
            partial.rmdir()
        except OSError:  # another process has just started an expert there
            pass
    store = ExpertStore.open(out)
    missing = sorted(set(range(num_experts)) - {e["index"] for e in store.experts})
    if missing:  # torchrun over machines that do not share `out`: each sees only its own experts
        raise UserError(f"{out} lacks experts {missing[:5]} that other processes trained; on several machines put "
                        "the store (--out, or $DISTILLERY_CACHE) on a file system all of them see")
    return store


def finished_experts(path: str | Path) -> set[int]:
    """Indices of the experts the store at `path` has finished (empty when there is no store yet)."""
    manifest = Path(path) / MANIFEST
    return {e["index"] for e in _read_manifest(manifest)["experts"]} if manifest.is_file() else set()


def _start_manifest(out: Path, fresh: dict) -> dict:
    """Load the manifest of a run to resume (same settings, only experts whose shard still exists) or write `fresh`."""
    path = out / MANIFEST
    if not path.exists():
        atomic_write_text(path, json.dumps(fresh, indent=1))
        return fresh
    old = _read_manifest(path)
    for key in _CONFIG_KEYS:
        if old.get(key) != fresh[key]:
            shown = "the parameter layout" if key == "layout" else f"{key}={old.get(key)!r} (this call: {fresh[key]!r})"
            raise UserError(f"{out} already holds experts trained with {shown}; "
                            "use another output dir, or the same settings to resume")
    kept = [e for e in old["experts"] if (out / e["file"]).exists()]
    if kept != old["experts"]:  # forget experts whose shard is gone, on disk too: other ranks re-read the manifest
        old["experts"] = kept
        atomic_write_text(path, json.dumps(old, indent=1))
    return old


@contextmanager
def _manifest_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the store's manifest while reading and rewriting it (torchrun ranks share it)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a") as handle:  # the lock file stays empty; closing it releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextmanager
def _expert_lock(out: Path, k: int, wait: bool) -> Iterator[bool]:
    """Hold an exclusive flock on `.partial/expert_K.lock`; yield False at once, holding nothing, if another process
    holds it and not `wait`.

    Only the holder of expert K's lock touches `.partial/expert_K/`, so processes sharing a store never write, resume
    from or delete each other's snapshots. The lock file is removed when its expert is done; one removed between our
    open and our flock is opened again (the inode check)."""
    path = out / PARTIAL / f"expert_{k:04d}.lock"
    while True:
        try:
            (out / PARTIAL).mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # another process removed the empty .partial between the two calls
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield True
        path.unlink(missing_ok=True)  # finished or skipped: still held, so nobody is waiting on a stale file
    finally:
        os.close(fd)


def _record_expert(out: Path, entry: dict) -> None:
    """Add a finished expert to manifest.json as it is on disk now (other ranks add theirs), rewritten atomically."""
    with _manifest_lock(out):
        manifest = _read_manifest(out / MANIFEST)
        others = [e for e in manifest["experts"] if e["index"] != entry["index"]]
        manifest["experts"] = sorted([*others, entry], key=lambda e: e["index"])
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))


def _train_expert(fm: FunctionalModel, init: Callable[[int], torch.Tensor], train: tuple[torch.Tensor, torch.Tensor],
                  augment: Augment, k: int, seed: int, epochs: int, lr: float, batch: int, decay: bool, out: Path,
                  bar: tqdm, momentum: float = 0.0, weight_decay: float = 0.0, fast: bool = False) -> torch.Tensor:
    """Train expert k from its last saved epoch, saving every epoch; return its final parameters (P,).
    `fast`: from captured CUDA graphs where the model allows it (`FlatSGD`)."""
    x, y = train
    s = expert_seed(seed, k)
    gen = torch.Generator(device=x.device).manual_seed(s)
    start = _last_saved_epoch(out, k)
    if start < 0:  # nothing saved yet: a fresh init, saved as epoch 0
        start = 0
        flat = init(s)
        _save_epoch(out, k, 0, flat, gen)
    else:
        flat = _load_epoch(out, k, start, gen).to(x.device)
    buf = None  # the SGD momentum buffer, saved with every snapshot so that a resumed run continues exactly
    if momentum:
        buf = _load_momentum(out, k, start).to(x.device) if start else torch.zeros_like(flat)
    bar.update(start)
    sgd = FlatSGD(plain_step(fm), augment, x, y, flat, buf, momentum, weight_decay,
                  capture=fast and capturable(fm.module), option="--fast")
    for epoch in range(start, epochs):
        lr_now = epoch_lr(lr, epoch, epochs, decay)
        if buf is not None and epoch and lr_now != epoch_lr(lr, epoch - 1, epochs, decay):
            buf.zero_()  # buffer.py builds a new SGD optimiser (fresh momentum) when the lr decays
        loss = sgd.epoch(gen, batch, lr_now).item()
        if not math.isfinite(loss):
            raise UserError(f"expert {k} diverged in epoch {epoch + 1} (train loss {loss}); use a smaller lr")
        _save_epoch(out, k, epoch + 1, flat, gen, buf)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
    return flat


def time_expert_epoch(ds: Dataset, model: str, batch: int = 256, lr: float = 0.01, probe: int = 2) -> float:
    """Seconds one expert epoch over `ds.train` takes here, timed on `probe` minibatches after one of warm-up with
    the training code itself (what `--estimate` projects expert training from, without training any)."""
    spec = ds.spec
    fm = FunctionalModel(create_model(model, spec.channels, spec.num_classes, spec.im_size).to(ds.train.x.device))
    flat = fm.flatten(fm.module).detach()
    gen = torch.Generator(device=ds.train.x.device).manual_seed(0)
    x, y = ds.train.x[:batch * (probe + 1)], ds.train.y[:batch * (probe + 1)]

    def epoch(xs: torch.Tensor, ys: torch.Tensor) -> None:
        FlatSGD(plain_step(fm), Augment(spec.dsa_strategy), xs, ys, flat, None, 0.0, 0.0).epoch(gen, batch, lr)

    epoch(x[:batch], y[:batch])  # warm-up
    start = time.perf_counter()
    epoch(x[batch:], y[batch:])
    return (time.perf_counter() - start) * len(ds.train.x) / max(len(x) - batch, 1)


def _partial_dir(out: Path, k: int) -> Path:
    """Where expert k keeps its per-epoch snapshots while it trains."""
    return out / PARTIAL / f"expert_{k:04d}"


def _epoch_file(out: Path, k: int, epoch: int) -> Path:
    """Snapshot of expert k after `epoch` epochs (0 = init)."""
    return _partial_dir(out, k) / f"epoch_{epoch:04d}.safetensors"


def _last_saved_epoch(out: Path, k: int) -> int:
    """Last epoch e such that snapshots 0..e of expert k all exist; -1 if none."""
    epoch = -1
    while _epoch_file(out, k, epoch + 1).exists():
        epoch += 1
    return epoch


def _save_epoch(out: Path, k: int, epoch: int, flat: torch.Tensor, gen: torch.Generator,
                momentum: torch.Tensor | None = None) -> None:
    """Write expert k's parameters, generator state and SGD momentum buffer (if any) after `epoch` epochs (atomic)."""
    tensors = {"theta": flat.detach().to("cpu", torch.float32).contiguous(), "rng": gen.get_state()}
    if momentum is not None:
        tensors["momentum"] = momentum.detach().to("cpu", torch.float32).contiguous()
    atomic_write_bytes(_epoch_file(out, k, epoch), safetensors_bytes(tensors))


def _load_momentum(out: Path, k: int, epoch: int) -> torch.Tensor:
    """Expert k's SGD momentum buffer after `epoch` epochs, from its resume snapshot."""
    path = _epoch_file(out, k, epoch)
    try:
        return load_file(path)["momentum"]
    except (SafetensorError, OSError, KeyError) as err:
        raise UserError(f"cannot read the momentum buffer of the resume snapshot {path} ({err!r}); delete "
                        f"{path.parent} to restart expert {k} from scratch") from err


def _load_epoch(out: Path, k: int, epoch: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Read expert k's parameters after `epoch` epochs, restoring its generator state into `gen` if given."""
    path = _epoch_file(out, k, epoch)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read the resume snapshot {path} ({err}); delete {path.parent} to restart "
                        f"expert {k} from scratch") from err
    if gen is not None:
        gen.set_state(tensors["rng"])
    return tensors["theta"]


def _finish_expert(out: Path, fm: FunctionalModel, ds: Dataset, device: torch.device, manifest: dict, k: int, s: int,
                   final: torch.Tensor, epochs: int) -> dict:
    """Write expert k's shard from its snapshots, record it with its accuracies in the manifest, drop the snapshots."""
    trajectory = torch.stack([_load_epoch(out, k, e) for e in range(epochs + 1)])
    meta = {"format": FORMAT, "expert": str(k), "seed": str(s), "layout_hash": manifest["layout"]["hash"]}
    data = safetensors_bytes({"trajectory": trajectory}, metadata=meta)
    entry = {"index": k, "file": f"expert_{k:04d}.safetensors", "seed": s,
             "sha256": hashlib.sha256(data).hexdigest(),
             "val_acc": split_accuracy(fm, final, ds.val, device),
             "test_acc": split_accuracy(fm, final, ds.test, device)}
    atomic_write_bytes(out / entry["file"], data)
    _record_expert(out, entry)
    shutil.rmtree(_partial_dir(out, k))
    return entry


@torch.no_grad()
def split_accuracy(fm: FunctionalModel, flat: torch.Tensor, split: Split | None, device: torch.device,
                   chunk: int = 1024) -> float | None:
    """Top-1 accuracy of a functional model with flat parameters `flat` on a split, in chunks on `device` (no
    augmentation); None for an empty split. (`evaluate.accuracy` is the same measure for an `nn.Module`.)"""
    if split is None or len(split.y) == 0:
        return None
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, len(split.y), chunk):
        xb, yb = split.x[i:i + chunk].to(device), split.y[i:i + chunk].to(device)
        correct += (fm(flat, xb).argmax(1) == yb).sum()
    return int(correct) / len(split.y)  # one host read


def _read_manifest(path: Path) -> dict:
    """Parse and version-check a manifest.json."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}); retrain with `distillery experts` into a fresh dir") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a distillery expert manifest; pass the dir `distillery experts` wrote")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has expert format version {manifest.get('format_version')}, this distillery reads "
                        f"version {FORMAT_VERSION}; retrain with `distillery experts`")
    layout, pre = manifest.get("layout"), manifest.get("preprocess")
    if not (_is_int(manifest.get("epochs"), 0) and isinstance(layout, dict) and _is_int(layout.get("num_params"), 1)
            and isinstance(layout.get("hash"), str) and isinstance(layout.get("names"), list)
            and isinstance(layout.get("shapes"), list) and isinstance(pre, dict)
            and isinstance(pre.get("fingerprint"), str) and isinstance(manifest.get("dataset"), str)
            and isinstance(manifest.get("model"), str)):
        raise UserError(f"{path} is damaged: its epochs, layout, preprocessing, dataset or model is not what "
                        "`distillery experts` writes; retrain with `distillery experts` into a fresh dir")
    entries = manifest.get("experts")
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("index"), int) and not isinstance(e["index"], bool)
            and e["index"] >= 0 and isinstance(e.get("sha256"), str) for e in entries):
        raise UserError(f"{path} is damaged: its expert list is not what `distillery experts` writes; retrain with "
                        "`distillery experts` into a fresh dir")
    for e in entries:  # a file named in the manifest is only ever opened inside the store
        inside(path.parent, e.get("file"), str(path), "retrain with `distillery experts` into a fresh dir")
    return manifest


def _is_int(value, low: int) -> bool:
    """An int (not a bool) of at least `low`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _layout_difference(stored: dict, fm: FunctionalModel) -> str | None:
    """How the model's parameter layout differs from the stored one, or None when they agree."""
    mine = layout_of(fm)
    if mine["hash"] == stored["hash"]:
        return None
    theirs_list = list(zip(stored["names"], stored["shapes"]))
    mine_list = list(zip(mine["names"], mine["shapes"]))
    for i, (a, b) in enumerate(zip(theirs_list, mine_list)):
        if list(a) != list(b):
            return f"parameter {i} is {a[0]} {tuple(a[1])} in the store but {b[0]} {tuple(b[1])} in the model"
    return (f"the store has {len(theirs_list)} parameter tensors ({stored['num_params']} values), "
            f"the model {len(mine_list)} ({mine['num_params']})")


class ExpertStore:
    """A directory of expert trajectories, validated on open and read lazily (a checkpoint reads one row)."""

    def __init__(self, root: Path, manifest: dict, cache: bool):
        """Use `ExpertStore.open`; this trusts `manifest` as already validated."""
        self.root = root
        self.manifest = manifest
        self._files = [root / e["file"] for e in manifest["experts"]]
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    @classmethod
    def open(cls, path: str | Path, expect_dataset: str | None = None, expect_model: str | None = None,
             expect_fingerprint: str | None = None, expect_layout: FunctionalModel | None = None,
             cache: bool | None = None) -> ExpertStore:
        """Open a store, refusing one trained for another dataset, model, preprocessing or parameter layout.

        `cache`: keep each trajectory in memory after its first read; None = only if the store is <= 512 MiB.
        """
        root = Path(path)
        if not (root / MANIFEST).is_file():
            raise UserError(f"no expert store at {root} (manifest.json missing); train one with `distillery experts` "
                            "or pass the right --experts dir")
        m = _read_manifest(root / MANIFEST)
        if expect_dataset is not None and m["dataset"] != expect_dataset:
            raise UserError(f"experts in {root} were trained on dataset '{m['dataset']}', "
                            f"not '{expect_dataset}'; {_FIX}")
        if expect_model is not None and m["model"] != expect_model:
            raise UserError(f"experts in {root} are '{m['model']}' models, not '{expect_model}'; {_FIX}")
        stored_pre = m["preprocess"]
        if expect_fingerprint is not None and stored_pre["fingerprint"] != expect_fingerprint:
            raise UserError(f"experts in {root} saw data preprocessed as {stored_pre['kind']} (fingerprint "
                            f"{stored_pre['fingerprint']}), not this run's (fingerprint {expect_fingerprint}); "
                            f"experts must see the run's exact preprocessing (SPEC P6); {_FIX}")
        if expect_layout is not None:
            difference = _layout_difference(m["layout"], expect_layout)
            if difference is not None:
                raise UserError(f"experts in {root} do not fit the model: {difference}; {_FIX}")
        if not m["experts"]:
            raise UserError(f"{root} has no finished experts yet; resume `distillery experts` with that output dir")
        for entry in m["experts"]:
            _check_shard(root, entry, m)
        if cache is None:
            cache = sum((root / e["file"]).stat().st_size for e in m["experts"]) <= AUTO_CACHE_BYTES
        return cls(root, m, cache)

    @property
    def num_experts(self) -> int:
        """Number of finished experts (k in checkpoint/pair runs over 0..num_experts-1, in expert-index order)."""
        return len(self._files)

    @property
    def epochs(self) -> int:
        """Training epochs per expert; checkpoints run from 0 (init) to `epochs`."""
        return self.manifest["epochs"]

    @property
    def num_params(self) -> int:
        """Length P of every checkpoint vector."""
        return self.manifest["layout"]["num_params"]

    @property
    def experts(self) -> list[dict]:
        """Manifest entries of the finished experts: index, file, seed, sha256, val_acc, test_acc."""
        return self.manifest["experts"]

    def checkpoint(self, k: int, epoch: int) -> torch.Tensor:
        """Parameters (P,) float32 on the CPU of expert k after `epoch` epochs (0 = its init)."""
        return self._rows(k, [epoch])[0]

    def pair(self, k: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ_start, θ_end) of expert k, reading only those two rows: the MTT start point and target."""
        rows = self._rows(k, [start, end])
        return rows[0], rows[1]

    def trajectory(self, k: int) -> torch.Tensor:
        """The whole trajectory (epochs + 1, P) of expert k."""
        return self._rows(k, list(range(self.epochs + 1)))

    def verify(self) -> None:
        """Re-hash every shard against the manifest (reads everything; open() only checks the headers)."""
        for entry, path in zip(self.experts, self._files):
            if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
                raise _corrupt(path, "its sha256 does not match manifest.json")

    def _check_once(self, k: int) -> bytes | None:
        """Hash shard k against its manifest sha256 the first time this process uses it; the bytes read, if any.

        A damaged shard then stops the run with a message naming it, instead of surfacing later as a NaN loss."""
        path, want = self._files[k], self.experts[k]["sha256"]
        key = (str(path.resolve()), want)
        if key in _VERIFIED:
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != want:
            raise _corrupt(path, "its sha256 does not match manifest.json")
        check_trajectory(load_bytes(data)["trajectory"], f"expert shard {path}",
                         "retrain that expert: delete the shard and rerun the command that trained it")
        _VERIFIED.add(key)
        return data

    def _rows(self, k: int, epochs: list[int]) -> torch.Tensor:
        """Rows `epochs` of expert k's trajectory as a new (len(epochs), P) tensor."""
        if not 0 <= k < self.num_experts:
            raise IndexError(f"expert {k} out of range 0..{self.num_experts - 1}")
        for e in epochs:
            if not 0 <= e <= self.epochs:
                raise IndexError(f"epoch {e} out of range 0..{self.epochs}")
        data = self._check_once(k)
        if self._cache is not None:
            if k not in self._cache:
                self._cache[k] = (load_file(self._files[k]) if data is None else load_bytes(data))["trajectory"]
            return self._cache[k][epochs]
        with safe_open(self._files[k], framework="pt") as f:
            rows = f.get_slice("trajectory")
            return torch.cat([rows[e:e + 1] for e in epochs])


def limited(experts: list[dict], max_files: int | None, max_experts: int | None) -> list[dict]:
    """The manifest entries --max-files / --max-experts keep (see `limit_experts`)."""
    return [e for e in experts if (max_files is None or e["index"] // EXPERTS_PER_FILE < max_files)
            and (max_experts is None or e["index"] % EXPERTS_PER_FILE < max_experts)]


def store_recipe(root: str | Path, max_files: int | None = None, max_experts: int | None = None) -> dict:
    """The expert options a run with the store at `root` really uses, read from its manifest (for config.json and
    the report, in place of the recipe it would have trained): experts kept by the limits, epochs, lr, momentum,
    weight decay, lr decay."""
    m = _read_manifest(Path(root) / MANIFEST)
    return {"num_experts": len(limited(m["experts"], max_files, max_experts)), "expert_epochs_train": m["epochs"],
            "expert_lr": m["lr"], "expert_momentum": m.get("momentum", 0.0), "expert_l2": m.get("weight_decay", 0.0),
            "expert_decay": bool(m.get("decay", False))}


def limit_experts(store: ExpertStore, max_files: int | None = None, max_experts: int | None = None) -> ExpertStore:
    """The store seen through MTT distill.py's --max_files / --max_experts: MTT keeps experts in files of
    `EXPERTS_PER_FILE` (buffer.py's save_interval) and reads `max_files` files, `max_experts` experts of each.
    Here "file" f holds experts 10f .. 10f + 9 by index; MTT takes random files and experts, we take the first ones
    (the experts are i.i.d., so only the count matters). None = no limit."""
    if max_files is None and max_experts is None:
        return store
    kept = limited(store.experts, max_files, max_experts)
    if not kept:
        raise UserError(f"--max-files {max_files} / --max-experts {max_experts} leave none of the "
                        f"{store.num_experts} experts in {store.root}; raise them")
    return ExpertStore(store.root, {**store.manifest, "experts": kept}, cache=store._cache is not None)


def _corrupt(path: Path, reason: str) -> UserError:
    """The error for a damaged shard: what is wrong and how to get it retrained."""
    return UserError(f"expert shard {path} is corrupt ({reason}); delete it and run the command that trained it "
                     "again (`distillery experts` with the same --out, or the same `distillery distill` for cached "
                     "experts): only that expert is retrained")


def _check_shard(root: Path, entry: dict, manifest: dict) -> None:
    """Cheap header check of one shard: readable, a float32 (epochs + 1, P) `trajectory`, the right expert."""
    path = root / entry["file"]
    if not path.is_file():
        raise UserError(f"expert shard {path} listed in manifest.json is missing; rerun `distillery experts` with the "
                        "same output dir to retrain it")
    want = [manifest["epochs"] + 1, manifest["layout"]["num_params"]]
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if "trajectory" not in f.keys():
                raise _corrupt(path, "no 'trajectory' tensor")
            rows = f.get_slice("trajectory")
            shape, dtype = list(rows.get_shape()), rows.get_dtype()
    except (SafetensorError, OSError) as err:
        raise _corrupt(path, str(err).splitlines()[0]) from err
    if shape != want or dtype != "F32":
        raise _corrupt(path, f"its trajectory is {dtype} {shape}, expected F32 {want}")
    if meta.get("layout_hash") != manifest["layout"]["hash"] or meta.get("expert") != str(entry["index"]):
        raise _corrupt(path, f"its header belongs to another expert or model than entry {entry['index']}")
