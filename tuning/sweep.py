"""Ray Tune sweeps over DARD's temperature and loss weights (docs/design.md §6).

Each trial runs the cluster trainer (Train inside Tune, as Ray 2.5x+ documents it: a Tune
function that builds a ``TorchTrainer`` with ``TuneReportCallback``; ``Tuner(trainer)`` is
deprecated). OptunaSearch proposes points, ASHA stops poor trials early on epochs. Objective:
validation robust accuracy (``val_robust_acc``: a sample counts if it survives both PGD and the
CW margin attack, on the held-out validation split; the test split is never seen). PGD-CE alone
would reward the small logit margins of distilled students, which AutoAttack then finds.

MLflow: one parent run per sweep, one child run per trial (params, per-epoch metrics, the
student with a signature). ``--resume`` continues an interrupted sweep (``Tuner.restore``):
finished trials are kept, unfinished ones re-run, and the parent run is reused. Tune unpickles
its folder on restore, so the folder is sealed when a sweep stops and checked before a resume
(``tuning/sealed_state.py``).

Resources: one trial at a time on a laptop (``max_concurrent`` defaults to what the cluster
fits: GPUs // workers_per_trial, or 1 without GPUs); the trial's own driver takes 0.01 CPU.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from cluster.ray_session import cluster_has_gpus, ensure_ray
from cluster.train import train_distributed
from dard.checkpoint import load_checkpoint, selected
from dard.config import Config
from dard.files import absolute, exists, make_dirs, read_bytes, within, write_bytes
from dard.logs import percent
from dard.registry import METRIC as OBJECTIVE  # validation PGD + CW robust accuracy
from dard.tracking import EpochLogger, check_tracking_uri, client as tracking_client, log_model
from dard.training import open_shards, save_selected
from tuning.sealed_state import check_sealed, seal
from tuning.space import apply, load_space, to_tune, validate_space

log = logging.getLogger("dard")
PARENT_FILE = "mlflow_parent_run.json"  # the parent run's id and the planned number of trials
DEFAULT_TRIALS = 12


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped before every trial ended; its state is saved for ``--resume``."""


@dataclass
class SweepResult:
    best_params: dict[str, Any]
    best_metrics: dict[str, Any]  # of the epoch the best trial keeps (registers): its checkpoint history's entry
    best_checkpoint: str
    best_run_id: str | None
    parent_run_id: str
    trials: int
    experiment_path: str


