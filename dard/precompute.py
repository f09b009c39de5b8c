"""Building a soft-label shard directory: check the source, plan, fingerprint, resume, manifest
(docs/design.md §4).

:func:`build_shards` lists the run's splits (a source's images are not decoded here), checks
every image of a source of your own first (:func:`index_source`: readable, one size and channel
count unless resizing, a pool holding no validation or test image -- before anything is written),
plans the parts (each kind's samples in a seeded permutation), skips those already finished under
the same plan (and still verifying), hands the rest to ``map_jobs`` and writes the manifest last,
so a directory with a manifest is complete. Each job carries its own samples only (a preset's
images, or a source's listing of them), so no process but the driver sees a whole split.
``map_jobs`` defaults to running jobs here, one after the other; ``cluster/precompute.py`` passes
one that runs a Ray task per job.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from dard.config import Config, from_dict, to_dict
from dard.data import Dataset, SourceDataset, SourceError, load_splits
from dard.data.splits import ConcatDataset
from dard.engine import resolve_device
from dard.files import atomic_write, join, resolve
from dard.models import file_sha256, load_teacher_for
from dard.progress import progress_bar
from dard.shards.format import KINDS, make_manifest, plan_fingerprint, plan_parts
from dard.shards.store import finished_part, write_manifest, write_part, write_part_record
from dard.soft_labels import compute_part

log = logging.getLogger("dard")
SOURCE_INDEX = "source-index.json"  # in a shard folder: every checked image of a source of your own


@dataclass
class PrecomputeResult:
    directory: str
    manifest: dict[str, Any] | None  # None when stopped early (max_parts)
    computed_parts: list[int]
    skipped_parts: list[int]


@dataclass
class PartJob:
    """Everything one part needs; plain data, so a Ray task can carry it (the teacher by reference)."""

    teacher_bytes: Any  # bytes (or a Ray object ref resolved to bytes by the runner)
    teacher_path: str  # names the teacher in messages
    teacher_arch: str | None
    cfg: dict
    kind: str  # labeled | pool
    samples: Dataset  # the part's samples alone (compact)
    positions: np.ndarray  # their positions in their split (the rows' index)
    part_id: int
    views: int
    out: str
    plan_fingerprint: str
    batch_size: int


@dataclass
class IndexJob:
    """A slice of a source's images to check: ``samples`` (compact), named in ``where``."""

    name: str  # train | test | pool: which listing
    samples: SourceDataset
    positions: np.ndarray

# map_jobs(fn, jobs) -> the results, in any order, as they finish
MapJobs = Callable[[Callable[[Any], dict], list], Iterable[dict]]


def compute_part_job(job: PartJob) -> dict[str, Any]:
    """Compute and write one part; returns its manifest entry plus ``part_id``."""
    cfg = from_dict(job.cfg)
    teacher, _ = load_teacher_for(job.teacher_path, cfg.data, job.teacher_arch, data=job.teacher_bytes)
    batches = compute_part(teacher, job.samples, job.positions, pooled=job.kind == "pool", views=job.views,
                           data=cfg.data, attack=cfg.attack, seed=cfg.run.seed, part_id=job.part_id,
                           device=resolve_device("auto"), batch_size=job.batch_size)
    entry = write_part(job.out, job.part_id, job.kind, len(job.positions), batches)
    write_part_record(job.out, job.part_id, entry, job.plan_fingerprint)
    return {"part_id": job.part_id, **entry}


def index_job(job: IndexJob) -> dict[str, Any]:
    """Check and fingerprint a slice: each image's sha256 and pixel digest, or its error."""
    listing = job.samples.listing
    data = listing.read_bytes(np.arange(len(listing)))
    digests, pixels, errors = [], [], []
    for k, raw in enumerate(data):
        digests.append(hashlib.sha256(raw).hexdigest())
        try:
            image = job.samples.read(np.array([k]))
            pixels.append(hashlib.sha256(image.numpy().tobytes()).hexdigest()[:32])
        except SourceError as err:
            pixels.append("")
            errors.append(str(err))
    return {"name": job.name, "positions": job.positions, "keys": listing.keys, "sha256": digests, "pixels": pixels,
            "errors": errors}


def map_locally(fn: Callable[[Any], dict], jobs: list) -> Iterator[dict]:
    """The default ``map_jobs``: one job after the other, in this process."""
    return (fn(job) for job in jobs)


def teacher_identity(teacher_path: str | Path, cfg: Config, teacher_arch: str | None) -> dict[str, Any]:
    """Load once up front: a wrong teacher fails here with a clear error, before any part runs."""
    _, header = load_teacher_for(teacher_path, cfg.data, teacher_arch)
    sha = file_sha256(teacher_path)
    return {"id": f"{header['arch']}-{sha[:12]}", "arch": header["arch"], "sha256": sha, "path": str(teacher_path)}


