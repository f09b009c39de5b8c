"""The shard format: the Arrow schema of a row, how samples are planned into parts, the manifest,
and the fields of a run that the rows depend on (docs/design.md §4).

A part holds the rows of its samples for every view, view after view, as Arrow record batches of at
most ``UNIT_ROWS`` rows (and about ``UNIT_BYTES``) of one view each: the *units* a training rank reads, checks (each unit's
content digest is in the manifest) and shuffles. Samples are planned into parts by a seeded
permutation, so every part, and every unit, is a random sample of its split whatever the source's
order (a folder's is class after class).
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

from dard import __version__

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
UNIT_ROWS = 1024  # rows of one record batch: the unit a rank reads, verifies and shuffles ...
UNIT_BYTES = 32 << 20  # ... at most, and no more than about 32 MB (224 px images: ~100 rows)
KINDS = ("labeled", "pool")  # rows with their true label / rows labelled by the teacher (label_source)
TRUE_LABEL, TEACHER_LABEL = 0, 1


class ShardError(ValueError):
    """A shard directory, manifest or part is missing, corrupt or does not fit the run."""


def schema(image_shape: tuple[int, int, int], num_classes: int) -> pa.Schema:
    """image_shape: (C, H, W)."""
    pixels = int(np.prod(image_shape))
    return pa.schema([
        ("index", pa.int64()), ("view", pa.int16()), ("label", pa.int16()), ("label_source", pa.int8()),
        ("confidence", pa.float32()), ("crop_dx", pa.int8()), ("crop_dy", pa.int8()), ("flip", pa.bool_()),
        ("x", pa.binary(pixels)), ("delta", pa.binary(pixels)),
        ("t_nat", pa.list_(pa.float16(), num_classes)), ("t_adv", pa.list_(pa.float16(), num_classes)),
    ], metadata={"dard_format_version": str(FORMAT_VERSION), "image_shape": json.dumps(list(image_shape))})


def part_name(part_id: int) -> str:
    return f"part-{part_id:05d}.arrow"


def rows_to_batches(rows: dict[str, np.ndarray], image_shape: tuple[int, int, int], num_classes: int
                    ) -> list[pa.RecordBatch]:
    """rows (view after view): index, view, label, label_source, confidence, crop_dx, crop_dy, flip
    (N,), x (N, H, W, C) uint8, delta (N, H, W, C) int8, t_nat/t_adv (N, K) float16 -> record
    batches of :func:`unit_rows` rows at most, each of one view."""
    n = len(rows["index"])
    pixels = int(np.prod(image_shape))
    per_unit = unit_rows(image_shape, num_classes)
    sch = schema(image_shape, num_classes)

    def fixed_binary(a: np.ndarray) -> pa.Array:
        flat = np.ascontiguousarray(a).reshape(len(a), pixels).view(np.uint8)
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(pixels), len(a), [None, pa.py_buffer(flat.tobytes())])

    def logits(a: np.ndarray) -> pa.Array:
        values = pa.array(np.ascontiguousarray(a, dtype=np.float16).reshape(-1), type=pa.float16())
        return pa.FixedSizeListArray.from_arrays(values, num_classes)

    casts = {"index": np.int64, "view": np.int16, "label": np.int16, "label_source": np.int8,
             "confidence": np.float32, "crop_dx": np.int8, "crop_dy": np.int8, "flip": bool}
    batches = []
    views = rows["view"]
    for v in np.unique(views):
        at = np.flatnonzero(views == v)
        for s in range(0, len(at), per_unit):
            sel = at[s:s + per_unit]
            arrays = [pa.array(rows[k][sel].astype(t)) for k, t in casts.items()]
            arrays += [fixed_binary(rows["x"][sel].astype(np.uint8)), fixed_binary(rows["delta"][sel].astype(np.int8)),
                       logits(rows["t_nat"][sel]), logits(rows["t_adv"][sel])]
            batches.append(pa.RecordBatch.from_arrays(arrays, schema=sch))
    assert sum(b.num_rows for b in batches) == n
    return batches


def unit_rows(image_shape: tuple[int, int, int], num_classes: int) -> int:
    """Rows of a unit: ``UNIT_ROWS``, fewer where that would exceed ``UNIT_BYTES``."""
    row = 2 * int(np.prod(image_shape)) + 4 * num_classes + 24
    return max(1, min(UNIT_ROWS, UNIT_BYTES // row))


def batch_digest(batch: pa.RecordBatch) -> str:
    """sha256 of a record batch's column buffers as read: the bytes a rank trains on."""
    h = hashlib.sha256()
    for column in batch.columns:
        for buf in column.buffers():
            if buf is not None:
                h.update(memoryview(buf))
    return h.hexdigest()

