"""Shard building on Ray: one Ray task per part (docs/design.md §4).

The plan, resume and manifest are :func:`dard.precompute.build_shards`; this module only supplies
its ``map_parts``: the teacher's bytes and the split's arrays go to the object store once, each
part is a task (a GPU each where the cluster has GPUs), and results come back as they finish.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from dard.config import Config
from dard.precompute import MapParts, PartJob, PrecomputeResult, build_shards

__all__ = ["precompute", "PrecomputeResult", "ray_map_parts"]
SHARED = ("teacher_bytes", "images", "labels")  # the same for every part


def ray_map_parts(address: str | None = None) -> MapParts:
    """A ``map_parts`` that runs each part as a Ray task on the cluster at ``address`` (None: local)."""

    def run(fn, jobs: list[PartJob]):
        from cluster.ray_session import cluster_has_gpus, ensure_ray

        ray = ensure_ray(address)
        options = {"num_gpus": 1} if cluster_has_gpus() else {"num_cpus": 1}
        # The teacher and the split's arrays go to the object store once; Ray resolves refs passed
        # as arguments (not inside the job), so each task gets them as such.
        shared = [ray.put(getattr(jobs[0], k)) for k in SHARED]

        def part(job: PartJob, *values) -> dict:
            return fn(dataclasses.replace(job, **dict(zip(SHARED, values))))

        task = ray.remote(part).options(**options)
        futures = [task.remote(dataclasses.replace(job, **dict.fromkeys(SHARED)), *shared) for job in jobs]
        while futures:
            ready, futures = ray.wait(futures, num_returns=1)
            yield ray.get(ready[0])

    return run


def precompute(cfg: Config, teacher_path: str | Path, out: str, *, views: int = 1, split: str = "train",
               rows_per_part: int = 4096, teacher_arch: str | None = None, batch_size: int = 256,
               address: str | None = None, max_parts: int | None = None, use_ray: bool = True) -> PrecomputeResult:
    """:func:`dard.precompute.build_shards` with a Ray task per part (``use_ray=False``: in this process)."""
    return build_shards(cfg, teacher_path, out, views=views, split=split, rows_per_part=rows_per_part,
                        teacher_arch=teacher_arch, batch_size=batch_size, max_parts=max_parts,
                        **({"map_parts": ray_map_parts(address)} if use_ray else {}))
