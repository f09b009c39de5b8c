"""What the Ray training tests hand the workers (the step hook of ``train_distributed(step_hook=...)``)
and read of a run (its committed epoch).

Shipped to the workers by value (``register``), so a worker need not import the tests package.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path


class WeightsLog:
    """After every step each rank appends ``{epoch, step, digest, rows, labels, pooled, verified}``
    (a hash of its trainable weights -- BN running stats are per rank by design --, the samples the
    step trained on, their hard labels, which were pool rows, and how many shard directories this
    worker process verified in full) to ``<directory>/rank<r>.jsonl``. With
    ``kill_at_epoch`` the last rank then kills its own process once (``marker`` records it), halfway
    through that epoch: a hard worker death, as a lost node or an OOM kill would be. It waits first
    until the controller has committed the previous epoch's checkpoint (``run_dir``: the Ray Train
    run, whose snapshot of its checkpoints says so): a death right after ``report`` may race it."""

    def __init__(self, directory: str, kill_at_epoch: int | None = None, marker: str | None = None,
                 run_dir: str | None = None):
        self.directory, self.kill_at_epoch, self.marker, self.run_dir = directory, kill_at_epoch, marker, run_dir

    def __call__(self, *, rank: int, world: int, epoch: int, step: int, steps: int, model, rows=None, labels=None,
                 pooled=None) -> None:
        from dard.models import unwrap
        from dard.shards import VERIFICATIONS

        log = Path(self.directory) / f"rank{rank}.jsonl"
        h = hashlib.sha256()
        for tensor in unwrap(model).parameters():
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        with open(log, "a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, "digest": h.hexdigest()[:16],
                                "rows": None if rows is None else rows.tolist(),
                                "labels": None if labels is None else labels.tolist(),
                                "pooled": None if pooled is None else pooled.tolist(),
                                "verified": len(VERIFICATIONS)}) + "\n")
        if self.kill_at_epoch == epoch and rank == world - 1 and step == max(1, steps // 2) \
                and not Path(self.marker).exists():
            Path(self.marker).write_text(f"killed rank {rank} at epoch {epoch}, step {step}")
            while committed_epoch(self.run_dir) < epoch - 1:
                time.sleep(0.1)
            os._exit(1)


def committed_epoch(run_dir: str) -> int:
    """The epoch of the newest checkpoint that Ray Train's controller committed in the run
    ``run_dir`` (``<storage>/<name>``), -1 before the first."""
    try:
        snapshot = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def register() -> None:
    """Pickle this module's classes by value for Ray's workers."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
