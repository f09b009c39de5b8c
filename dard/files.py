"""Files that must never be seen half-written, and their checksums, on a local disk or any
pyarrow filesystem URI (``s3://...``, ``gs://...``): model files, checkpoints, shard parts and
manifests all go through here."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import time
from pathlib import Path
from typing import BinaryIO, Callable

import pyarrow.fs as pafs


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a pyarrow-supported URI."""
    text = str(uri)
    if is_uri(text):
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` is a ``scheme://`` storage URI (never to go through pathlib)."""
    return "://" in str(location)


def absolute(location: str | Path) -> str:
    """A URI unchanged; a local path made absolute (Ray workers and Tune run in other directories)."""
    return str(location) if is_uri(location) else str(Path(location).expanduser().absolute())


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def exists(uri: str | Path) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str | Path) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def within(base: str | Path, *names: str) -> str:
    """``names`` below ``base``, a local path or a ``scheme://`` URI (pathlib would turn
    ``s3://bucket`` into a local ``s3:/bucket``)."""
    text = str(base)
    return "/".join([text.rstrip("/"), *names]) if is_uri(text) else str(Path(text, *names))


def write_bytes(uri: str | Path, data: bytes) -> None:
    atomic_write(uri, lambda f: f.write(data))


def make_dirs(uri: str | Path) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def listing(folder: str | Path) -> dict[str, str]:
    """Every file below ``folder`` (path relative to it, ``/``-separated) -> its sha256."""
    fs, root = resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {info.path[len(root):].lstrip("/"): _sha256_of(fs, info.path)
            for info in sorted(infos, key=lambda i: i.path) if info.type == pafs.FileType.File}


def sha256(uri: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return _sha256_of(*resolve(uri))


def _sha256_of(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(uri: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(stream)`` into a temporary file beside ``uri``, then rename it into place: a crash
    leaves the previous file (or none), never a partial one. Creates the folder. A failed write
    removes its temporary file; a full disk is said as such (``OSError`` ENOSPC naming the path)."""
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{time.time_ns()}"
    try:
        with fs.open_output_stream(tmp) as stream:
            write(stream)
        fs.move(tmp, path)
    except BaseException as err:
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        if _no_space(err):
            raise OSError(errno.ENOSPC, f"no space left on the device holding {path}: free some and run again "
                                        "(the previous file, if any, is intact)") from err
        raise


def _no_space(err: BaseException | None) -> bool:
    """Whether a (possibly wrapped: torch's zip writer says only "file write failed") error is ENOSPC."""
    while err is not None:
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False