def _ended_trials_callback():
    from ray.tune import Callback

    class EndedTrials(Callback):
        """Trials started in this ``fit`` that never completed or failed: the ones Ctrl-C stopped.

        Tune's shutdown stops them without ``on_trial_complete`` (that hook fires for a trial
        that reached its last epoch or that ASHA stopped) and then marks them TERMINATED.
        """

        def __init__(self):
            self.live: set[str] = set()

        def on_trial_start(self, iteration, trials, trial, **info):
            self.live.add(trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.live.discard(trial.trial_id)
            result = trial.last_result or {}
            params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in trial.config.items() if k != "method")
            held = _held_epoch(result["checkpoint_path"]) if "checkpoint_path" in result else {}
            kept = (f"keeps epoch {held['epoch'] + 1}: validation robust accuracy {percent(held[OBJECTIVE])}"
                    if OBJECTIVE in held else "validation robust accuracy n/a")
            print(f"trial {trial.trial_id}: {result.get('epoch', -1) + 1} epochs, {kept} ({params})", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.live.discard(trial.trial_id)
            print(f"trial {trial.trial_id}: failed ({trial.error_file or 'see the sweep folder'})", flush=True)

    return EndedTrials()


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: apply the point ``config`` (the sampled parameters), train with DDP, log to
    an MLflow child run. ``ctx``: the sweep's fixed context (the run's Config, the checked
    ShardSet, storage, tracking), bound with ``tune.with_parameters``."""
    import ray.tune
    from mlflow.entities import Param
    from ray.tune.integration.ray_train import TuneReportCallback

    params = dict(config)
    cfg = apply(ctx["run"], params)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = cfg.updated(run={"out_dir": ctx["trials_dir"] + "/" + trial_id})
    tracker = _trial_run(ctx, trial_id, cfg)
    tracker.client.log_batch(tracker.run_id, params=[Param(f"trial.{k}", str(v)) for k, v in params.items()])
    try:
        train_distributed(
            cfg, ctx["shards"], workers=ctx["workers"], use_gpu=ctx["use_gpu"], name=f"train-{trial_id}",
            storage_path=within(ctx["storage"], "train"), max_failures=1,
            tracking={"uri": ctx["tracking_uri"], "run_id": tracker.run_id}, callbacks=[TuneReportCallback()],
            cpus_per_worker=ctx["cpus_per_worker"])
    except BaseException:
        # Tune stops a trial right after its last report, sometimes after its worker closed the
        # run FINISHED: keep that status (the sweep settles the rest, see _close_children).
        if tracker.client.get_run(tracker.run_id).info.status == "RUNNING":
            tracker.close("KILLED")
        raise
    # Nothing after training: ASHA stops a trial as soon as it reports its last epoch (max_t), so
    # the model is logged by the sweep driver for the best trial (see _log_best_model).


def _trial_run(ctx: dict[str, Any], trial_id: str, cfg: Config) -> EpochLogger:
    """The trial's MLflow child run: the one it opened before a --resume (reopened, so each epoch
    is logged once, into one run per trial), or a new one."""
    known = {r.data.tags.get("dard.trial_id"): r for r in child_runs(ctx["tracking_uri"], ctx["parent_run_id"])}
    if trial_id in known:
        logger = EpochLogger({"uri": ctx["tracking_uri"], "run_id": known[trial_id].info.run_id}, cfg)
        logger.client.update_run(logger.run_id, status="RUNNING")
        return logger
    return EpochLogger({"uri": ctx["tracking_uri"], "experiment": ctx["experiment"], "run_name": f"trial-{trial_id}",
                        "parent_run_id": ctx["parent_run_id"],
                        "tags": {"dard.trial_id": trial_id, "dard.sweep": ctx["name"]}}, cfg)


def sweep(cfg: Config, shards: str, space: str | dict, *, trials: int | None = None, workers_per_trial: int = 1,
          name: str = "dard-sweep", storage_path: str | None = None, tracking_uri: str | None = None,
          experiment: str = "dard-sweeps", resume: bool = False, address: str | None = None,
          max_concurrent: int | None = None, grace_period: int = 1, seed: int = 0,
          use_gpu: bool | None = None, cpus_per_worker: float | None = None) -> SweepResult:
    """Run (or resume) a sweep; returns the best trial by validation robust accuracy.

    Everything that can be wrong with the inputs (space, config, shards, tracking URI) fails
    here, before any trial starts.
    """

    space_dict = load_space(space) if isinstance(space, str) else validate_space(space)
    problems = [f"{flag}: must be >= 1, got {value}" for flag, value in (
        ("--trials", trials if trials is not None else 1), ("--workers-per-trial", workers_per_trial),
        ("--grace-period", grace_period),
        ("--max-concurrent", max_concurrent if max_concurrent is not None else 1)) if value < 1]
    if problems:
        raise ValueError("; ".join(problems))
    if not isinstance(space_dict.get("method"), (str, type(None))):
        raise ValueError("space: method must be a fixed value (one method per sweep, equal trials per method)")
    cfg = cfg.updated(loss={"method": space_dict.get("method", cfg.loss.method)})
    uri = check_tracking_uri(tracking_uri)
    checked = open_shards(shards, cfg)  # once per sweep: the trials get it as it is
    storage = absolute(storage_path or Path(cfg.run.out_dir) / "sweeps")
    experiment_path = within(storage, name)
    if resume and not exists(experiment_path):
        raise FileNotFoundError(f"--resume: no sweep at {experiment_path}; run it once without --resume")
    parent_file = within(experiment_path, PARENT_FILE)
    started = json.loads(read_bytes(parent_file)) if resume and exists(parent_file) else {}
    if resume and trials is not None and started.get("trials") not in (None, trials):
        raise ValueError(f"--trials {trials}: sweep {name} was started with {started['trials']} trials and --resume "
                         f"continues it as it was; drop --trials or pass {started['trials']}")
    trials = trials or started.get("trials") or DEFAULT_TRIALS

    ray = ensure_ray(address)
    if use_gpu is None:
        use_gpu = cluster_has_gpus()
    if max_concurrent is None:
        max_concurrent = max(1, int(ray.cluster_resources().get("GPU", 0)) // workers_per_trial) if use_gpu else 1
    make_dirs(experiment_path)
    if started.get("run_id"):
        parent_run_id = started["run_id"]
        tracking_client(uri)[0].update_run(parent_run_id, status="RUNNING")  # closed KILLED when it stopped
    else:
        parent = EpochLogger({"uri": uri, "experiment": experiment, "run_name": name,
                              "tags": {"dard.sweep": name, "dard.space": json.dumps(space_dict)[:5000]}}, cfg)
        parent_run_id = parent.run_id
        write_bytes(parent_file, json.dumps({"run_id": parent_run_id, "trials": trials}).encode())
    ctx = {"run": cfg, "shards": checked, "workers": workers_per_trial, "use_gpu": use_gpu,
           "storage": experiment_path, "trials_dir": str(Path(cfg.run.out_dir).absolute() / "trials" / name),
           "tracking_uri": uri, "experiment": experiment, "parent_run_id": parent_run_id, "name": name,
           "cpus_per_worker": cpus_per_worker}
    watcher = _ended_trials_callback()
    tuner = _tuner(ctx, space_dict, watcher, resume=resume, storage=storage, trials=trials,
                   max_concurrent=max_concurrent, grace_period=grace_period, seed=seed)
    try:
        with _tune_console():
            grid = tuner.fit()
    except BaseException:  # a signal (SIGTERM, Ctrl-C) or a failure: resumable, and said so
        _stopped(experiment_path, uri, parent_run_id, cfg.optim.epochs)
        raise
    seal(experiment_path, tracking_client(uri)[0], parent_run_id)  # what a --resume may hand back to Tune
    try:
        return _settle(grid, cfg, ctx, watcher, trials)
    except SweepInterrupted:
        tracking_client(uri)[0].set_terminated(parent_run_id, "KILLED")
        raise


def _stopped(experiment_path: str, uri: str, parent_run_id: str, epochs: int) -> None:
    """A sweep stopped inside Tune: its state sealed as Tune left it (so --resume can check and
    hand it back), its trial runs and its parent run closed (--resume reopens what continues)."""
    store = tracking_client(uri)[0]
    if exists(within(experiment_path, "tuner.pkl")):
        seal(experiment_path, store, parent_run_id)
    _close_children(uri, parent_run_id, epochs)
    if store.get_run(parent_run_id).info.status == "RUNNING":
        store.set_terminated(parent_run_id, "KILLED")


@contextmanager
def _tune_console():
    """Tune's console while a sweep runs: its status table with --verbose, nothing without. At
    verbose=0 Tune's default output engine still prints an experiment box, the results folder and a
    TensorBoard command for Ray's session folder; its other engine (``RAY_AIR_NEW_OUTPUT=0``, read
    as ``fit`` starts) prints nothing there."""
    if _tune_verbose():
        yield
        return
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["RAY_AIR_NEW_OUTPUT"]
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _tune_verbose() -> int:
    return 1 if log.isEnabledFor(logging.INFO) else 0  # Tune's status table only with --verbose


def _tuner(ctx: dict, space: dict, watcher, *, resume: bool, storage: str, trials: int, max_concurrent: int,
           grace_period: int, seed: int):
    """The Tuner of a new sweep, or of one restored from its (sealed, checked) folder."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    cfg, name = ctx["run"], ctx["name"]
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"cpu": 0.01})
    tune_verbose = _tune_verbose()
    if resume:
        check_sealed(ctx["storage"], tracking_client(ctx["tracking_uri"])[0], ctx["parent_run_id"])  # before Tune unpickles
        tuner = tune.Tuner.restore(ctx["storage"], trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=to_tune(space))
        # Tuner.restore takes no run config; the restored one carries the last run's watcher.
        from cluster.ray_private import restored_run_config  # imports Ray Train: after ensure_ray

        restored = restored_run_config(tuner)
        restored.callbacks, restored.verbose = [watcher], tune_verbose
        return tuner
    search = None  # Optuna needs at least one distribution; an all-fixed space just runs that point
    if any(isinstance(v, dict) for v in space.values()):
        import optuna

        # Optuna's INFO lines ("A new study created ...") through logging to dard.log, not its own console handler
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        search = OptunaSearch(seed=seed)
    return tune.Tuner(
        trainable,
        param_space=to_tune(space),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE, mode="max", num_samples=trials, max_concurrent_trials=max_concurrent,
            search_alg=search,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=cfg.optim.epochs,
                                    grace_period=min(grace_period, cfg.optim.epochs))),
        # Tune's status table (every parameter, every few seconds) only with --verbose; the
        # console gets the epoch lines and one line per finished trial (the watcher).
        run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[watcher], verbose=tune_verbose,
                                  failure_config=tune.FailureConfig(max_failures=1)))


