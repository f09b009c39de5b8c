"""Soft-label shards: Arrow IPC schema, atomic part writer, manifest, verification, memory-mapped reader.

A shard directory (docs/design.md §4)::

    manifest.json       format version, dataset + split, teacher (id, arch, sha256), attack config,
                        views per sample, classes, image shape, augmentation, parts (file, rows,
                        bytes, sha256), creation time, package version
    part-00000.arrow    Arrow IPC file, record batches of <= 4096 rows

Row: ``index`` int64 (sample in the split), ``view`` int16, ``label`` int16, ``crop_dx``/``crop_dy``
int8, ``flip`` bool, ``x`` natural view uint8 HWC (fixed-size binary), ``delta`` int8 HWC (DPGD
perturbation on the 8-bit grid, x_d = x + delta), ``t_nat``/``t_adv`` float16 logits (fixed-size
lists). Epoch e reads view ``e mod V``; each DDP rank gets a disjoint slice of a seeded shuffle.
Directories may be local paths or pyarrow filesystem URIs (``s3://...``, ``gs://...``); local
files are memory-mapped (zero copy).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from dard.data import TrainBatch
from dard.seeding import shard_order

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECORD_BATCH_ROWS = 4096


class ShardError(ValueError):
    """A shard directory, manifest or part is missing, corrupt or does not fit the run."""


def schema(image_shape: tuple[int, int, int], num_classes: int) -> pa.Schema:
    """image_shape: (C, H, W)."""
    pixels = int(np.prod(image_shape))
    return pa.schema([
        ("index", pa.int64()), ("view", pa.int16()), ("label", pa.int16()),
        ("crop_dx", pa.int8()), ("crop_dy", pa.int8()), ("flip", pa.bool_()),
        ("x", pa.binary(pixels)), ("delta", pa.binary(pixels)),
        ("t_nat", pa.list_(pa.float16(), num_classes)), ("t_adv", pa.list_(pa.float16(), num_classes)),
    ], metadata={"dard_format_version": str(FORMAT_VERSION), "image_shape": json.dumps(list(image_shape))})


def part_name(part_id: int) -> str:
    return f"part-{part_id:05d}.arrow"


# ---- filesystem helpers ------------------------------------------------------------------------

def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a pyarrow-supported URI."""
    text = str(uri)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ---- writing -------------------------------------------------------------------------------------

def rows_to_table(rows: dict[str, np.ndarray], image_shape: tuple[int, int, int], num_classes: int) -> pa.Table:
    """rows: index (N,), view (N,), label (N,), crop_dx/crop_dy (N,), flip (N,) bool,
    x (N, H, W, C) uint8, delta (N, H, W, C) int8, t_nat/t_adv (N, K) float16."""
    n = len(rows["index"])
    pixels = int(np.prod(image_shape))
    sch = schema(image_shape, num_classes)

    def fixed_binary(a: np.ndarray) -> pa.Array:
        flat = np.ascontiguousarray(a).reshape(n, pixels).view(np.uint8)
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(pixels), n, [None, pa.py_buffer(flat.tobytes())])

    def logits(a: np.ndarray) -> pa.Array:
        values = pa.array(np.ascontiguousarray(a, dtype=np.float16).reshape(-1), type=pa.float16())
        return pa.FixedSizeListArray.from_arrays(values, num_classes)

    arrays = [pa.array(rows["index"].astype(np.int64)), pa.array(rows["view"].astype(np.int16)),
              pa.array(rows["label"].astype(np.int16)), pa.array(rows["crop_dx"].astype(np.int8)),
              pa.array(rows["crop_dy"].astype(np.int8)), pa.array(rows["flip"].astype(bool)),
              fixed_binary(rows["x"].astype(np.uint8)), fixed_binary(rows["delta"].astype(np.int8)),
              logits(rows["t_nat"]), logits(rows["t_adv"])]
    return pa.Table.from_arrays(arrays, schema=sch)


