"""Downloads with checksums: a file only reaches its final name once its sha256/md5 matches.

`fetch_dataset` knows the canonical sources of MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100, SVHN and Tiny-ImageNet
(ImageNet needs a registration, so it has none). A mirror (the
`base_url` argument or $DISTILLERY_MIRROR) replaces the source folder; file names and checksums stay the same.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import UserError
from ..io import atomic_write_bytes, make_temp, write_error
from .formats import folder_layout
from .registry import canonical_name, get_spec

MIRROR_ENV = "DISTILLERY_MIRROR"


@dataclass(frozen=True)
class Source:
    """Where a dataset is published and what it must look like once fetched."""

    base_url: str
    md5: dict[str, str]  # published file name -> md5 of that file (the checksums torchvision also uses)
    folder: str  # folder under the data root that `load_dataset` searches
    unpacked_sha256: dict[str, str] = field(default_factory=dict)  # IDX name -> sha256 of the decompressed file
    kind: str = "archive"  # archive: one .tar.gz/.zip holding `folder`; files: the files are the dataset (SVHN)


# Decompressed IDX files: MNIST sha256 of the canonical decompressed files; Fashion-MNIST sha256 measured on the Debian
# package's files, which README.md states are byte-identical to the canonical ones (prefixes match it).
SOURCES: dict[str, Source] = {
    "mnist": Source(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        "mnist/MNIST/raw",
        {
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    ),
    "fashion-mnist": Source(
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "fashion-mnist/FashionMNIST/raw",
        {
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
    ),
    "cifar10": Source(
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        "cifar-10-batches-py",
    ),
    "cifar100": Source(
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
        "cifar-100-python",
    ),
    "svhn": Source(  # md5s as in torchvision's SVHN; the 'extra' split is not used by the distillation codes
        "http://ufldl.stanford.edu/housenumbers/",
        {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373", "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"},
        "svhn",
        kind="files",
    ),
    "tiny-imagenet": Source(
        "http://cs231n.stanford.edu/",
        {"tiny-imagenet-200.zip": "90528d7ca1a48142e341f4ef8d21d0de"},
        "tiny-imagenet-200",
    ),
}


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, *, md5: str | None = None,
             progress: bool = True) -> Path:
    """Stream `url` to a temp file next to `dest` and move it into place only if its checksum(s) match."""
    expected = {kind: value.lower() for kind, value in (("sha256", sha256), ("md5", md5)) if value}
    if not expected:
        raise ValueError("download() needs the expected sha256 or md5 of the file")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    hashes = {kind: hashlib.new(kind, usedforsecurity=False) for kind in expected}
    fd, tmp = make_temp(dest.parent, dest.name, ".part")  # honours the umask, as every file we write
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response, \
                        tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B",
                             unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress,
                             leave=False) as bar:
                    while chunk := response.read(1 << 20):
                        try:
                            out.write(chunk)
                        except OSError as e:  # disk full, not the network: say so
                            raise write_error(dest, e) from None
                        for h in hashes.values():
                            h.update(chunk)
                        bar.update(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
                raise UserError(f"cannot download {url}: {reason}; check the network, or set {MIRROR_ENV} "
                                f"to a mirror that holds {dest.name}") from e
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as e:
                raise write_error(dest, e) from None
        for kind, want in expected.items():
            got = hashes[kind].hexdigest()
            if got != want:
                raise UserError(f"checksum mismatch for {url}: expected {kind} {want}, got {got}; "
                                f"the download was deleted, not kept as {dest}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def fetch_dataset(name: str, root: str | os.PathLike, base_url: str | None = None, progress: bool = True) -> Path:
    """Download and unpack a dataset under `root` (a no-op if already there); returns the dataset's folder."""
    name = canonical_name(name)
    if name not in SOURCES:
        raise UserError(f"{name} has no automatic download (only {', '.join(SOURCES)}); "
                        f"{get_spec(name).how_to_get}")
    source = SOURCES[name]
    base = (base_url or os.environ.get(MIRROR_ENV) or source.base_url).rstrip("/") + "/"
    target = Path(root) / source.folder
    if target.is_dir() and folder_layout(target) is not None:
        return target
    if source.unpacked_sha256:
        _fetch_gzipped_idx(source, base, target, progress)
    elif source.kind == "files":
        for file_name, md5 in source.md5.items():
            if not (target / file_name).is_file():  # present = verified by an earlier, interrupted fetch
                download(base + file_name, target / file_name, md5=md5, progress=progress)
    else:
        _fetch_archive(source, base, target, progress)
    return target


def _fetch_gzipped_idx(source: Source, base: str, target: Path, progress: bool) -> None:
    """Download each .gz, check it (md5) and its decompressed bytes (sha256), keep only the decompressed file."""
    for gz_name, md5 in source.md5.items():
        final = target / gz_name.removesuffix(".gz")
        if final.is_file():  # written atomically after verification by an earlier, interrupted fetch
            continue
        archive = download(base + gz_name, target / gz_name, md5=md5, progress=progress)
        try:
            data = gzip.decompress(archive.read_bytes())
        except (OSError, EOFError) as e:
            raise UserError(f"{archive} passed its md5 check but does not decompress: {e}") from e
        finally:
            archive.unlink()
        got = hashlib.sha256(data).hexdigest()
        if got != source.unpacked_sha256[final.name]:
            raise UserError(f"checksum mismatch for {final.name} after decompression: expected sha256 "
                            f"{source.unpacked_sha256[final.name]}, got {got}; the file was not kept")
        atomic_write_bytes(final, data)


def _fetch_archive(source: Source, base: str, target: Path, progress: bool) -> None:
    """Download one verified tarball or zip, extract it into a temp folder and rename the dataset folder into place."""
    if target.exists():
        raise UserError(f"{target} exists but is incomplete; remove it and download again")
    (archive_name, md5), = source.md5.items()
    target.parent.mkdir(parents=True, exist_ok=True)
    archive = download(base + archive_name, target.parent / archive_name, md5=md5, progress=progress)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.extract-"))
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(scratch)  # zipfile drops absolute paths and '..' parts of member names
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(scratch, filter="data")
        extracted = scratch / target.name
        if not extracted.is_dir():
            raise UserError(f"{archive} does not contain the folder {target.name}/")
        os.replace(extracted, target)
        archive.unlink()
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"cannot extract {archive}: {e}; delete it and download again") from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
