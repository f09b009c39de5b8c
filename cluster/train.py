"""Ray Train: DistributedDataParallel student training from shards (docs/design.md §5).

``train_distributed`` is the driver (``dard train``, ``cluster.jobs.train``); ``train_loop_per_worker``
is the shape of Ray's own examples: ``dard.training.prepare`` (the run assembly ``fit`` uses),
``prepare_model``, ``get_checkpoint`` -> ``Run.resume``, ``Run.epochs`` with ``report`` as its
epoch callback.

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

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dard.checkpoint import load_checkpoint, save_checkpoint, selection_metric
from dard.config import Config
from dard.files import absolute, within
from dard.engine import NonFiniteLossError, epoch_line
from dard.logs import one_line
from dard.shards import PeerShardError, ShardError, ShardSet
from dard.training import open_shards, prepare, save_selected

log = logging.getLogger("dard")
CHECKPOINT_FILE = "checkpoint.pt"
# what ranks a run's checkpoints: its selection metric (validation robust accuracy; natural for a
# natural baseline), -1 on epochs without validation
SCORE = "selection_score"
REPEATED = "dard_repeated"  # a report of an epoch already reported (see train_loop_per_worker)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every worker. ``config``: ``run`` (the Config), ``shards`` (the :class:`ShardSet`
    the driver checked: opened here without checking it again), optional ``teacher_path`` and
    ``step_hook``: a callable ``hook(rank=, world=, epoch=, step=, steps=, model=, rows=)`` run after
    every optimizer step (``rows``: the samples it trained on; the fault-tolerance tests kill a
    worker and record weight digests and rows with it).
    MLflow is logged by :func:`epochs_to_mlflow`, not here."""
    import ray.train
    import ray.train.torch

    # Ray Train V2 logs every report of every rank at INFO ("Reporting training result ...") on
    # a logger named after its file, whatever LoggingConfig says; the rank-0 epoch line below is
    # the one a person reads, so libraries in a worker say warnings only.
    logging.getLogger().setLevel(logging.WARNING)
    cfg = config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    try:
        run = prepare(cfg, teacher_path=config.get("teacher_path"), shards=config["shards"], rank=rank,
                      world_size=world, device=ray.train.torch.get_device())
        error = None
    except ValueError as err:  # config, shards, teacher: a restart cannot fix it
        error = err
    fatal = config["fatal"]
    if _stop_everywhere(error, world, rank, fatal):
        return
    run.model = ray.train.torch.prepare_model(run.model)  # wraps in DDP when world > 1
    checkpoint = ray.train.get_checkpoint()
    error = None
    if checkpoint:
        try:
            with checkpoint.as_directory() as d:
                run.resume(load_checkpoint(Path(d) / CHECKPOINT_FILE), f"the Ray Train checkpoint {checkpoint.path}")
        except ValueError as err:  # written under another config, unreadable
            error = err
    if _stop_everywhere(error, world, rank, fatal):
        return
    def scored(metrics: dict) -> dict:
        return {**metrics, SCORE: metrics.get(selection_metric(cfg.loss.method), -1.0)}

    def report(epoch: int, metrics: dict, history: list) -> None:
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                save_checkpoint(Path(d) / CHECKPOINT_FILE, run.checkpoint(epoch, history))  # refuses NaN weights
                ckpt = ray.train.Checkpoint.from_directory(d)
                print(epoch_line(cfg, metrics), flush=True)
            # every rank: it is a barrier. SCORE orders the checkpoints Ray keeps (the best and the latest)
            ray.train.report(scored(metrics), checkpoint=ckpt)

    hook: Callable | None = config.get("step_hook")
    try:
        run.epochs(report, rank=rank, extra_metrics={"world_size": world, **_nodes(world)},
                   on_step=None if hook is None else
                   (lambda epoch, step, batch: hook(rank=rank, world=world, epoch=epoch, step=step, steps=run.steps,
                                                    model=run.model, rows=batch.index)))
    except NonFiniteLossError as err:  # decided on all-reduced gradients: every rank is here, at the same step
        if rank == 0:
            ray.get(fatal.set.remote(one_line(err)))
        return
    except ShardError as err:  # a part that cannot be read: every rank stops at the same step (agreed)
        if not isinstance(err, PeerShardError):
            ray.get(fatal.set.remote(one_line(err)))
        return
    if checkpoint and run.start_epoch >= cfg.optim.epochs and run.history:
        # Restored after the last epoch (a sweep interrupted between a trial's last checkpoint and
        # its result): report that epoch again, or Tune would see the trial end with no result.
        ray.train.report({**scored(run.history[-1]), REPEATED: 1}, checkpoint=checkpoint if rank == 0 else None)


