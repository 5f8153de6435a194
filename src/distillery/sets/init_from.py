"""`distill --init-from SET`: start a distillation from a saved set (RaT-BPTT's `--ckptname`), for every method.

The set must come from the same dataset, with the same preprocessing and the images per class the run starts with
(`Method.start_ipc`: for a boosted RaT-BPTT run, the first block). The method takes what it needs from the set
(`Method.init_from`: the images; a RaT-BPTT run that learns labels also the learned labels). Everything else
(optimiser states, the MTT step size) starts afresh, as in the published code.
"""

from __future__ import annotations

from typing import Any

from ..data.registry import IMAGEFOLDER_PREFIX, canonical_name
from ..errors import UserError
from ..methods import get_method
from .synset import SyntheticSet


def load_init_set(path: str, config: dict[str, Any]) -> SyntheticSet:
    """Read SET and check its dataset and images per class against the run's configuration (no data read yet)."""
    s = SyntheticSet.load(path)
    dataset, wanted = s.meta.get("dataset"), config.get("dataset")
    if wanted and not str(wanted).startswith(IMAGEFOLDER_PREFIX):
        wanted = canonical_name(wanted)
    if dataset and wanted and dataset != wanted:
        raise UserError(f"--init-from {path} was distilled on {dataset}, this run is on {config['dataset']}; "
                        "use a set of the same dataset")
    ipc = get_method(config["method"]).start_ipc(config)
    if s.ipc != ipc:
        raise UserError(f"--init-from {path} has {s.ipc} images per class, this run starts with {ipc}; "
                        f"pass --ipc {s.ipc} or a set with {ipc} images per class")
    return s


def check_init_set(s: SyntheticSet, dataset) -> None:
    """The set's image shape and preprocessing must be the loaded dataset's."""
    spec = dataset.spec
    if tuple(s.images.shape[1:]) != (spec.channels, *spec.im_size):
        raise UserError(f"--init-from set has images of shape {tuple(s.images.shape[1:])}, the dataset "
                        f"{(spec.channels, *spec.im_size)}; use a set of the same dataset and resolution")
    theirs = s.preprocess.get("meta", {})
    ours = dataset.preprocess.meta()
    if theirs.get("kind") != ours.get("kind") or \
            ("fingerprint" in theirs and theirs["fingerprint"] != dataset.preprocess.fingerprint()):
        raise UserError("--init-from set was made with another preprocessing (mean/std or ZCA fit) than this run's; "
                        "use the same --zca and --val-fraction it was distilled with")
