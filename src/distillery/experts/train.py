"""Training experts (SPEC §4.1): the reference recipe, resumable from the last finished epoch, split over processes.

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

While training, the store directory (`experts.store`) also holds

    .partial/expert_0007/epoch_0012.safetensors
                             `theta` (P,) after epoch 12, `rng` (the expert's generator state) and, with momentum,
                             `momentum` (P,), so an interrupted run resumes from the last finished epoch; removed
                             once the expert's shard is written
    .partial/expert_0007.lock  flock-ed by the one process training expert 7 (removed when it is done): two
                             commands sharing a store or the cache split the experts and wait for each other

The manifest is rewritten after each finished expert, so a killed run loses at most the epoch in progress.
BatchNorm models are refused: their running statistics are not in the flat parameter vector that MTT/TESLA match
(SPEC §1.3).

Several processes (`torchrun --nproc_per_node G -m distillery.cli experts ...`, docs/SCALING.md): rank r trains
experts r, r + G, r + 2G, ... into the same directory. Since an expert depends only on its index, the store equals a
single-process one (bit-equal trajectories and the same manifest at the same thread count; the shard bytes and their
sha256 differ between any two processes, because safetensors orders header metadata keys randomly per process), and
a half-finished run resumes with any number of processes.
"""

from __future__ import annotations

import copy
import fcntl
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from ..augment import Augment
from ..device import resolve_device
from ..distributed import barrier, is_main_process, rank_and_world
from ..errors import UserError
from ..evaluation.parallel import map_runs
from ..evaluation.training import FlatSGD, capturable, plain_step
from ..io import atomic_write_bytes
from ..models import FunctionalModel, create_model, has_batchnorm, init_seeded
from ..config.validate import check_cuda
from .store import (ExpertStore, manifest_lock, new_manifest, read_manifest, record_expert, start_manifest,
                    write_expert)

if TYPE_CHECKING:
    from ..data import Dataset, Split

PARTIAL = ".partial"


def expert_seed(seed: int, k: int) -> int:
    """The seed of expert `k` in a run with `seed`: its init and its generator (data order, augmentation)."""
    return seed * 100003 + k


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
    with manifest_lock(out):  # torchrun ranks start at once: one creates the manifest, the others check it
        manifest = start_manifest(out, new_manifest(ds, model, fm, epochs=epochs, lr=lr, decay=decay,
                                                    momentum=momentum, weight_decay=weight_decay, batch=batch,
                                                    seed=seed))
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
            with manifest_lock(out):
                finished = {e["index"] for e in read_manifest(out)["experts"]}
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


def duration(seconds: float) -> str:
    """Seconds as 'h:mm:ss' (or 's' below a minute)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"


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
    entry = write_expert(out, k, trajectory, manifest["layout"]["hash"], s,
                         val_acc=split_accuracy(fm, final, ds.val, device),
                         test_acc=split_accuracy(fm, final, ds.test, device))
    record_expert(out, entry)
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