class FatalError:
    """An actor holding the first error that a restart would only repeat (config, shards, resume
    with another config, a NaN loss). Raised in a worker, such an error would make Ray Train
    restart the group ``max_failures`` times to fail the same way: the workers put it here and
    end instead, and ``train_distributed`` raises it on the driver."""

    def __init__(self):
        self.message: str | None = None

    def set(self, message: str) -> None:
        self.message = self.message or message

    def get(self) -> str | None:
        return self.message


def _stop_everywhere(error: BaseException | None, world: int, rank: int, fatal) -> bool:
    """Whether any rank hit such an error (a collective: every rank calls it, so all end together)."""
    import ray

    messages = [one_line(error) if error is not None else None] * world
    if world > 1:
        import torch.distributed as dist

        dist.all_gather_object(messages, messages[0])
    first = next((m for m in messages if m is not None), None)
    if first is not None and rank == 0:
        ray.get(fatal.set.remote(first))
    return first is not None


def _nodes(world: int) -> dict[str, Any]:
    """Where the DDP workers run (a collective: every rank calls it): ``nodes``, how many Ray nodes,
    and ``node_ips``, their addresses (comma-separated, sorted)."""
    import ray

    me = (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())
    found = [me] * world
    if world > 1:
        import torch.distributed as dist

        dist.all_gather_object(found, me)
    return {"nodes": len({node for node, _ in found}), "node_ips": ",".join(sorted({ip for _, ip in found}))}


def epochs_to_mlflow(tracking: dict, cfg: Config):
    """A Ray Train callback (it runs in the controller) that logs each epoch to MLflow once every
    worker's report of it has arrived: the epochs a run's checkpoints hold, each once. (Logged by a
    worker, an epoch whose report a lost host never delivered was logged, then trained again after
    the restart from the last checkpoint, and logged twice.) ``tracking``: the EpochLogger's
    ``{"uri", "run_id"}``; ``cfg``: the run's Config."""
    from ray.train import UserCallback  # here: importing Ray fixes its auth mode (ensure_ray sets it first)

    class EpochsToMlflow(UserCallback):
        def __init__(self):
            self.logger = None

        def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
            first = metrics[0]  # rank 0's: the validation metrics are measured there
            if first.get(REPEATED):
                return
            if self.logger is None:
                from dard.tracking import EpochLogger

                self.logger = EpochLogger(tracking, cfg)
            self.logger.log(first, int(first["epoch"]))

    return EpochsToMlflow()


def run_storage(cfg: Config, storage_path: str | None = None) -> str:
    """Where Ray Train keeps a run's checkpoints: ``storage_path`` (a local dir or URI) or
    ``<run.out_dir>/ray``; the run itself is ``<storage>/<name>``."""
    return absolute(storage_path or Path(cfg.run.out_dir) / "ray")


def check_scaling(workers: int, max_failures: int, cpus_per_worker: float | None = None,
                  collective_timeout_s: int = 300) -> None:
    """ValueError naming every scaling option that cannot run (before anything starts or is written)."""
    problems = [f"{flag}: must be >= {low}, got {value}" for flag, value, low in (
        ("--workers", workers, 1), ("--max-failures", max_failures, 0),
        ("--collective-timeout", collective_timeout_s, 1)) if value < low]
    if cpus_per_worker is not None and not cpus_per_worker > 0:
        problems.append(f"cpus per worker: must be > 0, got {cpus_per_worker}")
    if problems:
        raise ValueError("; ".join(problems))


@dataclass
class DistributedResult:
    metrics: dict[str, Any]
    checkpoint_dir: str
    model_path: str
    run_path: str
    history: list[dict]


