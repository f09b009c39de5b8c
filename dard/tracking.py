"""MLflow tracking: runs, params, per-epoch metrics, reports, logged models (docs/design.md §6).

Default tracking URI: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<absolute cwd>/mlflow.db`` -- always
absolute, because Ray workers run in another directory. Models are logged in MLflow's own PyTorch
flavour as a ``torch.export`` program (``pt2``), so MLflow serves them where dard is not installed;
the dard model file rides along for dard's own weights-only loading. The model registry (register,
champion alias, loading by name) is ``dard.registry``.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from dard import __version__, lineage
from dard.card import model_card
from dard.config import to_dict
from dard.files import atomic_write, exists, read_bytes
from dard.modelfile import from_file

DEFAULT_EXPERIMENT = "dard"
CONFIG_ARTIFACT = "config.json"  # a run's whole config (a tag of 1-2 KB broke MLflow's pages)
CONFIG_TAG = "dard.config"  # where runs of dard before 0.2 kept it; still read
LOGGED_MODEL_TAG = "dard.logged_model_id"  # the MLflow model a run logged (what `promote` registers)
SELECTED_EPOCH_TAG = "dard.selected_epoch"  # the epoch whose weights that model holds (what `promote` compares)


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used; the message names the URI."""


def default_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return absolute_uri(uri) if uri else f"sqlite:///{Path.cwd().absolute() / 'mlflow.db'}"


def absolute_uri(uri: str) -> str:
    """Relative sqlite paths and bare paths become absolute (workers have another cwd)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).absolute())
    if "://" not in uri and ":" not in uri[:3]:
        return "sqlite:///" + str(Path(uri).absolute())
    return uri


def check_tracking_uri(uri: str | None, timeout_s: float = 5.0, existing: bool = False) -> str:
    """The store to use (``uri``, else :func:`default_tracking_uri`), as an absolute URI; fails fast
    with a clear error if it cannot be reached. ``existing``: a command that only reads (the
    registry) refuses a sqlite file that is not there, instead of creating an empty store."""
    uri = absolute_uri(uri or default_tracking_uri())
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if existing and not db.is_file():
            raise TrackingError(f"tracking URI {uri}: no MLflow database there; pass the --tracking-uri "
                                "the runs were logged to")
        folder = db.parent
        if not folder.is_dir():
            raise TrackingError(f"tracking URI {uri}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking URI {uri}: folder {folder} is not writable")
        if db.exists() and not (db.stat().st_mode & 0o222 and os.access(db, os.W_OK)):  # root ignores modes
            raise TrackingError(f"tracking URI {uri}: {db} is read-only; make it writable or use another --tracking-uri")
        return uri
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise TrackingError(f"tracking URI {uri} is unreachable ({err}); start the server "
                                "(`mlflow server --backend-store-uri sqlite:///mlflow.db`) or fix --tracking-uri") from err
        return uri
    if uri.startswith(("databricks", "file:")):
        return uri
    raise TrackingError(f"tracking URI {uri!r}: unsupported scheme; use sqlite:///PATH, http(s)://HOST:PORT")


def client(uri: str | None = None):
    """The one way dard talks to MLflow: an ``MlflowClient`` on ``uri`` (else the default store),
    made absolute (Ray workers run in another directory). It is also set as the process's tracking
    URI, for the few MLflow calls that take no client (``log_model``, ``register_model``,
    ``download_artifacts``). Returns (client, the absolute URI)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = absolute_uri(uri or default_tracking_uri())
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///") and uri not in _READY:
        _create_once(uri, Path(uri[len("sqlite:///"):]))
        _READY.add(uri)
    return MlflowClient(tracking_uri=uri), uri

_READY: set[str] = set()  # sqlite stores this process has seen created and migrated


def _create_once(uri: str, db: Path) -> None:
    """MLflow creates and migrates a sqlite store on first use, with no lock: N runs starting together
    on a new store race (all but one die in a migration). One process at a time, then, under an
    exclusive lock on ``<db>.lock`` beside it; later users find the schema ready."""
    import fcntl

    from mlflow.tracking import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existed = db.exists()
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates and migrates the schema
        except Exception as err:
            if not existed:  # a half-migrated store would fail every later run: leave none
                db.unlink(missing_ok=True)
            if "disk is full" in str(err) or "No space left" in str(err):
                raise TrackingError(f"tracking store {db}: no space left on its device; free some space or use "
                                    "another --tracking-uri") from err
            raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if not isinstance(v, (list, tuple)) else ",".join(map(str, v))
    return out


