"""Files that must never be seen half-written, and their checksums, on a local disk or any
pyarrow filesystem URI (``s3://...``, ``gs://...``): model files, checkpoints, shard parts and
manifests all go through here."""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import time
from pathlib import Path
from typing import BinaryIO, Callable
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a pyarrow-supported URI. An object store's
    filesystem is made once per bucket and options (building an S3 client costs more than reading
    a small file: a folder of images would pay it per image); its path is the URI's, decoded."""
    text = str(uri)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    parts = urlsplit(text)
    if parts.scheme not in BUCKET_SCHEMES or parts.fragment:
        return pafs.FileSystem.from_uri(text)
    fs = _bucket_filesystem(parts.scheme, parts.netloc, parts.query)
    return fs, (parts.netloc.rpartition("@")[2] + unquote(parts.path)).rstrip("/")


BUCKET_SCHEMES = ("s3", "gs", "gcs")  # scheme://[credentials@]bucket/key: pyarrow's path is bucket/key


@functools.lru_cache(maxsize=32)
def _bucket_filesystem(scheme: str, netloc: str, query: str) -> pafs.FileSystem:
    """The filesystem of ``scheme://netloc?query`` (netloc: ``[credentials@]bucket``)."""
    return pafs.FileSystem.from_uri(f"{scheme}://{netloc}" + (f"?{query}" if query else ""))[0]


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


class DestinationError(ValueError):
    """An output destination that cannot take what a command would write; the message names it."""


def check_destination(dest: str | Path, *, what: str, kind: str = "file", suffixes: tuple[str, ...] = (),
                      local_only: str | None = None, inputs: tuple = ()) -> str:
    """Refuse, before any work, an output ``dest`` (a path or a URI) a command could not write:
    ``what`` names the option (``--out``). ``kind``: ``file`` or ``folder``. A URI must be of a
    filesystem pyarrow writes and its bucket must answer (one small probe); ``local_only`` (the
    reason) refuses URIs. A local file may not be an existing folder, nor a folder a file; its
    nearest existing folder must be writable; ``suffixes`` are the file endings accepted. A path is
    never read as ``scheme:`` + path (``s3:/bucket`` is a URI with a slash missing, not a folder).
    ``inputs``: what the command reads; an output over one of them is refused. Returns ``dest``."""
    text = str(dest)
    if is_uri(text):
        if local_only:
            raise DestinationError(f"{what} {text}: must be a local path ({local_only})")
        _check_uri(text, what, kind)
    else:
        head = Path(text).parts[0] if Path(text).parts else ""
        if head.endswith(":") and len(head) > 2:  # "s3:" -- a URI whose "//" was lost
            raise DestinationError(f"{what} {text}: looks like a URI with a slash missing ({head}//...); write "
                                   f"{head}//... for storage, or a path without '{head}'")
        _check_local(Path(text).expanduser(), what, kind)
    if kind == "file" and suffixes and not any(text.endswith(s) for s in suffixes):
        raise DestinationError(f"{what} {text}: must end in {' or '.join(suffixes)}")
    for source in inputs:
        if source is not None and _same(text, str(source)):
            raise DestinationError(f"{what} {text}: is an input of this command ({source}); write elsewhere")
    return text


def _check_uri(text: str, what: str, kind: str) -> None:
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except Exception as err:  # an unknown scheme, a malformed URI
        raise DestinationError(f"{what} {text}: not a storage URI dard can write ({_reason(err)}); use s3://, "
                               "gs:// or file:// (pyarrow's filesystems)") from err
    bucket = path.split("/", 1)[0] if not isinstance(fs, pafs.LocalFileSystem) else str(Path(path).parent)
    try:
        found = fs.get_file_info([bucket, path])
    except Exception as err:  # no credentials, an endpoint that does not answer
        raise DestinationError(f"{what} {text}: its storage does not answer ({_reason(err)})") from err
    if not isinstance(fs, pafs.LocalFileSystem) and found[0].type == pafs.FileType.NotFound:
        raise DestinationError(f"{what} {text}: the bucket {bucket!r} does not exist (or these credentials cannot see it)")
    if kind == "file" and found[1].type == pafs.FileType.Directory:
        raise DestinationError(f"{what} {text}: is a folder; name a file")
    if kind == "folder" and found[1].type == pafs.FileType.File:
        raise DestinationError(f"{what} {text}: is a file; name a folder")
    if isinstance(fs, pafs.LocalFileSystem):
        _check_local(Path(path), what, kind)


def _check_local(path: Path, what: str, kind: str) -> None:
    import os

    if kind == "file" and path.is_dir():
        raise DestinationError(f"{what} {path}: is a folder; name a file")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise DestinationError(f"{what} {path}: is a file; name a folder")
    candidates = [path.absolute()] if kind == "folder" else []  # a file is replaced: its folder must take it
    existing = next((p for p in [*candidates, *path.absolute().parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise DestinationError(f"{what} {path}: {existing} is a file, so this path cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DestinationError(f"{what} {path}: {existing} is not writable")


def _same(a: str, b: str) -> bool:
    if is_uri(a) or is_uri(b):
        return a.rstrip("/") == b.rstrip("/")
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        return pa.resolve() == pb.resolve() or (pa.exists() and pb.exists() and pa.samefile(pb))
    except OSError:
        return False


def _reason(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def upload_folder(local: str | Path, dest: str) -> list[str]:
    """Every file of the local folder ``local`` to ``dest`` (a URI or a path), each written atomically."""
    written = []
    for file in sorted(Path(local).rglob("*")):
        if file.is_file():
            target = within(dest, *file.relative_to(local).parts)
            write_bytes(target, file.read_bytes())
            written.append(target)
    return written