# What the rows depend on besides the teacher: the data (which samples, labeled or pooled, of which
# source), the augmentation, and the attack that produced the DPGD views. A run must match all.
PINNED_DATA = ("split_seed", "val_fraction", "test_fraction", "limit_train", "crop_padding", "flip", "source",
               "test_source", "image_column", "label_column", "image_size", "channels", "classes", "shape",
               "fingerprint", "labeled", "pool")
PINNED_ATTACK = ("eps", "step_size", "steps", "random_start", "dpgd_loss", "dpgd_schedule", "dpgd_channel_mask",
                 "dpgd_segpgd_weighting")


def plain(value: Any) -> Any:
    """ints as floats and tuples as lists, so a manifest read back from JSON compares equal."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def fingerprint(plan: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def plan_parts(counts: dict[str, int], rows_per_part: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """(kind, sample positions) of every part: each kind's samples in a seeded permutation, cut into
    parts of ``rows_per_part`` samples; labeled parts first."""
    if rows_per_part < 1:
        raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
    out = []
    for k, kind in enumerate(KINDS):
        n = counts.get(kind, 0)
        order = np.random.default_rng([seed, k, 0x5A4D]).permutation(n)
        out += [(kind, np.sort(order[s:s + rows_per_part])) for s in range(0, n, rows_per_part)]
    return out


def plan_fingerprint(*, teacher_sha256: str, dataset: str, split: str, data: dict, attack: dict, seed: int,
                     views: int, counts: dict[str, int], rows_per_part: int) -> str:
    """What a shard folder's rows depend on, hashed: the teacher, the split, the pinned data and
    attack fields, the seed, the views and the plan (samples of each kind, samples per part).
    Precompute records it; a reader recomputes it from the manifest's own fields
    (:func:`manifest_fingerprint`)."""
    pinned = {k: plain(data.get(k)) for k in PINNED_DATA}
    return fingerprint({"teacher": teacher_sha256, "dataset": dataset, "split": split, "data": pinned,
                        "attack": {k: plain(attack.get(k)) for k in PINNED_ATTACK}, "seed": seed, "views": views,
                        "counts": {k: int(counts.get(k, 0)) for k in KINDS}, "rows_per_part": int(rows_per_part)})


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """:func:`plan_fingerprint` of what ``manifest`` says."""
    return plan_fingerprint(teacher_sha256=manifest["teacher"].get("sha256"), dataset=manifest["dataset"],
                            split=manifest["split"], data=manifest.get("data") or {},
                            attack=manifest.get("attack") or {}, seed=manifest.get("seed"), views=int(manifest["views"]),
                            counts=manifest.get("samples") or {}, rows_per_part=manifest.get("rows_per_part", 0))


def make_manifest(*, dataset: str, split: str, teacher: dict, attack: dict, data: dict, views: int, num_classes: int,
                  class_names, image_shape, parts: list[dict], counts: dict[str, int], rows_per_part: int, seed: int,
                  plan_fingerprint: str, source_index: str | None) -> dict[str, Any]:

    return {"format_version": FORMAT_VERSION, "dataset": dataset, "split": split, "teacher": teacher,
            "attack": attack, "augmentation": {"crop_padding": data["crop_padding"], "flip": data["flip"]},
            "data": data, "views": views, "num_classes": num_classes, "classes": list(class_names),
            "image_shape": list(image_shape), "parts": parts, "samples": {k: int(counts.get(k, 0)) for k in KINDS},
            "rows": sum(p["rows"] for p in parts), "rows_per_part": rows_per_part, "seed": seed,
            "fingerprint": plan_fingerprint, "source_index": source_index,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "package_version": __version__}