def _settle(grid, cfg: Config, ctx: dict, watcher, trials: int) -> SweepResult:
    """What a sweep's grid comes to: the best trial that ran every epoch, its model logged, the
    trial runs closed and the parent run summarised -- or, for a sweep stopped before every trial
    ended, nothing: it raises and `--resume` continues it.

    Ctrl-C: Tune stops gracefully, saves its state and returns the partial grid, the stopped
    trials marked TERMINATED like finished ones. That is not a result: nothing is selected,
    registered or closed. The trials that ran every epoch are told by the epoch they last
    reported, not by Tune's count of reports: a trial interrupted and resumed reports only the
    epochs after its last checkpoint, and Tune's count can miss a report that Ctrl-C cut short.
    A trial ASHA stopped early has an earlier-epoch score (not comparable) and no logged model."""
    uri, parent_run_id, name, experiment_path = ctx["tracking_uri"], ctx["parent_run_id"], ctx["name"], ctx["storage"]
    finished = [r for r in grid if r.metrics and r.metrics.get("epoch") == cfg.optim.epochs - 1
                and OBJECTIVE in r.metrics]
    finished_ids = {r.metrics.get("trial_id") for r in finished}
    planned = max(trials, len(grid))
    ended = grid.num_terminated + grid.num_errors - len(watcher.live)
    if watcher.live or ended < planned:
        _close_children(uri, parent_run_id, cfg.optim.epochs, finished_ids)  # --resume reopens the others
        raise SweepInterrupted(f"sweep {name} interrupted after {ended} of {planned} trials; nothing registered. "
                               f"Continue it with --resume --name {name}")
    if not finished:
        seen = [(r.metrics or {}).get("epoch", -1) + 1 for r in grid]
        errors = [str(r.error)[:300] for r in grid if r.error]
        raise RuntimeError(f"sweep {name}: no trial finished all {cfg.optim.epochs} epochs (epochs reached: {seen}; "
                           f"errors: {errors}); see {experiment_path}")
    best_metrics, best = _best(finished)
    best_params = dict(best.config)
    _close_children(uri, parent_run_id, cfg.optim.epochs, finished_ids)
    best_run_id = _child_run_for(uri, parent_run_id, best.metrics.get("trial_id"))
    if best_run_id:
        _log_best_model(uri, best_run_id, best.metrics["checkpoint_path"], apply(cfg, best_params),
                        within(experiment_path, "best-model.pt"))
    _summarise_parent(uri, parent_run_id, best_params, best_metrics, len(grid))
    return SweepResult(best_params, best_metrics, best.metrics["checkpoint_path"], best_run_id, parent_run_id,
                       len(grid), str(experiment_path))