def system_tags(cfg) -> dict[str, str]:
    """What every run of dard says of itself (its teacher and shards: :mod:`dard.lineage`, when its
    model is logged)."""

    from mlflow.tracking.context.registry import resolve_tags

    # MLflow's standard tags (mlflow.user, mlflow.source.name/type, mlflow.source.git.commit): a
    # client-made run gets none of them by itself
    tags = {**resolve_tags(), "dard.version": __version__, "dard.dataset": cfg.data.dataset,
            "dard.method": cfg.loss.method, "dard.arch": cfg.model.arch}
    commit = git_commit()
    if commit:
        tags["dard.git_commit"] = commit
    return tags


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def experiment_for(client, uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing. On a sqlite store its artifacts go beside
    the database (``<its folder>/mlruns``); MLflow's default would be the working directory's."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (Path(uri[len("sqlite:///"):]).parent / "mlruns").as_uri() if uri.startswith("sqlite:///") else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process (a sweep's trials start together)
        return client.get_experiment_by_name(name).experiment_id


class EpochLogger:
    """One MLflow run (optionally nested under ``parent_run_id``): params at start, metrics each epoch.

    ``tracking``: ``{"uri", "experiment", "run_name", "parent_run_id", "tags"}`` (all but uri optional).
    """

    def __init__(self, tracking: dict[str, Any], cfg):
        import mlflow

        self.mlflow = mlflow
        self.client, uri = client(tracking["uri"])
        self.uri = uri
        tags = {**system_tags(cfg), **(tracking.get("tags") or {})}
        if tracking.get("parent_run_id"):
            tags["mlflow.parentRunId"] = tracking["parent_run_id"]
        if tracking.get("run_id"):
            self.run_id = tracking["run_id"]  # resume logging into an existing run
        else:
            experiment_id = experiment_for(self.client, uri, tracking.get("experiment") or DEFAULT_EXPERIMENT)
            run = self.client.create_run(experiment_id, run_name=tracking.get("run_name"), tags=tags)
            self.run_id = run.info.run_id

            params = flatten(to_dict(cfg))
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in items[i:i + 100]])
            # the exact config, for `dard registry promote --run-id` (params are flattened strings:
            # None, tuples and empty values do not come back from them)
            self.client.log_dict(self.run_id, to_dict(cfg), CONFIG_ARTIFACT)

    def logged_epochs(self) -> set[int]:
        """The epochs (steps) this run already holds: a resumed run logs each epoch once."""
        return {m.step for m in self.client.get_metric_history(self.run_id, "train_loss")}

    def backfill(self, history: list[dict]) -> list[int]:
        """Log the epochs of ``history`` (the epochs a checkpoint committed) that the run lacks:
        after a signal, a restart or a stopped trial every committed epoch is in MLflow once.
        Returns the epochs logged."""
        have = self.logged_epochs()
        missing = [h for h in history if int(h["epoch"]) not in have]
        for metrics in missing:
            self.log(metrics, int(metrics["epoch"]))
        return [int(h["epoch"]) for h in missing]

    def log(self, metrics: dict[str, Any], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        values = [self.mlflow.entities.Metric(k, v, now, step) for k, v in numeric(metrics).items()]
        if values:
            self.client.log_batch(self.run_id, metrics=values)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


MODEL_ARTIFACT = "dard-model.pt"
MODEL_SHA256_TAG = "dard.model_sha256"  # the logged weights file's digest; registration copies it, loading checks it


def resumable_run(tracking_uri: str, marker: str | Path) -> str | None:
    """The MLflow run id recorded in ``marker`` (a path or a storage URI such as ``s3://...``: a
    previous attempt at the same training), re-opened as RUNNING; None when there is none or the
    run is gone from the store."""
    from mlflow.exceptions import MlflowException

    if not exists(marker):
        return None
    try:
        run_id = json.loads(read_bytes(marker))["run_id"]
        store, _ = client(tracking_uri)
        if store.get_run(run_id).info.status != "RUNNING":
            store.update_run(run_id, status="RUNNING")
        return run_id
    except (MlflowException, KeyError, ValueError, OSError):
        return None


def record_run(marker: str | Path, run_id: str, tracking_uri: str) -> None:
    """Write ``marker`` (a path or a storage URI) naming the MLflow run of a training, for a rerun."""

    atomic_write(marker, lambda f: f.write(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}).encode()))


def logged_model_name(dataset: str, arch: str, method: str) -> str:
    """The logged model's name in a run, e.g. ``digits-cnn_small-dard``."""
    return f"{dataset}-{arch}-{method}"