def write_part(directory: str, part_id: int, table: pa.Table) -> dict[str, Any]:
    """Write one part atomically (temp file, then rename); returns its manifest entry."""
    fs, base = resolve(directory)
    fs.create_dir(base, recursive=True)
    final = _join(base, part_name(part_id))
    tmp = final + f".tmp-{time.time_ns()}"
    with fs.open_output_stream(tmp) as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=RECORD_BATCH_ROWS):
                writer.write_batch(batch)
    fs.move(tmp, final)
    return {"file": part_name(part_id), "rows": table.num_rows, "bytes": fs.get_file_info(final).size,
            "sha256": _sha256(fs, final)}


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    fs, base = resolve(directory)
    fs.create_dir(base, recursive=True)
    tmp = _join(base, MANIFEST + ".tmp")
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(manifest, indent=2).encode())
    fs.move(tmp, _join(base, MANIFEST))


def read_manifest(directory: str) -> dict[str, Any]:
    fs, base = resolve(directory)
    path = _join(base, MANIFEST)
    if not _exists(fs, path):
        raise ShardError(f"{path}: no manifest; this is not a finished shard directory. Build it with "
                         f"`dard precompute --teacher TEACHER --out {directory}` (it resumes an interrupted run).")
    try:
        with fs.open_input_stream(path) as f:
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


def check_part(directory: str, entry: dict[str, Any], image_shape, num_classes: int, full: bool = True) -> None:
    """Raise :class:`ShardError` naming the file unless the part exists, matches size, checksum, schema, rows."""
    fs, base = resolve(directory)
    path = _join(base, entry["file"])
    rebuild = f"re-run `dard precompute --out {directory}` to rebuild it (finished parts are kept)"
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ShardError(f"{path}: missing part; {rebuild}")
    if info.size != entry["bytes"]:
        raise ShardError(f"{path}: {info.size} bytes, the manifest says {entry['bytes']} (truncated?); {rebuild}")
    if full and _sha256(fs, path) != entry["sha256"]:
        raise ShardError(f"{path}: sha256 differs from the manifest (corrupted); {rebuild}")
    try:
        table = _open_table(fs, path)
    except pa.ArrowInvalid as err:
        raise ShardError(f"{path}: not a readable Arrow IPC file ({err}); {rebuild}") from err
    if not table.schema.equals(schema(tuple(image_shape), num_classes), check_metadata=False):
        raise ShardError(f"{path}: schema differs from the format's; {rebuild}")
    if table.num_rows != entry["rows"]:
        raise ShardError(f"{path}: {table.num_rows} rows, the manifest says {entry['rows']}; {rebuild}")


def verify(directory: str, full: bool = True) -> dict[str, Any]:
    """Check the manifest and every part (checksums when ``full``); returns the manifest."""
    manifest = read_manifest(directory)
    for entry in manifest["parts"]:
        check_part(directory, entry, manifest["image_shape"], manifest["num_classes"], full)
    expected = manifest.get("rows")
    total = sum(p["rows"] for p in manifest["parts"])
    if expected is not None and total != expected:
        raise ShardError(f"{directory}: parts hold {total} rows, the manifest expects {expected}; re-run precompute")
    return manifest


def _open_table(fs: pafs.FileSystem, path: str) -> pa.Table:
    if isinstance(fs, pafs.LocalFileSystem):
        return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()  # zero copy: pages load on access
    with fs.open_input_file(path) as f:
        return pa.ipc.open_file(f).read_all()


# ---- reading -------------------------------------------------------------------------------------

@dataclass
class ShardBatch:
    """A decoded batch. x: uint8 (B, C, H, W); delta: int8 (B, C, H, W); logits float32 (B, K)."""

    index: torch.Tensor
    label: torch.Tensor
    x: torch.Tensor
    delta: torch.Tensor
    t_nat: torch.Tensor
    t_adv: torch.Tensor
    view: torch.Tensor

    def to_train_batch(self) -> TrainBatch:
        x = self.x.float() / 255
        x_adv = (self.x.to(torch.int16) + self.delta.to(torch.int16)).float() / 255
        return TrainBatch(x, self.label.long(), teacher_logits=self.t_nat, x_teacher_adv=x_adv,
                          teacher_logits_adv=self.t_adv)


