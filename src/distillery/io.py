"""Atomic file writes: a file is either the old one or the complete new one, never half written.

Files are created with the permissions the umask allows (like `open`), not the 0600 of a bare `mkstemp`, so a
colleague can read a shared set. A write that the file system refuses (disk full, read-only, no permission, a
file where a folder should be) is a `UserError` naming the path and the cause; the old file is left untouched.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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


def inside(root: str | os.PathLike, rel: str, what: str, fix: str = "restore it from a copy") -> Path:
    """`root / rel` for a relative path read from metadata, refused (as damaged `what`) unless it stays inside root.

    A manifest or sidecar is user-writable: an absolute path, `..` or a symlink out of the store must not make a
    reader open, or an error message advise deleting, a file elsewhere."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel):
        raise UserError(f"{what} is damaged: it names {rel!r}, not a file inside {root}; {fix}")
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if path == base or base not in path.parents:
        raise UserError(f"{what} is damaged: it names {rel!r}, outside {root}; {fix}")
    return Path(root) / rel


@contextmanager
def replaced_dir(path: str | os.PathLike, replace: bool) -> Iterator[Path]:
    """Yield a private temp folder beside `path` to write into; on success it becomes `path` whole.

    A non-empty `path` is refused unless `replace` (then the old folder goes only once the new one is complete); on
    failure the temp folder is removed and `path` is untouched."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is an existing file, not a folder; choose a folder name")
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise UserError(f"--out {path} is not empty; pass --replace (the API: replace=True) to replace it whole, "
                        "or choose a new folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as err:
        raise write_error(path, err) from None
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / "old")
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:  # put the old folder back
                os.replace(old / "old", path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(path, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