def log_model(run_id: str, model_path: str | Path, example_input=None, tracking_uri: str | None = None):
    """Log the dard model file ``model_path`` into ``run_id`` the way every training path does.

    MLflow's PyTorch flavour, ``serialization_format="pt2"``: a ``torch.export`` program that
    MLflow loads and serves with only torch installed (no dard), with a signature, an input
    example (``example_input`` (N >= 2, C, H, W) in [0, 1]; default: two images of the input shape
    the file records, seeded noise in [0, 1]: the format, not data), the model's class names and
    input contract as MLflow model metadata (``dard.classes``, ``dard.input``: shape, [0, 1] range,
    channels, the eps it was trained for), at ``step=`` the epoch whose weights the file holds
    (MLflow shows that step's metrics on the model page). Under
    ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` MLflow refuses any record of the archive that is
    not plain data; dard itself loads only the weights-only dard file logged beside it
    (``extra_files/dard-model.pt``, sha256 in the run's ``dard.model_sha256`` tag). Sets the run's
    description to the model's card (:func:`dard.card.model_card`) and its tags and dataset inputs
    to its lineage (:mod:`dard.lineage`). Returns MLflow's ModelInfo."""
    import tempfile

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    store, _ = client(tracking_uri)
    mf = from_file(str(model_path))
    step = mf.meta.get("selected_epoch")
    if example_input is None:
        example_input = torch.rand(2, *mf.input["shape"], generator=torch.Generator().manual_seed(0))
    # two images: torch.export makes a size-1 batch dimension static
    x = np.ascontiguousarray(example_input[:2].cpu().numpy(), dtype=np.float32)
    with torch.no_grad():
        y = mf.model(torch.from_numpy(x)).numpy()
    name = logged_model_name(mf.dataset, mf.arch, mf.method or "model")
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        copy = Path(tmp) / MODEL_ARTIFACT
        copy.write_bytes(read_bytes(model_path))  # a path or a storage URI
        # Stated, not inferred: inference imports the model in a subprocess (seconds a model).
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
        info = mlflow.pytorch.log_model(mf.model, name=name, serialization_format="pt2", input_example=x,
                                        signature=infer_signature(x, y), pip_requirements=requirements,
                                        extra_files=[str(copy)], metadata={"dard.classes": mf.classes,
                                                                           "dard.input": mf.input},
                                        **({"step": int(step)} if step is not None else {}))
    store.set_tag(run_id, MODEL_SHA256_TAG, mf.sha256)
    store.set_tag(run_id, LOGGED_MODEL_TAG, info.model_id)
    if step is not None:
        store.set_tag(run_id, SELECTED_EPOCH_TAG, str(int(step)))
    for key, value in lineage.tags(mf.meta).items():  # what it was made from: teacher, shards, data
        store.set_tag(run_id, key, value)
    datasets = lineage.inputs(mf.meta)
    if datasets:
        store.log_inputs(run_id, datasets=datasets)
    if mf.config is not None:
        store.set_tag(run_id, "mlflow.note.content", model_card(mf))
    return info


class TrainingRun:
    """The MLflow run of one training, opened at its first use (the first epoch's metrics, or the
    run id a Ray worker needs): a training refused for bad input opens none and writes nothing."""

    def __init__(self, cfg, tracking_uri: str, experiment: str, run_name: str, marker: str | Path, resume: bool):
        self.cfg, self.uri, self.experiment, self.run_name = cfg, tracking_uri, experiment, run_name
        self.marker, self.resume = marker, resume
        self.logger: EpochLogger | None = None

    def open(self) -> EpochLogger:
        if self.logger is None:
            previous = resumable_run(self.uri, self.marker) if self.resume else None
            self.logger = EpochLogger({"uri": self.uri, "experiment": self.experiment, "run_name": self.run_name,
                                       "run_id": previous}, self.cfg)
            record_run(self.marker, self.logger.run_id, self.uri)
        return self.logger

    @property
    def run_id(self) -> str:
        return self.open().run_id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.open().log(metrics, step)

    def backfill(self, history: list[dict]) -> list[int]:
        """:meth:`EpochLogger.backfill` for a resumed run's committed checkpoint."""
        return self.open().backfill(history)

    def finish(self, model_path: str | Path) -> None:
        """Log the run's model (:func:`log_model`) and close it."""
        log_model(self.run_id, model_path, tracking_uri=self.uri)
        self.logger.close()


@contextlib.contextmanager
def training_run(cfg, tracking_uri: str | None, *, experiment: str, run_name: str, marker: str | Path,
                 resume: bool = True):
    """One MLflow run for one training, the same on every path: yields a :class:`TrainingRun`
    (None when ``tracking_uri`` is None: tracking off), which the caller ends with ``finish(model)``.
    ``marker`` (a path or storage URI) names the run, so a rerun of the same training after a crash
    or a signal continues it instead of opening a second one (``resume`` False: a new run, the
    marker rewritten). An error or a signal inside closes an opened run FAILED or KILLED."""
    run = TrainingRun(cfg, tracking_uri, experiment, run_name, marker, resume) if tracking_uri else None
    try:
        yield run
    except BaseException as err:
        if run is not None and run.logger is not None:
            run.logger.close("KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise


def log_report_artifacts(run_id: str, paths: dict[str, Path], tracking_uri: str | None = None,
                         metrics: dict[str, float] | None = None, prefix: str = "test_") -> None:
    """Robustness report files as artifacts, its accuracies as ``<prefix><attack>_acc`` metrics."""
    store, _ = client(tracking_uri)
    for p in paths.values():
        store.log_artifact(run_id, str(p), artifact_path="robustness")
    for k, v in (metrics or {}).items():
        store.log_metric(run_id, f"{prefix}{k}_acc", float(v))
