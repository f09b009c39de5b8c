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
optimizer, scheduler, epoch, history, the best epoch's weights; no RNG state: every epoch seeds
itself from (seed, rank, epoch) and streams rows that depend on nothing before it). After a
worker dies, ``FailureConfig(max_failures)`` restarts
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

from cluster.fatal import fatal_channel, stop_everywhere
from cluster.ray_session import RayRunError, cluster_has_gpus, ensure_ray, error_line
from dard.checkpoint import check_resumable, load_checkpoint, save_checkpoint, selection_metric
from dard.config import Config
from dard.engine import NonFiniteLossError, epoch_line
from dard.files import absolute, resolve, within
from dard.logs import one_line
from dard.shards import PeerShardError, ShardError, ShardSet
from dard.tracking import EpochLogger
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
    ``step_hook``: a callable ``hook(rank=, world=, epoch=, step=, steps=, model=, rows=, labels=,
    pooled=)`` run after every optimizer step (the samples it trained on, their hard labels, which
    were pool rows; the fault-tolerance tests kill a worker and record weight digests and rows with it).
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
    if stop_everywhere(error, world, rank, fatal):
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
    if stop_everywhere(error, world, rank, fatal):
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
                                                    model=run.model, rows=batch.index, labels=batch.y,
                                                    pooled=batch.pooled)))
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
            self.logger, self.logged = None, set()

        def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
            first = metrics[0]  # rank 0's: the validation metrics are measured there
            if first.get(REPEATED):
                return
            if self.logger is None:
                self.logger = EpochLogger(tracking, cfg)
                self.logged = self.logger.logged_epochs()  # a resumed run: what the first attempt logged
            epoch = int(first["epoch"])
            if epoch not in self.logged:
                self.logger.log(first, epoch)
                self.logged.add(epoch)

    return EpochsToMlflow()


def committed_checkpoint(run_dir: str) -> tuple[str, dict] | None:
    """The newest checkpoint of a Ray Train run (``<storage>/<name>``, a path or URI; Ray names
    them by time, and resumes from the newest): ``(its file, its state)``, or None when there is none yet."""
    import pyarrow.fs as pafs

    fs, base = resolve(run_dir)
    found = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    names = sorted(i.base_name for i in found if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    if not names:
        return None
    path = within(run_dir, names[-1], CHECKPOINT_FILE)
    return path, load_checkpoint(path)


def checked_rerun(cfg: Config, run_dir: str) -> tuple[str, dict] | None:
    """What running ``cfg`` as the Ray Train run ``run_dir`` (``<storage>/<name>``) would continue:
    its newest checkpoint, or None for a new run. A checkpoint written under another config is
    refused (:class:`dard.checkpoint.CheckpointError`), before anything starts or is written."""
    previous = committed_checkpoint(run_dir)
    if previous:
        check_resumable(previous[1], cfg.to_dict(), previous[0])
    return previous


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
                      step_hook: Callable | None = None, collective_timeout_s: int = 300,
                      rerun_checked: bool = False) -> DistributedResult:
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
    (torch's default is 30 minutes). ``rerun_checked``: the caller has applied :func:`checked_rerun`
    to this ``(storage, name)`` already.
    """

    check_scaling(workers, max_failures, cpus_per_worker, collective_timeout_s)
    checked = open_shards(shards, cfg, teacher_path)  # on the driver, once, before any worker starts
    storage = run_storage(cfg, storage_path)
    if not rerun_checked:  # the same Ray run again under another config: refused before any worker starts
        checked_rerun(cfg, within(storage, name))
    ray = ensure_ray(address)
    fatal = fatal_channel(ray)
    if use_gpu is None:
        use_gpu = cluster_has_gpus()
    trainer = build_trainer(cfg, checked, fatal, workers=workers, use_gpu=use_gpu, storage=storage, name=name,
                            max_failures=max_failures, teacher_path=teacher_path, tracking=tracking,
                            cpus_per_worker=cpus_per_worker, placement_strategy=placement_strategy,
                            callbacks=callbacks, step_hook=step_hook, collective_timeout_s=collective_timeout_s)
    started = time.time()
    try:
        result = fit_off_main_thread(trainer)
        error = result.error
    except Exception as err:  # Ray Train raises the workers' errors wrapped (WorkerGroupError, ...)
        error = err
    finally:
        message = ray.get(fatal.get.remote())
        ray.kill(fatal)
    if message or error:
        raise RayRunError(f"distributed training failed: {message or error_line(error)}") from error
    return read_result(result, cfg, out or within(storage, name, "model.pt"),
                       {"workers": workers, "use_gpu": use_gpu, "seconds": time.time() - started})


def fit_off_main_thread(trainer):
    """``trainer.fit()`` in a thread of its own. On the main thread Ray Train installs its own SIGINT
    handler (a graceful abort, after which the process exits 1 with no word); off it, dard's stay:
    Ctrl-C and SIGTERM reach the main thread as exceptions, the command closes its MLflow run and
    exits 130/143 with one line, and the Ray it started goes down with the run (the last committed
    checkpoint is kept; the same command continues from it)."""
    import threading

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 -- handed to the main thread as it is
            outcome["error"] = err

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # a bounded wait: signals are delivered between two
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def build_trainer(cfg: Config, shards: ShardSet, fatal, *, workers: int, use_gpu: bool, storage: str, name: str,
                  max_failures: int, teacher_path: str | None, tracking: dict | None, cpus_per_worker: float | None,
                  placement_strategy: str, callbacks: list | None, step_hook: Callable | None,
                  collective_timeout_s: int):
    """The ``TorchTrainer`` of :func:`train_distributed` (its parameters are that function's)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.rendezvous import LoopbackTorchConfig, NodeInterfaceTorchConfig, cluster_is_local  # imports Ray Train

    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else (4 if use_gpu else 0.5)}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg, "shards": shards,
                           "teacher_path": absolute(teacher_path) if teacher_path else None,
                           "step_hook": step_hook, "fatal": fatal},
        # On a local cluster rendezvous through a file and gloo on loopback: nothing listens on the network.
        torch_config=(LoopbackTorchConfig if cluster_is_local() else NodeInterfaceTorchConfig)(
            backend="nccl" if use_gpu else "gloo", timeout_s=collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=placement_strategy),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=max_failures),
                             # each epoch to MLflow once all workers reported it (tracking: {"uri", "run_id"});
                             # first: Tune may stop a trial as soon as its callback hears the last epoch
                             callbacks=[*([epochs_to_mlflow(tracking, cfg)] if tracking else []), *(callbacks or [])],
                             # the best epoch by the selection metric, and the latest (Ray always keeps it)
                             checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE,
                                                                checkpoint_score_order="max"),
                             # Ray Train logs every report per rank at INFO; our rank-0 epoch line is enough.
                             logging_config=LoggingConfig(log_level="WARNING")),
    )


def read_result(result, cfg: Config, out: str, distributed: dict) -> DistributedResult:
    """A finished Ray Train run: its last checkpoint's selected epoch written as the model file ``out``."""
    with result.checkpoint.as_directory() as d:
        state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
        checkpoint_dir = result.checkpoint.path
    _, meta = save_selected(out, state, cfg, {"distributed": distributed})
    return DistributedResult(metrics={**meta["final_metrics"], "selected_epoch": meta["selected_epoch"]},
                             checkpoint_dir=str(checkpoint_dir), model_path=str(out), run_path=str(result.path),
                             history=list(state["history"]))
