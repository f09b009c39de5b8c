"""Writing shards: parts (atomically), per-part records for resumable building, the manifest;
reading the manifest back, checked."""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from dard.files import atomic_write, exists, join, resolve, sha256
from dard.shards.format import FORMAT_VERSION, MANIFEST, RECORD_BATCH_ROWS, ShardError, part_name
from dard.shards.verify import check_part

def write_part(directory: str, part_id: int, table: pa.Table) -> dict[str, Any]:
    """Write one part atomically; returns its manifest entry."""
    path = _in(directory, part_name(part_id))

    def arrow(sink) -> None:
        with pa.ipc.new_file(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=RECORD_BATCH_ROWS):
                writer.write_batch(batch)

    atomic_write(path, arrow)
    fs, local = resolve(path)
    return {"file": part_name(part_id), "rows": table.num_rows, "bytes": fs.get_file_info(local).size,
            "sha256": sha256(path)}


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    atomic_write(_in(directory, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=2).encode()))


def _in(directory: str, name: str) -> str:
    """The URI or absolute path of ``name`` inside ``directory``."""
    return join(str(directory) if "://" in str(directory) else resolve(directory)[1], name)


def read_manifest(directory: str) -> dict[str, Any]:
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
    for key in ("format_version", "dataset", "split", "teacher", "views", "num_classes", "image_shape", "parts"):
        if key not in manifest:
            raise ShardError(f"{path}: manifest lacks {key!r}; rebuild with `dard precompute --out {directory}`")
    parts = manifest["parts"]
    entry_keys = ("file", "rows", "bytes", "sha256")
    if not isinstance(parts, list) or not all(isinstance(e, dict) and all(k in e for k in entry_keys) for e in parts):
        raise ShardError(f"{path}: malformed 'parts' (each entry needs {', '.join(entry_keys)}); rebuild with "
                         f"`dard precompute --out {directory}`")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ShardError(f"{path}: format version {manifest['format_version']}, this dard reads {FORMAT_VERSION}; "
                         "rebuild the shards with this version's `dard precompute`")
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


