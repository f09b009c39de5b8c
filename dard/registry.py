"""The MLflow model registry: register a student, move the champion alias only when it is
better, list versions, load a model by path or by name (docs/design.md §6).

Model name ``dard-<dataset>-<arch>``. Each version carries tags with its validation robust
accuracy (``METRIC``: PGD and CW both fail, ``dard.engine.validation_metrics``), dataset, arch and
the sha256 of its weights, and the run's headline as its description; the run config travels in
the weights file. The alias moves only if the new version's metric beats the current champion's
(both recorded on the new version). dard loads only the version's dard weights file, weights-only
and checked against the recorded sha256, so a tampered registry entry cannot run code here.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from dard.card import model_card
from dard.config import Config, from_dict
from dard.lineage import TEACHER_RUN_TAG, VALIDATION_DATA_TAG
from dard.logs import percent
from dard.modelfile import ModelFile, from_file
from dard.models import file_sha256, load_model
from dard.tracking import (CONFIG_ARTIFACT, CONFIG_TAG, LOGGED_MODEL_TAG, MODEL_ARTIFACT, MODEL_SHA256_TAG,
                           SELECTED_EPOCH_TAG, TrackingError, check_tracking_uri, client as tracking_client,
                           experiment_for, log_report_artifacts)

ALIAS = "champion"
METRIC = "val_robust_acc"
VALIDATION_TAG = "dard.validation"  # what METRIC was measured on (:func:`validation`): only equal ones compare


def load_reference(ref: str, tracking_uri: str | None = None):
    """A model by reference, as a :class:`dard.modelfile.ModelFile`: a dard model file (a path or a
    storage URI), or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` in the registry at
    ``tracking_uri`` (read weights-only, checked against its registration)."""

    if not ref.startswith("models:/"):
        return from_file(ref)
    model, header = load_registered(ref, tracking_uri)
    return ModelFile(model, header, ref)


def load_registered(model_uri: str, tracking_uri: str | None = None):
    """``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) -> (model in eval mode, header).

    Everything comes from the version's dard model file (read weights-only, its sha256 and
    architecture checked against the registration): the header is that file's, whole, with
    ``run_id`` and ``registry`` (``NAME vN``) added. (:func:`load_reference` wraps it.)
    """
    import mlflow
    spec = model_uri[len("models:/"):]
    if "@" not in spec and "/" not in spec:
        raise TrackingError(f"{model_uri}: name an alias or a version, e.g. models:/{spec}@champion or models:/{spec}/1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client, uri = tracking_client(check_tracking_uri(tracking_uri, existing=True))  # unreachable: fails at once
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = spec.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except mlflow.exceptions.MlflowException as err:
        raise TrackingError(f"{model_uri}: not found in the registry at {uri} ({err.message.splitlines()[0]}); "
                            "see `dard registry show NAME`") from err
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=tmp)
        except mlflow.exceptions.MlflowException as err:
            raise TrackingError(f"{model_uri}: its files cannot be read ({err.message.splitlines()[0]})") from err
        # extra_files/: MLflow's PyTorch flavour (dard >= 0.2); artifacts/: the pyfunc of earlier versions
        weights = next((p for p in (Path(folder) / "extra_files" / MODEL_ARTIFACT, Path(folder) / "artifacts" / MODEL_ARTIFACT)
                        if p.is_file()), None)
        if weights is None:
            raise TrackingError(f"{model_uri}: holds no {MODEL_ARTIFACT} (registered by another tool or an older "
                                "dard?); dard loads registry models only from that weights-only file")
        # the file must be the one registered: its digest (and then its architecture) as recorded
        expected, actual = version.tags.get(MODEL_SHA256_TAG), file_sha256(weights)
        if not expected:
            raise TrackingError(f"{model_uri}: registered without the sha256 of its weights (an older dard?); "
                                "promote its run again with `dard registry promote`")
        if actual != expected:
            raise TrackingError(f"{model_uri}: {MODEL_ARTIFACT} has sha256 {actual[:12]}..., the registration recorded "
                                f"{expected[:12]}...: the file was replaced after registration; not loading it")
        model, file_header = load_model(weights)  # weights_only: nothing in the registry is unpickled
        if version.tags.get("dard.arch") not in (None, file_header["arch"]):
            raise TrackingError(f"{model_uri}: its weights are a {file_header['arch']}, the registration says "
                                f"{version.tags['dard.arch']}; not loading it")
    meta = dict(file_header.get("meta") or {})
    if not meta.get("config") and CONFIG_TAG in version.tags:  # registered by a dard before 0.2
        meta["config"] = json.loads(version.tags[CONFIG_TAG])
    return model, {**file_header, "meta": meta, "run_id": version.run_id, "registry": f"{name} v{version.version}"}


@dataclass
class Promotion:
    name: str
    version: str
    metric: float
    previous_champion: str | None
    previous_metric: float | None
    moved: bool
    already_registered: bool = False
    unusable: bool = False  # the metric was not a finite number in [0, 1]
    validated_apart: tuple[str, str] | None = None  # (the champion's validation, this one's) when they differ

    def summary(self) -> str:
        """One line: the version registered and what it did to the champion alias."""
        head = f"registered {self.name} v{self.version} ({METRIC} {percent(self.metric)})"
        if self.already_registered:
            return f"{head}: already registered; nothing changed"
        if self.unusable:
            return (f"{head}: not a robust accuracy (a finite number in [0, 1]): registered without the "
                    f"{ALIAS} alias, which stays" + (f" on v{self.previous_champion}" if self.previous_champion else ""))
        if self.moved:
            return f"{head}: the new champion" + (f" (was v{self.previous_champion}, {percent(self.previous_metric)})"
                                                  if self.previous_champion else "")
        if self.validated_apart:
            theirs, ours = self.validated_apart
            return (f"{head}: not comparable with champion v{self.previous_champion} ({percent(self.previous_metric)}), "
                    f"validated on {theirs}, this one on {ours}; alias unchanged (compare them on one test split with "
                    "`dard evaluate`)")
        return (f"{head}: did not beat champion v{self.previous_champion} ({percent(self.previous_metric)}); "
                "alias unchanged")


def model_name(cfg) -> str:
    return f"dard-{cfg.data.dataset}-{cfg.model.arch}"


def validation(cfg, run_tags: dict) -> str | None:
    """What a run's validation accuracy was measured on: its validation images (their count and
    digest, tagged on the run when its model was logged) and the attacks (eps, step, steps). Two
    runs' numbers compare only if this is the same; None for a run logged before dard recorded it."""
    images = run_tags.get(VALIDATION_DATA_TAG)
    if images is None:
        return None
    a, k = cfg.attack, cfg.run.eval_pgd_steps
    return f"{images} of {cfg.data.dataset}, PGD-{k} and CW-{k} at eps {a.eps:.4g} (step {a.step_size:.4g})"


def held_metric(client, run_id: str) -> float:
    """The run's ``val_robust_acc`` at the epoch its logged model holds (``dard.selected_epoch``,
    tagged by :func:`dard.tracking.log_model`): what promotion compares, not the last epoch's."""
    run = client.get_run(run_id)
    epoch = run.data.tags.get(SELECTED_EPOCH_TAG)
    if epoch is None:
        raise TrackingError(f"run {run_id}: no model logged by dard in it (no {SELECTED_EPOCH_TAG} tag); nothing to "
                            "compare")
    history = {m.step: m.value for m in client.get_metric_history(run_id, METRIC)}
    if int(epoch) not in history:
        raise TrackingError(f"run {run_id}: no {METRIC} at epoch {epoch}, the one its model holds; pass --metric")
    return history[int(epoch)]


def usable(metric) -> bool:
    """A robust accuracy: a finite number in [0, 1]. Anything else never moves the champion."""
    return isinstance(metric, (int, float)) and math.isfinite(metric) and 0 <= metric <= 1


def promote(tracking_uri: str, run_id: str, cfg, name: str | None = None, metric: float | None = None) -> Promotion:
    """Register the model logged in ``run_id`` (:func:`dard.tracking.log_model`) and move the alias
    if better. ``metric`` None: the run's at the epoch its model holds (:func:`held_metric`). A metric
    that is not a finite number in [0, 1] registers the version without the alias, and says so."""
    import mlflow
    client, _ = tracking_client(tracking_uri)
    name = name or model_name(cfg)
    try:
        earlier = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get("dard.run_id") == run_id]
    except mlflow.exceptions.MlflowException:
        earlier = []
    if earlier:  # one run is one version: promoting it again (a resumed sweep) changes nothing
        v = earlier[0]
        return Promotion(name, str(v.version), metric if metric is not None else float("nan"), None, None,
                         moved=False, already_registered=True)
    run_tags = client.get_run(run_id).data.tags
    digest, logged = run_tags.get(MODEL_SHA256_TAG), run_tags.get(LOGGED_MODEL_TAG)
    if not digest or not logged:
        raise TrackingError(f"run {run_id}: no model logged by dard in it (no {MODEL_SHA256_TAG} or {LOGGED_MODEL_TAG} "
                            "tag: a run of an older dard, or one that ended before its model was logged): nothing to register")
    metric = held_metric(client, run_id) if metric is None else metric
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints "Successfully registered model ..." there
        version = mlflow.register_model(f"models:/{logged}", name).version
    validated = validation(cfg, run_tags)
    tags = {METRIC: f"{metric:.6f}", "dard.dataset": cfg.data.dataset, "dard.arch": cfg.model.arch,
            "dard.method": cfg.loss.method, "dard.run_id": run_id, MODEL_SHA256_TAG: digest,
            **({VALIDATION_TAG: validated} if validated else {})}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    if run_tags.get("mlflow.note.content"):
        client.update_model_version(name, version, description=run_tags["mlflow.note.content"])
    previous, previous_metric, apart = None, None, None
    try:
        current = client.get_model_version_by_alias(name, ALIAS)
        previous, previous_metric = current.version, float(current.tags.get(METRIC, "nan"))
        theirs = current.tags.get(VALIDATION_TAG)  # None on either side (logged before dard recorded it): compared
        apart = (theirs, validated) if None not in (theirs, validated) and theirs != validated else None
    except mlflow.exceptions.MlflowException:
        pass  # no champion yet
    valid = usable(metric)
    moved = valid and (previous is None or not usable(previous_metric) or (apart is None and metric > previous_metric))
    client.set_model_version_tag(name, version, "champion_at_registration",
                                 "none" if previous is None else f"v{previous} ({METRIC} {percent(previous_metric)})")
    if moved:
        client.set_registered_model_alias(name, ALIAS, version)
        if run_tags.get("mlflow.note.content"):  # the champion's card is the registered model's
            client.update_registered_model(name, description=run_tags["mlflow.note.content"])
    client.set_model_version_tag(name, version, "promoted", str(moved).lower())
    return Promotion(name, str(version), metric, previous, previous_metric, moved, unusable=not valid,
                     validated_apart=apart if valid and usable(previous_metric) else None)


def record_evaluation(tracking_uri: str, model_file, report, paths: dict) -> str:
    """``dard evaluate`` of a registered model, recorded on that version: an evaluation run (in the
    ``dard-evaluations`` experiment) holding the report's files and its accuracies as
    ``test_<attack>_acc`` metrics linked to the version's logged model (its page shows them), the
    accuracies with their sample counts as version tags (``dard.test.<attack>``), and the version's
    card (and the registered model's, for the champion) rewritten with the test table. Returns the
    evaluation run's id."""
    import time

    from mlflow.entities import Metric

    name, number = model_file.header["registry"].rsplit(" v", 1)
    client, uri = tracking_client(tracking_uri)
    version = client.get_model_version(name, number)
    run = client.create_run(experiment_for(client, uri, "dard-evaluations"), run_name=f"evaluate {name} v{number}",
                            tags={"dard.evaluated": f"models:/{name}/{number}", "dard.model_run_id": str(version.run_id)})
    run_id = run.info.run_id
    log_report_artifacts(run_id, paths, uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"test_{a}_acc", float(v), now, 0, model_id=version.model_id)
                                      for a, v in report.accuracy.items()])
    for attack, value in report.accuracy.items():
        client.set_model_version_tag(name, number, f"dard.test.{attack}", f"{value:.4f} ({report.samples[attack]} samples)")
    client.set_model_version_tag(name, number, "dard.evaluation_run", run_id)
    card = model_card(model_file, report.to_dict())
    client.update_model_version(name, number, description=card)
    if ALIAS in (client.get_registered_model(name).aliases or {}) and \
            str(client.get_registered_model(name).aliases[ALIAS]) == str(number):
        client.update_registered_model(name, description=card)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def registered(tracking_uri: str) -> list[dict]:
    """Every registered model of the store: its name, versions and champion (version, metric)."""
    client, _ = tracking_client(check_tracking_uri(tracking_uri, existing=True))
    rows = []
    for model in sorted(client.search_registered_models(), key=lambda m: m.name):
        champion = (model.aliases or {}).get(ALIAS)
        metric = client.get_model_version(model.name, champion).tags.get(METRIC) if champion else None
        versions = client.search_model_versions(f"name = '{model.name}'")
        rows.append({"name": model.name, "versions": len(versions), "champion": champion, METRIC: metric})
    return rows


def show(tracking_uri: str, name: str) -> list[dict]:
    """Versions of ``name`` with their metrics and aliases, newest first."""
    import mlflow

    client, uri = tracking_client(check_tracking_uri(tracking_uri, existing=True))
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as err:
        known = [m.name for m in client.search_registered_models()]
        raise TrackingError(f"no registered model {name!r} in {uri}; registered: "
                            f"{', '.join(known) or 'none'}") from err
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda m: int(m.version), reverse=True):
        rows.append({"version": v.version, "aliases": aliases.get(str(v.version), []), METRIC: v.tags.get(METRIC),
                     "promoted": v.tags.get("promoted"), "champion_at_registration": v.tags.get("champion_at_registration"),
                     "run_id": v.run_id, "created": v.creation_timestamp})
    return rows


def run_config(tracking_uri: str, run_id: str) -> Config:
    """The config a run was trained with (its ``config.json`` artifact, validated); for promoting a run by id."""
    import mlflow

    client, _ = tracking_client(tracking_uri)
    tags = client.get_run(run_id).data.tags
    if CONFIG_TAG in tags:  # a run of dard before 0.2
        return from_dict(json.loads(tags[CONFIG_TAG]))
    try:
        return from_dict(mlflow.artifacts.load_dict(f"runs:/{run_id}/{CONFIG_ARTIFACT}"))
    except mlflow.exceptions.MlflowException as err:
        raise TrackingError(f"run {run_id} has no {CONFIG_ARTIFACT} artifact: it was not logged by dard's training "
                            "or sweep") from err


def teacher_run(client, sha256: str | None):
    """The MLflow run that logged the teacher's model file (found by its sha256), if any in this store."""
    if not sha256:
        return None
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{TEACHER_RUN_TAG}` = '{sha256}'", max_results=1) if experiments else []
    return runs[0] if runs else None


