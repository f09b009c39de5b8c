"""Building a soft-label shard directory: plan, fingerprint, resume, manifest (docs/design.md §4).

The parts are independent: :func:`build_shards` plans them, skips those already finished under the
same plan (and still verifying), hands the rest to ``map_parts`` and writes the manifest last, so a
directory with a manifest is complete. ``map_parts`` defaults to computing the parts here, one
after the other; ``cluster/precompute.py`` passes one that runs a Ray task per part. Each part
loads the teacher from its bytes (workers on other nodes need no shared filesystem), computes
its rows with :func:`dard.soft_labels.compute_part`, writes them atomically and records a sidecar.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from dard.config import Config, from_dict, to_dict
from dard.data import ArrayDataset, load_splits
from dard.engine import resolve_device
from dard.models import file_sha256, load_teacher_for
from dard.progress import progress_bar
from dard.files import resolve
from dard.shards import finished_part, make_manifest, plan_fingerprint, write_manifest, write_part, write_part_record
from dard.soft_labels import compute_part, plan_parts

log = logging.getLogger("dard")


@dataclass
class PrecomputeResult:
    directory: str
    manifest: dict[str, Any] | None  # None when stopped early (max_parts)
    computed_parts: list[int]
    skipped_parts: list[int]


@dataclass
class PartJob:
    """Everything one part needs; plain data, so a Ray task can carry it (large arrays by reference)."""

    teacher_bytes: Any  # bytes (or a Ray object ref resolved to bytes by the runner)
    teacher_path: str  # names the teacher in messages
    teacher_arch: str | None
    cfg: dict
    images: Any  # uint8 (N, C, H, W) of the split
    labels: Any
    indices: Any
    part_id: int
    views: int
    out: str
    plan_fingerprint: str
    batch_size: int


# map_parts(compute_part_job, jobs) -> the results (dicts with part_id), in any order, as they finish
MapParts = Callable[[Callable[[PartJob], dict], list[PartJob]], Iterable[dict]]


def compute_part_job(job: PartJob) -> dict[str, Any]:
    """Compute and write one part; returns its manifest entry plus ``part_id``."""
    cfg = from_dict(job.cfg)
    dataset = cfg.data.dataset
    teacher, _ = load_teacher_for(job.teacher_path, cfg.data, job.teacher_arch, data=job.teacher_bytes)
    # arrays from Ray's object store are read-only: copy before handing them to torch
    ds = ArrayDataset(torch.tensor(job.images), torch.tensor(job.labels), cfg.data.num_classes, dataset)
    table = compute_part(teacher, ds, job.indices, views=job.views, data=cfg.data, attack=cfg.attack,
                         seed=cfg.run.seed, part_id=job.part_id, device=resolve_device("auto"),
                         batch_size=job.batch_size)
    entry = write_part(job.out, job.part_id, table)
    write_part_record(job.out, job.part_id, entry, job.plan_fingerprint)
    return {"part_id": job.part_id, **entry}


def map_locally(fn: Callable[[PartJob], dict], jobs: list[PartJob]) -> Iterator[dict]:
    """The default ``map_parts``: one part after the other, in this process."""
    return (fn(job) for job in jobs)


def teacher_identity(teacher_path: str | Path, cfg: Config, teacher_arch: str | None) -> dict[str, Any]:
    """Load once up front: a wrong teacher fails here with a clear error, before any part runs."""
    _, header = load_teacher_for(teacher_path, cfg.data, teacher_arch)
    sha = file_sha256(teacher_path)
    return {"id": f"{header['arch']}-{sha[:12]}", "arch": header["arch"], "sha256": sha, "path": str(teacher_path)}


def build_shards(cfg: Config, teacher_path: str | Path, out: str, *, views: int = 1, split: str = "train",
                 rows_per_part: int = 4096, teacher_arch: str | None = None, batch_size: int = 256,
                 max_parts: int | None = None, map_parts: MapParts = map_locally) -> PrecomputeResult:
    """Build (or finish) the shard directory ``out`` for ``split`` of ``cfg``'s dataset.

    ``views``: augmented views per sample (epoch e trains on view e mod V). ``max_parts`` stops
    after computing that many parts, without a manifest (interruption tests, partial runs).
    """
    problems = [f"{flag}: must be >= 1, got {value}" for flag, value in (
        ("--views", views), ("--rows-per-part", rows_per_part), ("--batch", batch_size)) if value < 1]
    if problems:
        raise ValueError("; ".join(problems))
    dataset = cfg.data.dataset
    teacher = teacher_identity(teacher_path, cfg, teacher_arch)
    ds = getattr(load_splits(cfg.data), split)
    image_shape, num_classes = cfg.data.image_shape, cfg.data.num_classes
    plan = plan_parts(len(ds), rows_per_part)
    cfg_dict = to_dict(cfg)
    plan_fp = plan_fingerprint(teacher_sha256=teacher["sha256"], dataset=dataset, split=split, data=cfg_dict["data"],
                               attack=cfg_dict["attack"], seed=cfg.run.seed, views=views,
                               ranges=[[int(p[0]), int(p[-1])] for p in plan])
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
    jobs = [PartJob(teacher_bytes, str(teacher_path), teacher_arch, cfg_dict, images, labels, plan[p], p, views, out,
                    plan_fp, batch_size) for p in pending]
    computed: list[int] = []
    with progress_bar(len(pending), f"precompute {dataset}/{split} parts", enabled=cfg.run.progress) as bar:
        for result in map_parts(compute_part_job, jobs) if jobs else ():
            entries[result["part_id"]] = {k: v for k, v in result.items() if k != "part_id"}
            computed.append(result["part_id"])
            bar.update(1, part=result["part_id"])
    if len(entries) < len(plan):
        return PrecomputeResult(out, None, sorted(computed), skipped)
    manifest = make_manifest(dataset=dataset, split=split, teacher=teacher, attack=cfg_dict["attack"],
                             data=cfg_dict["data"], views=views, num_classes=num_classes, image_shape=image_shape,
                             parts=[entries[p] for p in range(len(plan))], rows=len(ds) * views, seed=cfg.run.seed,
                             plan_fingerprint=plan_fp)
    write_manifest(out, manifest)
    return PrecomputeResult(out, manifest, sorted(computed), skipped)
