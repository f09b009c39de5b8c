"""Teacher soft labels -> Arrow shards, one Ray task per part (docs/design.md §4).

Each task loads the teacher once (from bytes in the object store, so workers on other nodes
need no shared filesystem), computes its part with :func:`dard.soft_labels.compute_part`, writes
it atomically and records a sidecar. Re-running skips parts that were finished under the same
plan and still verify, and rebuilds missing or corrupt ones. The manifest is written last, so
a directory with a manifest is complete.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dard.config import IMAGE_SHAPE, NUM_CLASSES, Config, to_dict
from dard.data import load_splits
from dard.models import file_sha256, load_teacher
from dard.progress import progress_bar
from dard.shards import (finished_part, fingerprint, make_manifest, resolve, write_manifest, write_part,
                         write_part_record)
from dard.soft_labels import plan_parts

log = logging.getLogger("dard")


@dataclass
class PrecomputeResult:
    directory: str
    manifest: dict[str, Any] | None  # None when stopped early (max_parts)
    computed_parts: list[int]
    skipped_parts: list[int]


def _teacher_identity(teacher_path: str | Path, cfg: Config, teacher_arch: str | None) -> dict[str, Any]:
    """Load once on the driver: a wrong teacher fails here with a clear error, before any task runs."""
    dataset = cfg.data.dataset
    _, header = load_teacher(teacher_path, teacher_arch, NUM_CLASSES[dataset], IMAGE_SHAPE[dataset][0])
    sha = file_sha256(teacher_path)
    return {"id": f"{header['arch']}-{sha[:12]}", "arch": header["arch"], "sha256": sha, "path": str(teacher_path)}


def _compute_and_write(teacher_bytes: bytes, teacher_arch: str | None, cfg_dict: dict, images, labels, indices,
                       part_id: int, views: int, out: str, plan_fp: str, batch_size: int) -> dict[str, Any]:
    """Body of one Ray task (plain function: also callable without Ray)."""
    import torch

    from dard.config import from_dict
    from dard.data import ArrayDataset
    from dard.engine import resolve_device
    from dard.soft_labels import compute_part

    cfg = from_dict(cfg_dict)
    dataset = cfg.data.dataset
    # load_teacher reads a path: spill the bytes to a private temp file (still a weights-only load).
    with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        f.write(teacher_bytes)
        f.flush()
        teacher, _ = load_teacher(f.name, teacher_arch, NUM_CLASSES[dataset], IMAGE_SHAPE[dataset][0])
    device = resolve_device("auto")
    # arrays from the object store are read-only: copy before handing them to torch
    ds = ArrayDataset(torch.tensor(images), torch.tensor(labels), NUM_CLASSES[dataset], dataset)
    table = compute_part(teacher, ds, indices, views=views, data=cfg.data, attack=cfg.attack, seed=cfg.run.seed,
                         part_id=part_id, device=device, batch_size=batch_size)
    entry = write_part(out, part_id, table)
    write_part_record(out, part_id, entry, plan_fp)
    return {"part_id": part_id, **entry}


def precompute(cfg: Config, teacher_path: str | Path, out: str, *, views: int = 1, split: str = "train",
               rows_per_part: int = 4096, teacher_arch: str | None = None, batch_size: int = 256,
               address: str | None = None, max_parts: int | None = None, use_ray: bool = True) -> PrecomputeResult:
    """Build (or finish) the shard directory ``out`` for ``split`` of ``cfg``'s dataset.

    ``views``: augmented views per sample (epoch e trains on view e mod V). ``max_parts`` stops
    after computing that many parts, without a manifest (interruption tests, partial runs).
    ``use_ray=False`` computes the parts in this process (same code, no cluster).
    """
    if views < 1:
        raise ValueError(f"--views must be >= 1, got {views}")
    cfg.validate()
    dataset = cfg.data.dataset
    teacher = _teacher_identity(teacher_path, cfg, teacher_arch)
    ds = getattr(load_splits(cfg.data), split)
    image_shape, num_classes = IMAGE_SHAPE[dataset], NUM_CLASSES[dataset]
    plan = plan_parts(len(ds), rows_per_part)
    cfg_dict = to_dict(cfg)
    plan_fp = fingerprint({"teacher": teacher["sha256"], "dataset": dataset, "split": split, "data": cfg_dict["data"],
                           "attack": cfg_dict["attack"], "seed": cfg.run.seed, "views": views,
                           "parts": [[int(p[0]), int(p[-1])] for p in plan]})
    fs, base = resolve(out)
    fs.create_dir(base, recursive=True)
    entries: dict[int, dict] = {}
    for part_id in range(len(plan)):
        done = finished_part(out, part_id, plan_fp, image_shape, num_classes)
        if done is not None:
            entries[part_id] = done
    skipped = sorted(entries)
    pending = [p for p in range(len(plan)) if p not in entries]
    if max_parts is not None:
        pending = pending[:max_parts]
    log.info("precompute %s: %d parts, %d already finished, %d to compute", out, len(plan), len(skipped), len(pending))
    teacher_bytes = Path(teacher_path).read_bytes() if pending else b""  # nothing to ship when all parts exist
    images, labels = ds.images.numpy(), ds.labels.numpy()
    computed: list[int] = []
    with progress_bar(len(pending), f"precompute {dataset}/{split} parts", enabled=cfg.run.progress) as bar:
        if use_ray and pending:
            from cluster.ray_session import cluster_has_gpus, ensure_ray

            ray = ensure_ray(address)
            task = ray.remote(_compute_and_write)
            options = {"num_gpus": 1} if cluster_has_gpus() else {"num_cpus": 1}
            refs = [ray.put(x) for x in (teacher_bytes, images, labels)]
            futures = [task.options(**options).remote(refs[0], teacher_arch, cfg_dict, refs[1], refs[2], plan[p], p,
                                                      views, out, plan_fp, batch_size) for p in pending]
            while futures:
                ready, futures = ray.wait(futures, num_returns=1)
                result = ray.get(ready[0])
                entries[result["part_id"]] = {k: v for k, v in result.items() if k != "part_id"}
                computed.append(result["part_id"])
                bar.update(1, part=result["part_id"])
        else:
            for p in pending:
                result = _compute_and_write(teacher_bytes, teacher_arch, cfg_dict, images, labels, plan[p], p, views,
                                            out, plan_fp, batch_size)
                entries[p] = {k: v for k, v in result.items() if k != "part_id"}
                computed.append(p)
                bar.update(1, part=p)
    if len(entries) < len(plan):
        return PrecomputeResult(out, None, sorted(computed), skipped)
    attack = cfg_dict["attack"]
    manifest = make_manifest(dataset=dataset, split=split, teacher=teacher, attack=attack, data=cfg_dict["data"],
                             views=views, num_classes=num_classes, image_shape=image_shape,
                             parts=[entries[p] for p in range(len(plan))], rows=len(ds) * views, seed=cfg.run.seed,
                             plan_fingerprint=plan_fp)
    write_manifest(out, manifest)
    return PrecomputeResult(out, manifest, sorted(computed), skipped)
