"""Checking a shard directory: every part exists, has the manifest's size, sha256, schema and rows."""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from dard.files import join, resolve, sha256
from dard.shards.format import ShardError, manifest_fingerprint, schema

def check_part(directory: str, entry: dict[str, Any], image_shape, num_classes: int, full: bool = True) -> None:
    """Raise :class:`ShardError` naming the file unless the part exists, matches size, checksum, schema, rows."""
    fs, base = resolve(directory)
    path = join(base, entry["file"])
    rebuild = f"re-run `dard precompute --out {directory}` to rebuild it (finished parts are kept)"
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ShardError(f"{path}: missing part; {rebuild}")
    if info.size != entry["bytes"]:
        raise ShardError(f"{path}: {info.size} bytes, the manifest says {entry['bytes']} (truncated?); {rebuild}")
    if full and sha256(path if "://" not in str(directory) else join(str(directory), entry["file"])) != entry["sha256"]:
        raise ShardError(f"{path}: sha256 differs from the manifest (corrupted); {rebuild}")
    try:
        table = open_table(fs, path)
    except pa.ArrowInvalid as err:
        raise ShardError(f"{path}: not a readable Arrow IPC file ({err}); {rebuild}") from err
    if not table.schema.equals(schema(tuple(image_shape), num_classes), check_metadata=False):
        raise ShardError(f"{path}: schema differs from the format's; {rebuild}")
    if table.num_rows != entry["rows"]:
        raise ShardError(f"{path}: {table.num_rows} rows, the manifest says {entry['rows']}; {rebuild}")


def verify(directory: str, full: bool = True) -> dict[str, Any]:
    """Check the manifest and every part (checksums when ``full``); returns the manifest."""
    from dard.shards.store import read_manifest  # store imports this module (resumable parts are checked)

    manifest = read_manifest(directory)
    for entry in manifest["parts"]:
        check_part(directory, entry, manifest["image_shape"], manifest["num_classes"], full)
    expected = manifest.get("rows")
    total = sum(p["rows"] for p in manifest["parts"])
    if expected is not None and total != expected:
        raise ShardError(f"{directory}: parts hold {total} rows, the manifest expects {expected}; re-run precompute")
    return manifest


def check_fingerprint(directory: str, manifest: dict[str, Any]) -> None:
    """Refuse a manifest whose fields were edited after precompute wrote it: its recorded
    fingerprint must be the one its own teacher, split, data, attack, seed and parts give."""
    if manifest.get("fingerprint") != manifest_fingerprint(manifest):
        raise ShardError(f"{directory}: the manifest's fields were edited after the shards were built (its "
                         "fingerprint no longer matches its teacher, split, data, attack, seed or parts); rebuild "
                         f"with `dard precompute --out {directory}`")


def open_table(fs: pafs.FileSystem, path: str) -> pa.Table:
    if isinstance(fs, pafs.LocalFileSystem):
        return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()  # zero copy: pages load on access
    with fs.open_input_file(path) as f:
        return pa.ipc.open_file(f).read_all()