def train_distributed(cfg: Config, shards: str | ShardSet, *, workers: int = 2, use_gpu: bool | None = None,
                      address: str | None = None, storage_path: str | None = None, name: str = "dard-train",
                      max_failures: int = 2, out: str | None = None, teacher_path: str | None = None,
                      tracking: dict | None = None, cpus_per_worker: float | None = None,
                      placement_strategy: str = "PACK", callbacks: list | None = None,
                      step_hook: Callable | None = None, collective_timeout_s: int = 300) -> DistributedResult:
    """Fit the student with ``workers`` DDP workers from ``shards``; returns the final metrics and paths.

    ``use_gpu`` None: GPUs when the cluster has any. ``placement_strategy``: ``PACK`` (fewest nodes,
    fastest gloo/NCCL) or ``SPREAD`` (one worker per node where possible). ``callbacks``: Ray Train
    user callbacks (a Tune trial passes ``TuneReportCallback``). ``tracking``: ``{"uri", "run_id"}``
    of the MLflow run the epochs go to (:func:`epochs_to_mlflow`). ``storage_path`` (local dir or ``s3://``)
    holds checkpoints; the same ``(storage_path, name)`` resumes. ``out``: the final model file
    (a path or URI; default ``<storage>/<name>/model.pt``, beside its checkpoints: in a Ray job the
    working directory is a temporary copy on the head). ``shards``: a directory, checked here
    (:func:`dard.training.open_shards`), or a :class:`ShardSet` the caller checked; the workers
    get it as it is. ``collective_timeout_s``: how long a rank waits in a collective (a
    peer's host lost without a closed connection) before it fails and Ray Train restarts the group
    (torch's default is 30 minutes).
    """
    from cluster.ray_session import cluster_has_gpus, ensure_ray

    check_scaling(workers, max_failures, cpus_per_worker, collective_timeout_s)
    checked = open_shards(shards, cfg, teacher_path)  # on the driver, once, before any worker starts
    ray = ensure_ray(address)
    # on the driver's node: an actor elsewhere would die with its host (a lost worker host must not
    # take the run's error channel with it)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    fatal = ray.remote(num_cpus=0)(FatalError).options(scheduling_strategy=here).remote()
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.rendezvous import LoopbackTorchConfig, NodeInterfaceTorchConfig, cluster_is_local

    if use_gpu is None:
        use_gpu = cluster_has_gpus()
    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else (4 if use_gpu else 0.5)}
    if use_gpu:
        resources["GPU"] = 1
    storage = run_storage(cfg, storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg, "shards": checked,
                           "teacher_path": absolute(teacher_path) if teacher_path else None,
                           "step_hook": step_hook, "fatal": fatal},
        # On a local cluster rendezvous through a file and gloo on loopback: nothing listens on the network.
        torch_config=(LoopbackTorchConfig if cluster_is_local() else NodeInterfaceTorchConfig)(
            backend="nccl" if use_gpu else "gloo", timeout_s=collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=placement_strategy),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=max_failures),
                             # each epoch to MLflow once all workers reported it (tracking: {"uri", "run_id"})
                             callbacks=[*(callbacks or []), *([epochs_to_mlflow(tracking, cfg)] if tracking else [])],
                             # the best epoch by the selection metric, and the latest (Ray always keeps it)
                             checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE,
                                                                checkpoint_score_order="max"),
                             # Ray Train logs every report per rank at INFO; our rank-0 epoch line is enough.
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    from cluster.ray_session import RayRunError, error_line

    started = time.time()
    try:
        result = trainer.fit()
        error = result.error
    except Exception as err:  # Ray Train raises the workers' errors wrapped (WorkerGroupError, ...)
        error = err
    finally:
        message = ray.get(fatal.get.remote())
        ray.kill(fatal)
    if message or error:
        raise RayRunError(f"distributed training failed: {message or error_line(error)}") from error
    with result.checkpoint.as_directory() as d:
        state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
        checkpoint_dir = result.checkpoint.path
    out_path = out or within(storage, name, "model.pt")
    _, meta = save_selected(out_path, state, cfg, {"distributed": {"workers": workers, "use_gpu": use_gpu,
                                                                   "seconds": time.time() - started}})
    return DistributedResult(metrics={**meta["final_metrics"], "selected_epoch": meta["selected_epoch"]},
                             checkpoint_dir=str(checkpoint_dir), model_path=str(out_path), run_path=str(result.path),
                             history=list(state["history"]))
