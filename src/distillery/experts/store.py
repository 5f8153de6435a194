"""The expert store: its manifest (written under a lock, read by one checked reader) and `ExpertStore`, which
validates a store on open and reads it lazily (SPEC §4.1).

Store format (format_version 1), a directory:

    manifest.json            what the experts are and which are finished (below)
    expert_0000.safetensors  one tensor `trajectory`, float32, shape (epochs + 1, P); row e = parameters after e
                             epochs in `module.parameters()` order; header metadata repeats expert index, seed and
                             layout hash so a shard copied into the wrong store is caught
    ...
    .partial/                only while training: per-epoch snapshots and per-expert locks (`experts.train`)

manifest.json keys: format ("distillery-experts"), format_version, dataset, model, channels, num_classes,
im_size [h, w], preprocess {kind, fingerprint} (from `ds.preprocess`; ZCA and non-ZCA experts never mix, SPEC
P6), epochs, lr, decay, momentum, weight_decay, batch, dsa_strategy, seed, layout
{names, shapes, num_params, hash} (parameters() order; hash = sha256 of the JSON list of [name, shape] pairs,
SPEC P10), torch_version, and experts: a list of
{index, file, seed, sha256, val_acc, test_acc} for the finished experts (val_acc is null without a validation
split; test accuracy is only reported, never used to select anything).

Every file is written atomically (`distillery.io`). Each manifest update is a read, add, atomic rewrite under an
exclusive `flock` on `.manifest.lock`, so processes finishing experts at the same time (torchrun ranks, or two
commands sharing a store) never lose an entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..checks import check_trajectory
from ..errors import UserError, first_line
from ..io import atomic_write_bytes, atomic_write_text, inside
from ..models import FunctionalModel

if TYPE_CHECKING:
    from ..data import Dataset

FORMAT = "distillery-experts"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".manifest.lock"
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


def param_layout(fm: FunctionalModel) -> dict:
    """Parameter names, shapes, count and a hash of them: what a flat vector's meaning depends on (SPEC P10)."""
    pairs = [[name, list(shape)] for name, shape in zip(fm.names, fm.shapes)]
    digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()
    return {"names": list(fm.names), "shapes": [list(s) for s in fm.shapes], "num_params": fm.num_params,
            "hash": digest}


def new_manifest(ds: Dataset, model: str, fm: FunctionalModel, *, epochs: int, lr: float, decay: bool,
                 momentum: float, weight_decay: float, batch: int, seed: int | None) -> dict:
    """The manifest of a store of `model` experts on `ds` trained with this recipe, no expert finished yet."""
    spec = ds.spec
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "dataset": spec.name, "model": model,
            "channels": spec.channels, "num_classes": spec.num_classes, "im_size": list(spec.im_size),
            "preprocess": {"kind": ds.preprocess.kind, "fingerprint": ds.preprocess.fingerprint()},
            "epochs": epochs, "lr": lr, "decay": decay, "momentum": momentum, "weight_decay": weight_decay,
            "batch": batch, "dsa_strategy": spec.dsa_strategy, "seed": seed, "layout": param_layout(fm),
            "torch_version": torch.__version__, "experts": []}


def write_manifest(out: Path, manifest: dict) -> None:
    """Write manifest.json atomically (processes sharing the store hold `manifest_lock` around read and write)."""
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))


def write_expert(out: Path, k: int, trajectory: torch.Tensor, layout_hash: str, seed: int | None,
                 **extra: Any) -> dict:
    """Write expert k's shard atomically and return its manifest entry: index, file, seed, sha256, then `extra`
    (accuracies, where it came from). `seed` None: an imported expert (its header says "imported")."""
    meta = {"format": FORMAT, "expert": str(k), "seed": "imported" if seed is None else str(seed),
            "layout_hash": layout_hash}
    data = safetensors_bytes({"trajectory": trajectory.contiguous()}, metadata=meta)
    entry = {"index": k, "file": f"expert_{k:04d}.safetensors", "seed": seed,
             "sha256": hashlib.sha256(data).hexdigest(), **extra}
    atomic_write_bytes(out / entry["file"], data)
    return entry


def read_manifest(root: str | Path) -> dict:
    """The manifest.json of the store at `root`, parsed and checked: the one reader every user of a manifest goes
    through, so a missing, foreign, old or damaged one is one UserError naming it."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"no expert store at {root} (manifest.json missing); train one with `distillery experts` "
                        "or pass the right --experts dir")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}); retrain with `distillery experts` into a fresh dir") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a distillery expert manifest; pass the dir `distillery experts` wrote")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has expert format version {manifest.get('format_version')}, this distillery reads "
                        f"version {FORMAT_VERSION}; retrain with `distillery experts`")
    missing = [key for key in _CONFIG_KEYS if key not in manifest]
    if missing:
        raise UserError(f"{path} is damaged: it lacks {', '.join(missing)}; retrain with `distillery experts` into a "
                        "fresh dir")
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


def start_manifest(out: Path, fresh: dict) -> dict:
    """Load the manifest of a run to resume (same settings, only experts whose shard still exists) or write `fresh`."""
    if not (out / MANIFEST).exists():
        write_manifest(out, fresh)
        return fresh
    old = read_manifest(out)
    for key in _CONFIG_KEYS:
        if old[key] != fresh[key]:
            shown = "the parameter layout" if key == "layout" else f"{key}={old[key]!r} (this call: {fresh[key]!r})"
            raise UserError(f"{out} already holds experts trained with {shown}; "
                            "use another output dir, or the same settings to resume")
    kept = [e for e in old["experts"] if (out / e["file"]).exists()]
    if kept != old["experts"]:  # forget experts whose shard is gone, on disk too: other ranks re-read the manifest
        old["experts"] = kept
        write_manifest(out, old)
    return old


@contextmanager
def manifest_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the store's manifest while reading and rewriting it (torchrun ranks share it)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a") as handle:  # the lock file stays empty; closing it releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def record_expert(out: Path, entry: dict) -> None:
    """Add a finished expert to manifest.json as it is on disk now (other ranks add theirs), rewritten atomically."""
    with manifest_lock(out):
        manifest = read_manifest(out)
        others = [e for e in manifest["experts"] if e["index"] != entry["index"]]
        manifest["experts"] = sorted([*others, entry], key=lambda e: e["index"])
        write_manifest(out, manifest)


def finished_experts(path: str | Path) -> set[int]:
    """Indices of the experts the store at `path` has finished (empty when there is no store yet)."""
    return {e["index"] for e in read_manifest(path)["experts"]} if (Path(path) / MANIFEST).is_file() else set()


def _layout_difference(stored: dict, fm: FunctionalModel) -> str | None:
    """How the model's parameter layout differs from the stored one, or None when they agree."""
    mine = param_layout(fm)
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
        m = read_manifest(root)
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
    m = read_manifest(root)
    return {"num_experts": len(limited(m["experts"], max_files, max_experts)), "expert_epochs_train": m["epochs"],
            "expert_lr": m["lr"], "expert_momentum": m["momentum"], "expert_l2": m["weight_decay"],
            "expert_decay": m["decay"]}


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
        raise _corrupt(path, first_line(err)) from err
    if shape != want or dtype != "F32":
        raise _corrupt(path, f"its trajectory is {dtype} {shape}, expected F32 {want}")
    if meta.get("layout_hash") != manifest["layout"]["hash"] or meta.get("expert") != str(entry["index"]):
        raise _corrupt(path, f"its header belongs to another expert or model than entry {entry['index']}")
