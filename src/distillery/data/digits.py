"""scikit-learn's 8x8 digits, read from the CSV bundled with scikit-learn (importing it costs seconds), with the
fixed stratified train/test split its `train_test_split` would make."""

from __future__ import annotations

import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np

from .formats import RawSplit

DIGITS_CSV = ("datasets", "data", "digits.csv.gz")  # inside the scikit-learn package: 64 pixels 0..16, label


def read_sklearn_digits() -> tuple[RawSplit, RawSplit]:
    """scikit-learn's 1,797 8x8 digits with a fixed stratified split (1/3 test, random_state=0).

    Pixel values 0..16 become round(v * 255 / 16) so that 16 maps to exactly 255."""
    pixels, target = sklearn_digits()
    images = np.rint(pixels * (255 / 16)).astype(np.uint8)[..., None]
    labels = target.astype(np.int64)
    train_idx, test_idx = stratified_shuffle_split(labels, n_test=math.ceil(len(labels) / 3), seed=0)
    classes = [str(d) for d in range(10)]
    return (RawSplit(images[train_idx], labels[train_idx], classes),
            RawSplit(images[test_idx], labels[test_idx], classes))


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """`load_digits()`'s images (1797, 8, 8) float64 0..16 and labels, read straight from the CSV bundled with
    scikit-learn when it is found (importing scikit-learn costs seconds), else through `load_digits`."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((p for p in (Path(f).joinpath(*DIGITS_CSV) for f in folders) if p.is_file()), None)
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def stratified_shuffle_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sorted indices, the same as scikit-learn's `train_test_split(np.arange(n), test_size=n_test,
    random_state=seed, stratify=labels)` (its StratifiedShuffleSplit, re-done here to spare importing it)."""
    rng = np.random.RandomState(seed)
    _, y_indices, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _approximate_mode(class_counts, len(labels) - n_test, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train, test = [], []
    for i, count in enumerate(class_counts):
        perm = class_indices[i].take(rng.permutation(count), mode="clip")
        train.extend(perm[:n_i[i]])
        test.extend(perm[n_i[i]:n_i[i] + t_i[i]])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Draws per class for a stratified sample of n_draws: the floored proportional shares, the rest given to the
    largest remainders with ties broken at random (scikit-learn's `_approximate_mode`)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)