def walk(model_file, client) -> list[str]:
    """The lineage of a loaded model (a registry one: its run too), one line each, indented as it
    goes back: student, its run, its data, its shards, its teacher, the teacher's run. A run's
    accuracy is that of the epoch its model holds, as promotion compares it."""
    meta = model_file.meta
    lines = [f"{model_file.where}: {model_file.arch} ({model_file.method}) on {model_file.dataset}, sha256 "
             f"{model_file.sha256}" + (f" [{model_file.header['registry']}]" if model_file.header.get("registry") else "")]
    run_id = model_file.header.get("run_id")
    if run_id:
        run, epoch = client.get_run(run_id), meta.get("selected_epoch")
        held = (meta.get("final_metrics") or {}).get(METRIC)
        lines.append(f"  run {run_id} ({run.info.run_name}, {run.info.status})" + (
            f", holds epoch {epoch + 1}: validation robust accuracy {percent(held)}"
            if epoch is not None and held is not None else ""))
    data = meta.get("data") or {}
    if data:
        lines.append(f"  data: {data['name']} from {data['location']}, {data['samples']} samples, digest {data['digest']}")
    shards = meta.get("shards") or {}
    if shards:
        lines.append(f"  shards: {shards.get('directory')}, fingerprint {shards.get('fingerprint')}, digest "
                     f"{shards.get('digest', 'not recorded')}")
    teacher = meta.get("teacher") or {}
    if teacher:
        lines.append(f"  teacher: {teacher.get('arch')} sha256 {teacher.get('sha256')} ({teacher.get('path')})")
        found = teacher_run(client, teacher.get("sha256"))
        if found is None:
            lines.append("    its run: none in this tracking store (trained elsewhere, or without tracking)")
        else:
            try:
                said = (f", holds epoch {int(found.data.tags[SELECTED_EPOCH_TAG]) + 1}: validation robust accuracy "
                        f"{percent(held_metric(client, found.info.run_id))}")
            except (KeyError, TrackingError):  # a model file that names no epoch, or a run without validation
                said = ""
            lines.append(f"    its run {found.info.run_id} ({found.info.run_name}){said}")
    return lines
