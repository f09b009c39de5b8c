"""The shard format: the Arrow schema of a row, part names, the manifest, and the fields of a
run that the rows depend on (docs/design.md §4)."""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

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


# What the rows depend on besides the teacher: the split (train/val/test membership), the
# augmentation, and the attack that produced the DPGD views. A run must match all of them.
PINNED_DATA = ("split_seed", "val_fraction", "test_fraction", "limit_train", "crop_padding", "flip")
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


def plan_fingerprint(*, teacher_sha256: str, dataset: str, split: str, data: dict, attack: dict, seed: int,
                     views: int, ranges: list[list[int]]) -> str:
    """What a shard folder's rows depend on, hashed: the teacher, the split, the data and attack
    config, the seed, the views and each part's ``[first, last]`` sample. Precompute records it;
    a reader recomputes it from the manifest's own fields (:func:`manifest_fingerprint`)."""
    return fingerprint({"teacher": teacher_sha256, "dataset": dataset, "split": split, "data": data,
                        "attack": attack, "seed": seed, "views": views, "parts": ranges})


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """:func:`plan_fingerprint` of what ``manifest`` says (parts are contiguous sample ranges in
    order, ``rows = samples x views``)."""
    views, start, ranges = int(manifest["views"]), 0, []
    for part in manifest["parts"]:
        n = int(part["rows"]) // max(views, 1)
        ranges.append([start, start + n - 1])
        start += n
    return plan_fingerprint(teacher_sha256=manifest["teacher"].get("sha256"), dataset=manifest["dataset"],
                            split=manifest["split"], data=manifest.get("data"), attack=manifest.get("attack"),
                            seed=manifest.get("seed"), views=views, ranges=ranges)


def make_manifest(*, dataset: str, split: str, teacher: dict, attack: dict, data: dict, views: int, num_classes: int,
                  image_shape, parts: list[dict], rows: int, seed: int, plan_fingerprint: str) -> dict[str, Any]:
    from dard import __version__

    return {"format_version": FORMAT_VERSION, "dataset": dataset, "split": split, "teacher": teacher,
            "attack": attack, "augmentation": {"crop_padding": data["crop_padding"], "flip": data["flip"]},
            "data": data, "views": views, "num_classes": num_classes, "image_shape": list(image_shape),
            "parts": parts, "rows": rows, "seed": seed, "fingerprint": plan_fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "package_version": __version__}
