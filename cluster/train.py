"""Ray Train: DistributedDataParallel student training from shards (docs/design.md §5).

``train_distributed`` is the driver (``dard train``, ``cluster.jobs.train``); ``train_loop_per_worker``
is plain PyTorch around ``dard.engine.train_epoch`` plus three Ray calls (``prepare_model``,
``report``, ``get_checkpoint``).

Batch size: ``optim.batch_size`` is global and split evenly over workers, so the optimisation is
the same as one process with that batch and no learning-rate scaling is needed. Changing the
global batch follows the linear rule (lr proportional to batch size, Goyal et al. 2017).
BatchNorm statistics stay per worker (no SyncBN), as in torchvision's reference DDP recipes.

Fault tolerance: every epoch all ranks report and rank 0 attaches a checkpoint (model,
optimizer, scheduler, epoch, RNG). After a worker dies, ``FailureConfig(max_failures)`` restarts
the group and the loop resumes from ``get_checkpoint()``; re-running the driver with the same
``(storage_path, name)`` resumes an interrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dard.checkpoint import checkpoint_state, load_checkpoint, restore, save_checkpoint
from dard.config import IMAGE_SHAPE, NUM_CLASSES, Config, from_dict, to_dict
from dard.data import load_splits
from dard.engine import train_epoch
from dard.models import arch_kwargs, build_for, save_model, unwrap
from dard.training import (make_optimizer, make_scheduler, online_teacher_for, open_shards, seed_everything,
                           shard_batches, validate)

log = logging.getLogger("dard")
CHECKPOINT_FILE = "checkpoint.pt"


def _weights_digest(model: torch.nn.Module) -> str:
    """Hash of the trainable parameters (BN running stats are per rank between forwards, by design)."""
    import hashlib

    h = hashlib.sha256()
    for tensor in unwrap(model).parameters():
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every worker. ``config``: ``run`` (Config dict), ``shards`` (directory), optional
    ``tracking`` (MLflow URI + experiment, rank 0 logs), and test hooks ``fail_once_at_epoch``
    (+ ``fail_marker``) and ``weights_log_dir``."""
    import ray.train
    import ray.train.torch

    # Ray Train V2 logs every report of every rank at INFO ("Reporting training result ...") on
    # a logger named after its file, whatever LoggingConfig says; the rank-0 epoch line below is
    # the one a person reads, so libraries in a worker say warnings only.
    logging.getLogger().setLevel(logging.WARNING)
    cfg = from_dict(config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.run.seed + rank)  # attack random starts differ per rank; DDP syncs the weights
    device = ray.train.torch.get_device()
    model = build_for(cfg.model, cfg.data.dataset)
    model = ray.train.torch.prepare_model(model)  # moves to device, wraps in DDP when world > 1
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    if cfg.optim.batch_size % world:
        raise ValueError(f"optim.batch_size {cfg.optim.batch_size} is not divisible by {world} workers")
    reader = open_shards(config["shards"], cfg, check="fast")  # the driver already verified checksums
    source, steps = shard_batches(reader, cfg, rank, world, cfg.optim.batch_size // world)
    if steps == 0:
        raise ValueError(f"{len(reader)} samples are too few for a global batch of {cfg.optim.batch_size}")
    val = load_splits(cfg.data).val if rank == 0 else None
    shard_teacher = reader.manifest["teacher"]
    online_teacher = online_teacher_for(cfg, config.get("teacher_path") or shard_teacher.get("path"), device,
                                        expected_sha256=shard_teacher.get("sha256"))
    if online_teacher is not None:
        plain_source = source
        source = lambda e: (dataclasses.replace(b, online_teacher=online_teacher) for b in plain_source(e))  # noqa: E731

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
        start_epoch = restore(state, model, optimizer, scheduler, restore_rng=False)
        history = list(state.get("history", []))
        torch.manual_seed(cfg.run.seed + rank + 7919 * start_epoch)
    tracker = _rank0_tracker(config.get("tracking"), cfg, rank)
    weights_log = Path(config["weights_log_dir"]) / f"rank{rank}.jsonl" if config.get("weights_log_dir") else None
    if weights_log is not None:
        import ray

        weights_log.with_suffix(".node").write_text(ray.get_runtime_context().get_node_id())

    for epoch in range(start_epoch, cfg.optim.epochs):
        lr = optimizer.param_groups[0]["lr"]

        def after_step(n: int, loss: float, _epoch=epoch, _step=[0]) -> None:
            _step[0] += 1
            if weights_log is not None:
                with open(weights_log, "a") as f:
                    f.write(json.dumps({"epoch": _epoch, "step": _step[0], "digest": _weights_digest(model)}) + "\n")
            _maybe_die(config, rank, world, _epoch, _step[0], steps)

        stats = train_epoch(model, source(epoch), optimizer, loss_cfg=cfg.loss, attack_cfg=cfg.attack, device=device,
                            amp=cfg.optim.amp, grad_clip=cfg.optim.grad_clip, epoch=epoch, progress=after_step)
        scheduler.step()
        metrics = {"epoch": epoch, "lr": lr, "world_size": world, **{f"train_{k}": v for k, v in stats.items()}}
        if rank == 0 and ((epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == cfg.optim.epochs):
            metrics.update(validate(unwrap(model), val, cfg, cfg.run.eval_limit))
        history.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                state = checkpoint_state(model, optimizer, scheduler, epoch, to_dict(cfg), history,
                                         {"shards": reader.manifest.get("fingerprint"),
                                          "teacher": reader.manifest["teacher"]})
                save_checkpoint(Path(d) / CHECKPOINT_FILE, state)  # refuses NaN weights
                ckpt = ray.train.Checkpoint.from_directory(d)
                tracker.log(metrics, epoch)
                print(f"[dard] epoch {epoch + 1}/{cfg.optim.epochs}: " + ", ".join(
                    f"{k}={metrics[k]:.4g}" for k in ("train_loss", "val_natural_acc", "val_pgd_acc",
                                                      "train_images_per_s") if k in metrics), flush=True)
            ray.train.report(metrics, checkpoint=ckpt)  # every rank: it is a barrier
    if checkpoint and start_epoch >= cfg.optim.epochs and history:
        # Restored after the last epoch (a sweep interrupted between a trial's last checkpoint and
        # its result): report that epoch again, or Tune would see the trial end with no result.
        if rank == 0:
            tracker.log(history[-1], start_epoch - 1)
        ray.train.report(history[-1], checkpoint=checkpoint if rank == 0 else None)
    tracker.close()


def _maybe_die(config: dict, rank: int, world: int, epoch: int, step: int, steps: int) -> None:
    """Test hook: the last rank kills its own process once, halfway through ``fail_once_at_epoch``.

    It waits a few seconds first so the previous epoch's reported checkpoint is registered by the
    controller (a death right after ``report`` may race it and restart one epoch earlier)."""
    if config.get("fail_once_at_epoch") != epoch or rank != world - 1 or step != max(1, steps // 2):
        return
    marker = Path(config["fail_marker"])
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} at epoch {epoch}, step {step}")
    time.sleep(float(config.get("fail_delay_s", 3.0)))
    os._exit(1)  # a hard worker death, as a lost node or an OOM kill would be


class _NoTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _rank0_tracker(tracking: dict | None, cfg: Config, rank: int):
    """MLflow on rank 0 only; a no-op elsewhere or when tracking is off."""
    if not tracking or rank != 0:
        return _NoTracker()
    from dard.tracking import EpochLogger

    return EpochLogger(tracking, cfg)


def run_storage(cfg: Config, storage_path: str | None = None) -> str:
    """Where Ray Train keeps a run's checkpoints: ``storage_path`` (a local dir or URI) or
    ``<run.out_dir>/ray``; the run itself is ``<storage>/<name>``."""
    storage = storage_path or str(Path(cfg.run.out_dir).absolute() / "ray")
    return storage if "://" in storage else str(Path(storage).absolute())


@dataclass
class DistributedResult:
    metrics: dict[str, Any]
    checkpoint_dir: str
    model_path: str
    run_path: str
    history: list[dict]


def train_distributed(cfg: Config, shards: str, *, workers: int = 2, use_gpu: bool | None = None,
                      address: str | None = None, storage_path: str | None = None, name: str = "dard-train",
                      max_failures: int = 2, out: str | None = None, teacher_path: str | None = None,
                      tracking: dict | None = None, cpus_per_worker: float | None = None,
                      placement_strategy: str = "PACK", callbacks: list | None = None,
                      test_hooks: dict | None = None) -> DistributedResult:
    """Fit the student with ``workers`` DDP workers from ``shards``; returns the final metrics and paths.

    ``use_gpu`` None: GPUs when the cluster has any. ``placement_strategy``: ``PACK`` (fewest nodes,
    fastest gloo/NCCL) or ``SPREAD`` (one worker per node where possible). ``callbacks``: Ray Train
    user callbacks (a Tune trial passes ``TuneReportCallback``). ``storage_path`` (local dir or ``s3://``)
    holds checkpoints; the same ``(storage_path, name)`` resumes. ``out``: the final model file.
    """
    from cluster.ray_session import cluster_has_gpus, ensure_ray

    cfg.validate()
    open_shards(shards, cfg, teacher_path, check="full")  # fail on the driver, before any worker starts
    ensure_ray(address)
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.loopback import LoopbackTorchConfig, cluster_is_local

    if use_gpu is None:
        use_gpu = cluster_has_gpus()
    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else (4 if use_gpu else 0.5)}
    if use_gpu:
        resources["GPU"] = 1
    storage = run_storage(cfg, storage_path)
    shards_abs = shards if "://" in str(shards) else str(Path(shards).absolute())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": to_dict(cfg), "shards": shards_abs, "tracking": tracking,
                           "teacher_path": str(Path(teacher_path).absolute()) if teacher_path else None,
                           **(test_hooks or {})},
        # On a local cluster rendezvous through a file and gloo on loopback: nothing listens on the network.
        torch_config=(LoopbackTorchConfig if cluster_is_local() else TorchConfig)(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=placement_strategy),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=max_failures),
                             callbacks=callbacks,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # Ray Train logs every report per rank at INFO; our rank-0 epoch line is enough.
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    started = time.time()
    result = trainer.fit()
    if result.error:
        from dard.cli import one_line

        raise RuntimeError(f"distributed training failed: {one_line(result.error)}") from result.error
    with result.checkpoint.as_directory() as d:
        state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
        checkpoint_dir = result.checkpoint.path
    model = build_for(cfg.model, cfg.data.dataset)
    model.load_state_dict(state["model"])
    out_path = Path(out) if out else Path(cfg.run.out_dir) / "model.pt"
    meta = {"method": cfg.loss.method, "config": to_dict(cfg), "final_metrics": state["history"][-1],
            "teacher": state["extra"].get("teacher"), "shards": {"directory": shards_abs,
                                                                 "fingerprint": state["extra"].get("shards")},
            "distributed": {"workers": workers, "use_gpu": use_gpu, "seconds": time.time() - started}}
    save_model(out_path, model, arch=cfg.model.arch, num_classes=NUM_CLASSES[cfg.data.dataset],
               in_channels=IMAGE_SHAPE[cfg.data.dataset][0], dataset=cfg.data.dataset,
               arch_kwargs=arch_kwargs(cfg.model), meta=meta)
    return DistributedResult(metrics=state["history"][-1], checkpoint_dir=str(checkpoint_dir), model_path=str(out_path),
                             run_path=str(result.path), history=list(state["history"]))
