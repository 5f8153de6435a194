"""Atomic file writes: a file is either the old one or the complete new one, never half written.

Files are created with the permissions the umask allows (like `open`), not the 0600 of a bare `mkstemp`, so a
colleague can read a shared set. A write that the file system refuses (disk full, read-only, no permission, a
file where a folder should be) is a `UserError` naming the path and the cause; the old file is left untouched.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

_FULL, _READONLY = "free some space or write somewhere else", "choose a writable location"
_FIXES = {errno.ENOSPC: _FULL, errno.EDQUOT: _FULL, errno.EROFS: _READONLY, errno.EACCES: _READONLY,
          errno.EPERM: _READONLY}


def write_error(path: str | os.PathLike, err: OSError) -> UserError:
    """The one-line UserError for a write the file system refused."""
    fix = _FIXES.get(err.errno, "choose another location")
    return UserError(f"cannot write {path}: {err.strerror or err}; {fix}")


def _umask() -> int:
    """The process umask (Python can only read it by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp(folder: Path, name: str, suffix: str = ".tmp") -> tuple[int, str]:
    """A temp file (fd, path) next to `name` in `folder`, with the mode a plain `open` would give it."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=suffix)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def ensure_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Create folder `path` (with parents) or raise one UserError saying why it cannot be used; checked up front."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is an existing file, not a folder; choose a folder name")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(path, err) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {path}: permission denied; choose a writable location for {what}")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and `os.replace`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = make_temp(path.parent, path.name)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _unlink(tmp)
        raise write_error(path, err) from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(tmp: str) -> None:
    """Remove a temp file if it is still there."""
    if os.path.exists(tmp):
        os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