def _best(finished: list) -> tuple[dict, Any]:
    """(the metrics of the epoch it keeps, its Tune result) of the trial whose model would register
    best: ranked by the validation robust accuracy of the epoch each trial keeps, not of its last
    epoch (the first wins a tie)."""
    kept, best = max(((_held_epoch(r.metrics["checkpoint_path"]), r) for r in finished),
                     key=lambda pair: pair[0][OBJECTIVE])
    return dict(kept), best  # a copy: the cached record stays as read


@cache  # a reported checkpoint never changes: the trial's line and the ranking read it once (a download from S3)
def _held_epoch(checkpoint_path: str) -> dict:
    """The metrics of the epoch whose weights a trial keeps (its checkpoint's selected epoch,
    :func:`dard.checkpoint.selected`: the best on validation), from the checkpoint a Tune result names."""
    state = load_checkpoint(within(checkpoint_path, "checkpoint.pt"))
    epoch = selected(state)[1]
    return next(h for h in state["history"] if h.get("epoch") == epoch)


def _log_best_model(uri: str, run_id: str, checkpoint_path: str, cfg: Config, out: str) -> None:
    """The best trial's student (its selected epoch, from its last checkpoint) to ``out`` and into
    its child run, logged as every training path logs its model."""

    state = load_checkpoint(within(checkpoint_path, "checkpoint.pt"))
    # Tune may stop a trial between its last report and that epoch's MLflow line: the checkpoint's
    # history fills what is missing, so the held epoch's metric is there to compare
    EpochLogger({"uri": uri, "run_id": run_id}, cfg).backfill(state.get("history") or [])
    path, _ = save_selected(out, state, cfg)
    log_model(run_id, path, tracking_uri=uri)