def index_source(cfg: Config, splits, map_jobs: MapJobs = map_locally, slice_size: int = 2048,
                 progress: bool = False, problems: list[str] | None = None) -> list[dict[str, Any]] | None:
    """Check every image of the run's own sources before any work (presets: only a pool of yours):
    each decodes, at the run's size and channels unless resizing/converting, and no pool image is
    a validation or test image (by pixels). Returns the index (one record per image: which
    listing, name, sha256, pixel digest), or None when there is nothing of yours to check.
    Raises :class:`SourceError` naming the first bad image and how many there are; with a
    ``problems`` list, appends every one to it instead."""
    sets = []
    if not cfg.data.preset:
        full = {"train": splits.train, "val": splits.val, "test": splits.test}
        sets += [(name, ds) for name, ds in full.items() if isinstance(ds, SourceDataset)]
    external = _external_pool(splits.pool)
    if external is not None:
        sets.append(("pool", external))
    if not sets:
        return None
    jobs = [IndexJob(name, ds.subset(np.arange(s, min(s + slice_size, len(ds)))).compact(),
                     np.arange(s, min(s + slice_size, len(ds)))) for name, ds in sets for s in range(0, len(ds), slice_size)]
    records, errors = [], []
    with progress_bar(len(jobs), "check source images", enabled=progress) as bar:
        for result in map_jobs(index_job, jobs):
            errors += result["errors"]
            records += [{"split": result["name"], "key": k, "sha256": d, "pixels": p}
                        for k, d, p in zip(result["keys"], result["sha256"], result["pixels"])]
            bar.update(1)
    if errors and problems is not None:
        problems += errors
        return records
    if errors:
        more = f" ({len(errors) - 1} more images have problems; see them all with `dard data check`)" if len(errors) > 1 else ""
        raise SourceError(errors[0] + more)
    if external is not None:
        held = {r["pixels"]: (r["split"], r["key"]) for r in records if r["split"] in ("val", "test")}
        if cfg.data.preset:
            held.update(_pixel_digests(splits.val, "val"))
            held.update(_pixel_digests(splits.test, "test"))
        clash = next((r for r in records if r["split"] == "pool" and r["pixels"] in held), None)
        if clash is not None:
            split, key = held[clash["pixels"]]
            raise SourceError(f"{cfg.data.pool}: {clash['key']} is an image of the {'validation' if split == 'val' else split} "
                              f"split (the same pixels as {key}); a pool may not hold validation or test images: remove it")
    return records


def _external_pool(pool) -> SourceDataset | None:
    """The part of the run's pool that comes from a source of yours (``data.pool``), if any."""

    if isinstance(pool, SourceDataset):
        return pool
    if isinstance(pool, ConcatDataset):
        return next((p for p in pool.parts if isinstance(p, SourceDataset)), None)
    return None


def _pixel_digests(ds: Dataset, name: str) -> dict[str, tuple[str, str]]:
    images = ds.images.numpy()
    return {hashlib.sha256(images[i].tobytes()).hexdigest()[:32]: (name, f"{name} sample {i}") for i in range(len(images))}


def build_shards(cfg: Config, teacher_path: str | Path, out: str, *, views: int = 1, split: str = "train",
                 rows_per_part: int = 4096, teacher_arch: str | None = None, batch_size: int = 256,
                 max_parts: int | None = None, map_jobs: MapJobs = map_locally) -> PrecomputeResult:
    """Build (or finish) the shard directory ``out`` for ``split`` of ``cfg``'s (resolved) data;
    the training split brings its pool (``data.labeled``, ``data.pool``) as pool rows.

    ``views``: augmented views per sample (epoch e trains on view e mod V). ``max_parts`` stops
    after computing that many parts, without a manifest (interruption tests, partial runs).
    """
    problems = [f"{flag}: must be >= 1, got {value}" for flag, value in (
        ("--views", views), ("--rows-per-part", rows_per_part), ("--batch", batch_size)) if value < 1]
    if problems:
        raise ValueError("; ".join(problems))
    dataset = cfg.data.dataset
    teacher = teacher_identity(teacher_path, cfg, teacher_arch)
    splits = load_splits(cfg.data)
    index = index_source(cfg, splits, map_jobs, progress=cfg.run.progress)
    sets = {"labeled": getattr(splits, split), "pool": splits.pool if split == "train" else None}
    counts = {k: len(ds) if ds is not None else 0 for k, ds in sets.items()}
    image_shape, num_classes = cfg.data.image_shape, cfg.data.num_classes
    plan = plan_parts(counts, rows_per_part, cfg.run.seed)
    cfg_dict = to_dict(cfg)
    plan_fp = plan_fingerprint(teacher_sha256=teacher["sha256"], dataset=dataset, split=split, data=cfg_dict["data"],
                               attack=cfg_dict["attack"], seed=cfg.run.seed, views=views, counts=counts,
                               rows_per_part=rows_per_part)
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
    jobs = [PartJob(teacher_bytes, str(teacher_path), teacher_arch, cfg_dict, plan[p][0],
                    sets[plan[p][0]].subset(plan[p][1]).compact(), plan[p][1], p, views, out, plan_fp, batch_size)
            for p in pending]
    computed: list[int] = []
    with progress_bar(len(pending), f"precompute {dataset}/{split} parts", enabled=cfg.run.progress) as bar:
        for result in map_jobs(compute_part_job, jobs) if jobs else ():
            entries[result["part_id"]] = {k: v for k, v in result.items() if k != "part_id"}
            computed.append(result["part_id"])
            bar.update(1, part=result["part_id"])
    if len(entries) < len(plan):
        return PrecomputeResult(out, None, sorted(computed), skipped)
    if index is not None:
        import json

        atomic_write(join(out if "://" in out else base, SOURCE_INDEX), lambda f: f.write(json.dumps(index).encode()))
    manifest = make_manifest(dataset=dataset, split=split, teacher=teacher, attack=cfg_dict["attack"],
                             data=cfg_dict["data"], views=views, num_classes=num_classes,
                             class_names=cfg.data.class_names, image_shape=image_shape,
                             parts=[entries[p] for p in range(len(plan))], counts=counts, rows_per_part=rows_per_part,
                             seed=cfg.run.seed, plan_fingerprint=plan_fp,
                             source_index=SOURCE_INDEX if index is not None else None)
    write_manifest(out, manifest)
    return PrecomputeResult(out, manifest, sorted(computed), skipped)

__all__ = ["KINDS", "PartJob", "IndexJob", "PrecomputeResult", "build_shards", "compute_part_job", "index_job",
           "index_source", "map_locally", "teacher_identity"]
