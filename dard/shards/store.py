"""Shards on storage (a local folder or a pyarrow URI): parts written atomically with their unit
digests, per-part records for resumable building, the manifest written last, and the checks of
what was written (sizes, schema, rows, unit digests)."""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from dard.files import atomic_write, exists, join, resolve, sha256
from dard.shards.format import (FORMAT_VERSION, KINDS, MANIFEST, ShardError, batch_digest, manifest_fingerprint,
                                part_name, schema)


def _in(directory: str, name: str) -> str:
    """The URI or absolute path of ``name`` inside ``directory``."""
    return join(str(directory) if "://" in str(directory) else resolve(directory)[1], name)


def rebuild_hint(directory: str) -> str:
    return f"re-run `dard precompute --out {directory}` to rebuild it (finished parts are kept)"


def write_part(directory: str, part_id: int, kind: str, samples: int, batches: list[pa.RecordBatch]) -> dict[str, Any]:
    """Write one part atomically, then read it back: its manifest entry with the digest of every
    unit (record batch) as a reader will see it and the file's sha256."""
    path = _in(directory, part_name(part_id))

    def arrow(sink) -> None:
        with pa.ipc.new_file(sink, batches[0].schema) as writer:
            for batch in batches:
                writer.write_batch(batch)

    atomic_write(path, arrow)
    fs, local = resolve(path)
    with fs.open_input_file(local) as f:
        reader = pa.ipc.open_file(f)
        units = []
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            view = batch.column("view")
            units.append({"view": int(view[0].as_py()), "rows": batch.num_rows, "sha256": batch_digest(batch)})
    return {"file": part_name(part_id), "kind": kind, "samples": samples, "rows": sum(u["rows"] for u in units),
            "bytes": fs.get_file_info(local).size, "sha256": sha256(path), "units": units}


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    atomic_write(_in(directory, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest, checked for the fields and the format this version reads."""
    path = _in(directory, MANIFEST)
    fs, local = resolve(path)
    if not exists(path):
        raise ShardError(f"{path}: no manifest; this is not a finished shard directory. Build it with "
                         f"`dard precompute --teacher TEACHER --out {directory}` (it resumes an interrupted run).")
    try:
        with fs.open_input_stream(local) as f:
            manifest = json.loads(f.read().decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: corrupt manifest ({err}); delete it and re-run `dard precompute --out {directory}`") from err
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: corrupt manifest (not a JSON object); re-run `dard precompute --out {directory}`")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format version {manifest.get('format_version')}, this dard reads {FORMAT_VERSION}; "
                         "rebuild the shards with this version's `dard precompute`")
    for key in ("dataset", "split", "teacher", "views", "num_classes", "image_shape", "parts", "samples"):
        if key not in manifest:
            raise ShardError(f"{path}: manifest lacks {key!r}; rebuild with `dard precompute --out {directory}`")
    parts = manifest["parts"]
    entry_keys = ("file", "kind", "samples", "rows", "bytes", "sha256", "units")
    if not isinstance(parts, list) or not all(isinstance(e, dict) and all(k in e for k in entry_keys)
                                              and e["kind"] in KINDS for e in parts):
        raise ShardError(f"{path}: malformed 'parts' (each entry needs {', '.join(entry_keys)}); rebuild with "
                         f"`dard precompute --out {directory}`")
    return manifest


def check_fingerprint(directory: str, manifest: dict[str, Any]) -> None:
    """Refuse a manifest whose fields were edited after precompute wrote it: its recorded
    fingerprint must be the one its own teacher, split, data, attack, seed and plan give."""
    if manifest.get("fingerprint") != manifest_fingerprint(manifest):
        raise ShardError(f"{directory}: the manifest's fields were edited after the shards were built (its "
                         "fingerprint no longer matches its teacher, split, data, attack, seed or plan); rebuild "
                         f"with `dard precompute --out {directory}`")


def check_part(directory: str, entry: dict[str, Any], image_shape, num_classes: int, full: bool = True) -> None:
    """Raise :class:`ShardError` naming the file unless the part exists with the manifest's size and,
    when ``full``, its schema, units (rows, view) and unit digests."""
    fs, base = resolve(directory)
    path = join(base, entry["file"])
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ShardError(f"{path}: missing part; {rebuild_hint(directory)}")
    if info.size != entry["bytes"]:
        raise ShardError(f"{path}: {info.size} bytes, the manifest says {entry['bytes']} (truncated?); "
                         f"{rebuild_hint(directory)}")
    if not full:
        return
    try:
        with fs.open_input_file(path) as f:
            reader = pa.ipc.open_file(f)
            if not reader.schema.equals(schema(tuple(image_shape), num_classes), check_metadata=False):
                raise ShardError(f"{path}: schema differs from the format's; {rebuild_hint(directory)}")
            if reader.num_record_batches != len(entry["units"]):
                raise ShardError(f"{path}: {reader.num_record_batches} record batches, the manifest lists "
                                 f"{len(entry['units'])}; {rebuild_hint(directory)}")
            for i, unit in enumerate(entry["units"]):
                check_unit(directory, entry, i, reader.get_batch(i))
    except pa.ArrowInvalid as err:
        raise ShardError(f"{path}: not a readable Arrow IPC file ({err}); {rebuild_hint(directory)}") from err


def check_unit(directory: str, entry: dict[str, Any], i: int, batch: pa.RecordBatch) -> None:
    """Unit ``i`` of the part ``entry`` as read: its rows, its view and its content digest."""
    unit = entry["units"][i]
    where = f"{join(str(directory), entry['file'])} (record batch {i})"
    if batch.num_rows != unit["rows"]:
        raise ShardError(f"{where}: {batch.num_rows} rows, the manifest says {unit['rows']}; {rebuild_hint(directory)}")
    if batch_digest(batch) != unit["sha256"]:
        raise ShardError(f"{where}: its content differs from the manifest's digest (corrupted or altered); "
                         f"{rebuild_hint(directory)}")


def verify(directory: str, full: bool = True) -> dict[str, Any]:
    """Check the manifest and every part (unit digests when ``full``); returns the manifest."""
    manifest = read_manifest(directory)
    for entry in manifest["parts"]:
        check_part(directory, entry, manifest["image_shape"], manifest["num_classes"], full)
    return manifest


# ---- resumable building ------------------------------------------------------------------------
# Each finished part gets a sidecar ``part-NNNNN.json`` (its manifest entry plus the fingerprint of
# the plan that produced it). A re-run skips parts whose sidecar matches the plan and whose file
# verifies; anything else (missing, truncated, corrupt, built for another teacher) is rebuilt.

def write_part_record(directory: str, part_id: int, entry: dict[str, Any], plan_fingerprint: str) -> None:
    atomic_write(_in(directory, part_name(part_id).replace(".arrow", ".json")),
                 lambda f: f.write(json.dumps({**entry, "fingerprint": plan_fingerprint}).encode()))


def finished_part(directory: str, part_id: int, plan_fingerprint: str, image_shape, num_classes: int) -> dict | None:
    """The part's manifest entry if it was finished under this plan and still verifies, else None."""
    path = _in(directory, part_name(part_id).replace(".arrow", ".json"))
    if not exists(path):
        return None
    fs, local = resolve(path)
    try:
        with fs.open_input_stream(local) as f:
            record = json.loads(f.read().decode())
        if record.pop("fingerprint", None) != plan_fingerprint:
            return None
        check_part(directory, record, image_shape, num_classes, full=True)
    except (ShardError, json.JSONDecodeError, UnicodeDecodeError, KeyError):
        return None
    return record