class ShardReader:
    """Memory-mapped reader over a verified shard directory.

    ``check``: ``full`` (sha256 of every part, default), ``fast`` (sizes, schema, rows) or ``none``.
    """

    def __init__(self, directory: str, check: str = "full"):
        self.directory = str(directory)
        if check not in ("full", "fast", "none"):
            raise ValueError("check must be full, fast or none")
        self.manifest = read_manifest(self.directory)
        if check != "none":
            verify(self.directory, full=check == "full")
        fs, base = resolve(self.directory)
        tables = [_open_table(fs, _join(base, p["file"])) for p in self.manifest["parts"]]
        if not tables:
            raise ShardError(f"{self.directory}: manifest lists no parts")
        self.table = pa.concat_tables(tables)
        self.views = int(self.manifest["views"])
        self.image_shape = tuple(self.manifest["image_shape"])
        self.num_classes = int(self.manifest["num_classes"])
        index = self.table.column("index").to_numpy()
        view = self.table.column("view").to_numpy()
        # rows_by_view[v][k]: table row of the k-th sample (sorted by sample index) in view v
        self.rows_by_view = []
        for v in range(self.views):
            rows = np.flatnonzero(view == v)
            self.rows_by_view.append(rows[np.argsort(index[rows], kind="stable")])
        counts = {len(r) for r in self.rows_by_view}
        if len(counts) != 1:
            raise ShardError(f"{self.directory}: views hold different numbers of rows {sorted(counts)}; re-run precompute")
        self.num_samples = counts.pop()

    def __len__(self) -> int:
        return self.num_samples

    def rank_rows(self, epoch: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> np.ndarray:
        """Table rows for this rank in this epoch: view ``epoch mod V``, a seeded shuffle of the samples,
        every ``world_size``-th from position ``rank``. Disjoint across ranks; their union is every sample."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        rows = self.rows_by_view[epoch % self.views]
        perm = shard_order(seed, epoch, len(rows))
        return rows[perm[rank::world_size]]

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Equal on every rank (DDP needs the same number of steps): full local batches of the smallest rank."""
        return (self.num_samples // world_size) // batch_size

    def take(self, rows: np.ndarray) -> ShardBatch:
        t = self.table.take(pa.array(rows, type=pa.int64()))
        c, h, w = self.image_shape
        n = t.num_rows

        def pixels(name: str, dtype) -> torch.Tensor:
            col = t.column(name).combine_chunks()
            buf = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=n * c * h * w, offset=col.offset * c * h * w)
            return torch.from_numpy(buf.view(dtype).reshape(n, h, w, c).transpose(0, 3, 1, 2).copy())

        def logits(name: str) -> torch.Tensor:
            col = t.column(name).combine_chunks()
            values = col.values.to_numpy(zero_copy_only=False)[col.offset * self.num_classes:(col.offset + n) * self.num_classes]
            return torch.from_numpy(values.astype(np.float32).reshape(n, self.num_classes))

        return ShardBatch(index=torch.from_numpy(t.column("index").to_numpy().copy()),
                          label=torch.from_numpy(t.column("label").to_numpy().astype(np.int64)),
                          x=pixels("x", np.uint8), delta=pixels("delta", np.int8),
                          t_nat=logits("t_nat"), t_adv=logits("t_adv"),
                          view=torch.from_numpy(t.column("view").to_numpy().astype(np.int64)))

    def batches(self, epoch: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                drop_last: bool = True) -> Iterator[ShardBatch]:
        """This rank's batches for ``epoch``; with ``drop_last`` every rank yields :meth:`steps_per_epoch`."""
        rows = self.rank_rows(epoch, rank, world_size, seed)
        steps = self.steps_per_epoch(batch_size, world_size) if drop_last else -(-len(rows) // batch_size)
        for s in range(steps):
            yield self.take(rows[s * batch_size:(s + 1) * batch_size])

    def check_compatible(self, *, dataset: str, num_classes: int, eps: float | None = None,
                         teacher_sha256: str | None = None, data: dict | None = None,
                         attack: dict | None = None) -> None:
        """Refuse shards that do not fit the run, naming each mismatch.

        ``data``/``attack``: the run's config sections (``to_dict(cfg)``). Every field the rows
        depend on is compared (``PINNED_DATA``, ``PINNED_ATTACK``): the split (a different
        ``split_seed`` or fraction would put the run's validation or test samples into training),
        the augmentation, and the attack that made the teacher's DPGD views.
        """
        m = self.manifest
        problems = []
        if m["dataset"] != dataset:
            problems.append(f"dataset {m['dataset']!r} (run: {dataset!r})")
        if int(m["num_classes"]) != num_classes:
            problems.append(f"num_classes {m['num_classes']} (run: {num_classes})")
        if eps is not None and abs(float(m["attack"]["eps"]) - eps) > 1e-9:
            problems.append(f"attack eps {m['attack']['eps']:.6g} (run: {eps:.6g})")
        for section, keys, run in (("data", PINNED_DATA, data), ("attack", PINNED_ATTACK, attack)):
            for key in keys if run is not None else ():
                if section == "attack" and key == "eps" and eps is not None:
                    continue  # compared above
                built, wanted = _plain(m.get(section, {}).get(key)), _plain(run.get(key))
                if built != wanted and not (isinstance(built, float) and isinstance(wanted, float)
                                            and abs(built - wanted) <= 1e-9):
                    problems.append(f"{section}.{key} {built!r} (run: {wanted!r})")
        if teacher_sha256 is not None and m["teacher"].get("sha256") != teacher_sha256:
            problems.append(f"teacher sha256 {str(m['teacher'].get('sha256'))[:12]}... (given teacher: {teacher_sha256[:12]}...)")
        if problems:
            raise ShardError(f"{self.directory}: shards do not match the run: " + "; ".join(problems)
                             + ". Precompute shards for this run with `dard precompute`.")

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {"directory": self.directory, "dataset": m["dataset"], "split": m["split"], "teacher": m["teacher"],
                "views": self.views, "samples": self.num_samples, "rows": self.table.num_rows,
                "bytes": sum(p["bytes"] for p in m["parts"]), "parts": len(m["parts"]),
                "bytes_per_row": sum(p["bytes"] for p in m["parts"]) / max(self.table.num_rows, 1),
                "attack": m.get("attack"), "created": m.get("created"), "package_version": m.get("package_version")}


# ---- resumable building ------------------------------------------------------------------------
# Each finished part gets a sidecar ``part-NNNNN.json`` (its manifest entry plus the fingerprint of
# the plan that produced it). A re-run skips parts whose sidecar matches the plan and whose file
# verifies; anything else (missing, truncated, corrupt, built for another teacher) is rebuilt.


# What the rows depend on besides the teacher: the split (train/val/test membership), the
# augmentation, and the attack that produced the DPGD views. A run must match all of them.
PINNED_DATA = ("split_seed", "val_fraction", "test_fraction", "limit_train", "crop_padding", "flip")
PINNED_ATTACK = ("eps", "step_size", "steps", "random_start", "dpgd_loss", "dpgd_schedule", "dpgd_channel_mask",
                 "dpgd_segpgd_weighting")


def _plain(value: Any) -> Any:
    """ints as floats and tuples as lists, so a manifest read back from JSON compares equal."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def fingerprint(plan: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def write_part_record(directory: str, part_id: int, entry: dict[str, Any], plan_fingerprint: str) -> None:
    fs, base = resolve(directory)
    path = _join(base, part_name(part_id).replace(".arrow", ".json"))
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps({**entry, "fingerprint": plan_fingerprint}).encode())
    fs.move(tmp, path)


def finished_part(directory: str, part_id: int, plan_fingerprint: str, image_shape, num_classes: int) -> dict | None:
    """The part's manifest entry if it was finished under this plan and still verifies, else None."""
    fs, base = resolve(directory)
    path = _join(base, part_name(part_id).replace(".arrow", ".json"))
    if not _exists(fs, path):
        return None
    try:
        with fs.open_input_stream(path) as f:
            record = json.loads(f.read().decode())
        if record.pop("fingerprint", None) != plan_fingerprint:
            return None
        check_part(directory, record, image_shape, num_classes, full=True)
    except (ShardError, json.JSONDecodeError, UnicodeDecodeError, KeyError):
        return None
    return record


def make_manifest(*, dataset: str, split: str, teacher: dict, attack: dict, data: dict, views: int, num_classes: int,
                  image_shape, parts: list[dict], rows: int, seed: int, plan_fingerprint: str) -> dict[str, Any]:
    from dard import __version__

    return {"format_version": FORMAT_VERSION, "dataset": dataset, "split": split, "teacher": teacher,
            "attack": attack, "augmentation": {"crop_padding": data["crop_padding"], "flip": data["flip"]},
            "data": data, "views": views, "num_classes": num_classes, "image_shape": list(image_shape),
            "parts": parts, "rows": rows, "seed": seed, "fingerprint": plan_fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "package_version": __version__}
