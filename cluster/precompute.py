"""Shard building on Ray: one Ray task per job (docs/design.md §4).

The checks, plan, resume and manifest are :func:`dard.precompute.build_shards`; this module only
supplies its ``map_jobs``: each job (a part, or a slice of a source to check) is a task carrying
its own samples only, the teacher's bytes go to the object store once, a part task takes a GPU
where the cluster has GPUs, and results come back as they finish.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cluster.ray_session import cluster_has_gpus, ensure_ray
from dard.config import Config
from dard.precompute import MapJobs, PrecomputeResult, build_shards

__all__ = ["precompute", "PrecomputeResult", "ray_map_jobs"]
SHARED = "teacher_bytes"  # the same for every part: put once


def ray_map_jobs(address: str | None = None) -> MapJobs:
    """A ``map_jobs`` that runs each job as a Ray task on the cluster at ``address`` (None: local)."""

    def run(fn, jobs: list):

        ray = ensure_ray(address)
        shared = hasattr(jobs[0], SHARED)
        options = {"num_gpus": 1} if shared and cluster_has_gpus() else {"num_cpus": 1}
        # Ray resolves refs passed as arguments (not inside the job), so the teacher travels as one.
        ref = [ray.put(getattr(jobs[0], SHARED))] if shared else []

        def task(job, *value):
            return fn(dataclasses.replace(job, **{SHARED: value[0]}) if value else job)

        remote = ray.remote(task).options(**options)
        futures = [remote.remote(dataclasses.replace(job, **{SHARED: None}) if shared else job, *ref) for job in jobs]
        while futures:
            ready, futures = ray.wait(futures, num_returns=1)
            yield ray.get(ready[0])

    return run


def precompute(cfg: Config, teacher_path: str | Path, out: str, *, views: int = 1, split: str = "train",
               rows_per_part: int = 4096, teacher_arch: str | None = None, batch_size: int = 256,
               address: str | None = None, max_parts: int | None = None, use_ray: bool = True) -> PrecomputeResult:
    """:func:`dard.precompute.build_shards` with a Ray task per job (``use_ray=False``: in this process)."""
    return build_shards(cfg, teacher_path, out, views=views, split=split, rows_per_part=rows_per_part,
                        teacher_arch=teacher_arch, batch_size=batch_size, max_parts=max_parts,
                        **({"map_jobs": ray_map_jobs(address)} if use_ray else {}))
