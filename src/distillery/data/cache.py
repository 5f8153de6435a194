"""Decoding image files, once: decoded uint8 arrays are cached as `.npz` under `cache_dir()`, keyed by the file
list, sizes and mtimes (so edited folders are decoded again), because decoding is slow."""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import UserError, first_line
from ..io import atomic_write_bytes
from .formats import RawSplit

_CACHE_VERSION = 1  # bump when the decoding changes, so old cache files are not used


def cache_dir() -> Path:
    """Where decoded image arrays are cached: $DISTILLERY_CACHE, else ~/.cache/distillery."""
    return Path(os.environ.get("DISTILLERY_CACHE") or Path.home() / ".cache" / "distillery")


def _resize_and_crop(im: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to `resolution` (the longer one to int(res * long / short)), then the centred square: the
    sizes and offsets of torchvision's Resize(res) and CenterCrop(res)."""
    w, h = im.size
    if min(w, h) != resolution:
        scale = resolution / min(w, h)
        w, h = (resolution, int(h * scale)) if w <= h else (int(w * scale), resolution)
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    left, top = int(round((w - resolution) / 2)), int(round((h - resolution) / 2))
    return im.crop((left, top, left + resolution, top + resolution))


def _decode_one(path: str, resolution: int, mode: str, crop: bool = False) -> np.ndarray:
    """Decode one image file to a (res, res, C) uint8 array (squashed to a square, or resized and centre-cropped)."""
    try:
        with Image.open(path) as im:
            if im.mode != mode:
                im = im.convert(mode)
            if crop:
                im = _resize_and_crop(im, resolution)
            elif im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.Resampling.BILINEAR)
            array = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}; remove or replace the file") from e
    return array.reshape(resolution, resolution, -1)


def _decode_all(tag: str, files: list[str], resolution: int, channels: int, crop: bool = False) -> np.ndarray:
    """Decode many image files with a thread pool and a progress bar (PIL releases the GIL only inside the
    decoder, so the gain over one thread is modest; the npz cache makes it a one-time cost)."""
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), resolution, resolution, channels), dtype=np.uint8)
    chunk = 512

    def work(start: int) -> int:
        for i in range(start, min(start + chunk, len(files))):
            out[i] = _decode_one(files[i], resolution, mode, crop)
        return min(chunk, len(files) - start)

    workers = min(32, (os.cpu_count() or 1) + 4)
    with ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(files), desc=f"decoding {tag}", unit="img",
                 disable=None, leave=False) as bar:
        for done in pool.map(work, range(0, len(files), chunk)):
            bar.update(done)
    return out


def decode_cached(tag: str, files: list[str], labels: np.ndarray, classes: list[str], resolution: int,
                   channels: int, crop: bool = False) -> RawSplit:
    """Decode `files`, or load the arrays decoded earlier from the npz cache when no file has changed."""
    if not files:
        raise UserError(f"no images listed for {tag}")
    stats = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise UserError(f"cannot read image file {f}: {e.strerror}") from e
        stats.append((f, st.st_size, st.st_mtime_ns))
    key = json.dumps([_CACHE_VERSION, resolution, channels, classes, labels.tolist(), stats]
                     + (["center-crop"] if crop else []))  # unchanged keys for the square resize
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    path = cache_dir() / f"{tag}-{len(files)}-{digest}.npz"

    if path.is_file():
        cached = _read_decoded(path, (len(files), resolution, resolution, channels), labels, classes)
        if cached is not None:
            return cached
    images = _decode_all(tag, files, resolution, channels, crop)
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels, classes=np.array(classes))
    try:
        atomic_write_bytes(path, buffer.getvalue())  # a private temp file, renamed: readers see old or whole
    except UserError as e:
        warnings.warn(f"could not cache decoded images ({e}); they will be decoded again next time", stacklevel=3)
    return RawSplit(images, labels, list(classes))


def _read_decoded(path: Path, shape: tuple[int, ...], labels: np.ndarray, classes: list[str]) -> RawSplit | None:
    """The decoded-image cache file `path` if it holds exactly what was decoded (uint8 images of `shape`, the
    same labels and classes); otherwise a warning and None, so the images are decoded again and the file rewritten."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            images, got_labels, got_classes = cached["images"], cached["labels"], [str(c) for c in cached["classes"]]
        if images.dtype != np.uint8 or images.shape != shape:
            raise ValueError(f"images are {images.dtype} {images.shape}, expected uint8 {shape}")
        if not np.array_equal(got_labels, labels) or got_classes != list(classes):
            raise ValueError("its labels or class names differ from the files'")
    except Exception as e:  # noqa: BLE001 - the npz reader raises many kinds (even tokenize errors); rebuild
        warnings.warn(f"the decoded-image cache {path} is damaged ({first_line(e)}); decoding the images again",
                      stacklevel=4)
        return None
    return RawSplit(images, got_labels.astype(np.int64), got_classes)
