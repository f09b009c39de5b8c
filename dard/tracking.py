"""MLflow tracking: runs, params, per-epoch metrics, reports, logged models (docs/design.md §6).

Default tracking URI: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<absolute cwd>/mlflow.db`` -- always
absolute, because Ray workers run in another directory. Models are logged as a pyfunc *from
code* (``dard/mlflow_model.py``) around the dard model file: nothing is pickled. The model
registry (register, champion alias, loading by name) is ``dard.registry``.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "dard"
CONFIG_TAG = "dard.config"  # a run's (and a registered version's) whole config, JSON


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


def system_tags(cfg, teacher_sha256: str | None = None, shards_fingerprint: str | None = None) -> dict[str, str]:
    from dard import __version__

    from dard.config import to_dict

    # the whole config as one JSON tag: the exact run, for `dard registry promote --run-id` (params
    # are flattened strings: None, tuples and empty values do not come back from them)
    tags = {"dard.version": __version__, "dard.dataset": cfg.data.dataset, "dard.method": cfg.loss.method,
            "dard.arch": cfg.model.arch, CONFIG_TAG: json.dumps(to_dict(cfg))}
    commit = git_commit()
    if commit:
        tags["dard.git_commit"] = commit
    if teacher_sha256:
        tags["dard.teacher_sha256"] = teacher_sha256
    if shards_fingerprint:
        tags["dard.shards"] = shards_fingerprint
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
        tags = {**system_tags(cfg), **(tracking.get("tags") or {})}
        if tracking.get("parent_run_id"):
            tags["mlflow.parentRunId"] = tracking["parent_run_id"]
        if tracking.get("run_id"):
            self.run_id = tracking["run_id"]  # resume logging into an existing run
        else:
            experiment_id = experiment_for(self.client, uri, tracking.get("experiment") or DEFAULT_EXPERIMENT)
            run = self.client.create_run(experiment_id, run_name=tracking.get("run_name"), tags=tags)
            self.run_id = run.info.run_id
            from dard.config import to_dict

            params = flatten(to_dict(cfg))
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in items[i:i + 100]])

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

    from dard.files import exists, read_bytes

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
    from dard.files import atomic_write

    atomic_write(marker, lambda f: f.write(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}).encode()))


def log_model(run_id: str, model_path: str | Path, example_input, registered_name: str | None = None,
              tracking_uri: str | None = None):
    """Log the dard model file ``model_path`` into ``run_id`` as artifact ``model`` (pyfunc from
    code, signature from ``example_input`` (N, C, H, W) in [0, 1]); returns the ModelInfo."""
    import shutil
    import tempfile

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    import dard
    from dard.models import file_sha256, load_model

    if tracking_uri:
        client(tracking_uri)
    model, header = load_model(model_path)
    # the epoch whose weights the file holds: MLflow links the run's metrics at that step to the
    # logged model (without it, its page showed epoch 0's)
    step = (header.get("meta") or {}).get("selected_epoch")
    x = example_input[:2].cpu()
    with torch.no_grad():
        y = model(x).numpy()
    signature = infer_signature(x.numpy().astype(np.float32), y)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        copy = Path(tmp) / MODEL_ARTIFACT
        shutil.copyfile(model_path, copy)
        # Stated, not inferred: inference runs a subprocess that imports the model (~7 s a model).
        requirements = [f"mlflow=={mlflow.__version__}", f"dard=={dard.__version__}",
                        f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
        info = mlflow.pyfunc.log_model(name="model", python_model=str(Path(__file__).with_name("mlflow_model.py")),
                                       artifacts={"dard_model": str(copy)}, signature=signature,
                                       registered_model_name=registered_name, pip_requirements=requirements,
                                       **({"step": int(step)} if step is not None else {}))
        client(tracking_uri)[0].set_tag(run_id, MODEL_SHA256_TAG, file_sha256(copy))
        return info


def log_report_artifacts(run_id: str, paths: dict[str, Path], tracking_uri: str | None = None,
                         metrics: dict[str, float] | None = None, prefix: str = "test_") -> None:
    """Robustness report files as artifacts, its accuracies as ``<prefix><attack>_acc`` metrics."""
    store, _ = client(tracking_uri)
    for p in paths.values():
        store.log_artifact(run_id, str(p), artifact_path="robustness")
    for k, v in (metrics or {}).items():
        store.log_metric(run_id, f"{prefix}{k}_acc", float(v))