def _close_children(uri: str, parent_run_id: str, epochs: int, finished_trials: set | frozenset = frozenset()):
    """Final status of the trial runs: FINISHED for each trial that ran every epoch (Tune's result
    says so, or its run logged the last epoch), KILLED for the others still open (stopped by ASHA,
    or by a signal: a --resume reopens those it continues).

    The sweep decides, not the trial: Tune stops a trial as soon as it reports its last epoch,
    which can interrupt the trial function before it could close its run."""
    client, _ = tracking_client(uri)
    for run in child_runs(uri, parent_run_id):
        done = run.data.tags.get("dard.trial_id") in finished_trials or run.data.metrics.get("epoch") == epochs - 1
        if done and run.info.status != "FINISHED":
            client.set_terminated(run.info.run_id, "FINISHED")
        elif not done and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")


def _child_run_for(uri: str, parent_run_id: str, trial_id: str | None) -> str | None:
    runs = [r for r in child_runs(uri, parent_run_id) if r.data.tags.get("dard.trial_id") == trial_id]
    return runs[0].info.run_id if runs else None


def _summarise_parent(uri: str, parent_run_id: str, params: dict, metrics: dict, trials: int) -> None:
    client, _ = tracking_client(uri)
    for k, v in params.items():
        client.set_tag(parent_run_id, f"best.{k}", str(v))
    for k in (OBJECTIVE, "val_pgd_acc", "val_natural_acc"):
        if k in metrics:
            client.log_metric(parent_run_id, f"best_{k}", float(metrics[k]))
    client.log_metric(parent_run_id, "trials", trials)
    client.set_terminated(parent_run_id, "FINISHED")


def child_runs(uri: str, parent_run_id: str) -> list:
    """The sweep's trial runs (for `dard registry`, tests and reports)."""
    client, _ = tracking_client(uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
