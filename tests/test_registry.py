"""`dard registry promote|show`: the champion alias moves only for a better run; a run is one version."""

import re

import torch

from dard.cli import main
from dard.config import Config
from dard.models import build, save_model
from dard.registry import METRIC, show
from tests.conftest import HANG_S


def logged_run(tmp_path, uri, metric: float, lr: float, later: float | None = None, **sections) -> str:
    """An MLflow run as a training leaves it: its config as params, its METRIC per epoch, its model
    (of epoch 0) logged; ``later``: a worse METRIC at epoch 1, which the model does not hold;
    ``sections``: more of the config (``attack={"eps": 0.1}``)."""
    from dard.data import load_splits
    from dard.lineage import data_record
    from dard.tracking import EpochLogger, log_model

    cfg = Config.for_dataset("digits", model={"arch": "cnn_small"}, optim={"lr": lr}, **sections)
    splits = load_splits(cfg.data)  # what it was validated on, as a training records it
    meta = {"config": cfg.to_dict(), "selected_epoch": 0,
            "data": data_record(cfg, splits.train, splits.val.head(cfg.run.eval_limit))}
    path = save_model(tmp_path / f"m-{lr}.pt", build("cnn_small", 10, 1), arch="cnn_small", num_classes=10,
                      in_channels=1, dataset="digits", meta=meta)
    logger = EpochLogger({"uri": uri, "experiment": "t"}, cfg)
    logger.log({METRIC: metric}, step=0)
    if later is not None:
        logger.log({METRIC: later}, step=1)
    log_model(logger.run_id, path, torch.rand(2, 1, 8, 8), tracking_uri=uri)
    return logger.run_id


def test_registry_promote_moves_the_champion_only_for_a_better_run(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first, worse, better = (logged_run(tmp_path, uri, m, lr, later) for m, lr, later in (
        (0.5, 0.1, 0.2), (0.3, 0.2, None), (0.7, 0.3, None)))  # first: its last epoch is worse than the one it ships
    capsys.readouterr()

    def promote(run_id: str) -> str:
        assert main(["registry", "promote", "--run-id", run_id, "--tracking-uri", uri]) == 0
        return capsys.readouterr().out

    name = "dard-digits-cnn_small"
    assert f"registered {name} v1 ({METRIC} 50.0%): the new champion" in promote(first)
    assert "did not beat champion v1 (50.0%); alias unchanged" in promote(worse)
    assert "already registered; nothing changed" in promote(first)  # one run is one version
    versions = show(uri, name)
    assert [(str(v["version"]), v["aliases"]) for v in versions] == [("2", []), ("1", ["champion"])]
    assert versions[0]["champion_at_registration"].startswith("v1") and versions[0]["promoted"] == "false"
    assert "the new champion (was v1, 50.0%)" in promote(better)
    assert [(str(v["version"]), v["aliases"]) for v in show(uri, name)][0] == ("3", ["champion"])

    # the version carries the run's config (in its weights file), so it evaluates as trained; the
    # config is no tag (1-2 KB broke MLflow's pages) but the run's config.json
    from mlflow.tracking import MlflowClient

    from dard.registry import load_registered, run_config

    version = MlflowClient(tracking_uri=uri).get_model_version(name, "3")
    assert version.tags[METRIC] == "0.700000" and "dard.config" not in version.tags
    header = load_registered(f"models:/{name}/3", uri)[1]
    assert header["meta"]["config"]["optim"]["lr"] == 0.3
    # the file's header comes back whole (selected epoch, config, every field), plus where it was found
    from dard.models import load_model

    file_header = load_model(tmp_path / "m-0.3.pt")[1]
    assert {k: v for k, v in header.items() if k not in ("run_id", "registry")} == file_header
    assert header["run_id"] == better and header["registry"] == f"{name} v3"
    assert run_config(uri, better).optim.lr == 0.3
    assert main(["registry", "show", name, "--tracking-uri", uri]) == 0
    shown = capsys.readouterr().out
    assert "v3" in shown and "aliases=champion" in shown and "v2" in shown and "v1" in shown

    # a run another tool logged (no dard config on it): one line naming what is missing, nothing registered
    foreign = MlflowClient(tracking_uri=uri).create_run("0").info.run_id
    assert main(["registry", "promote", "--run-id", foreign, "--metric", "0.9", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no config.json artifact" in err, err
    assert len(show(uri, name)) == 3


def test_a_champion_is_beaten_only_by_a_run_validated_alike(tmp_path, capsys):
    """A run validated at a smaller eps, or on other images, scores higher without being more
    robust: it is registered, the alias stays and the line says why; a run validated alike moves it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "dard-digits-cnn_small"
    champion, easier, elsewhere, alike = (logged_run(tmp_path, uri, m, lr, **sections) for m, lr, sections in (
        (0.4, 0.1, {}), (0.9, 0.2, {"attack": {"eps": 0.1}}), (0.8, 0.3, {"data": {"split_seed": 1}}),
        (0.5, 0.4, {"data": {"limit_train": 100}})))  # the training set does not change the validation split
    capsys.readouterr()

    def promote(run_id: str) -> str:
        assert main(["registry", "promote", "--run-id", run_id, "--tracking-uri", uri]) == 0
        return capsys.readouterr().out

    assert "the new champion" in promote(champion)
    said = promote(easier)
    assert re.search(r"v2 \(val_robust_acc 90\.0%\): not comparable with champion v1 \(40\.0%\), validated on "
                     r"(\d+ samples \w+) of digits, PGD-10 and CW-10 at eps 0\.2 \(step 0\.05\), this one on \1 of digits, "
                     r"PGD-10 and CW-10 at eps 0\.1 \(step 0\.05\); alias unchanged", said), said
    assert "not comparable with champion v1" in promote(elsewhere)
    assert [v["aliases"] for v in show(uri, name)][-1] == ["champion"]
    assert "the new champion (was v1, 40.0%)" in promote(alike)
    assert show(uri, name)[0]["aliases"] == ["champion"]


def _one_run(uri: str, index: int, results) -> None:
    """A training's first contact with the store (a forked process: MLflow is already imported)."""
    try:
        from dard.tracking import EpochLogger

        logger = EpochLogger({"uri": uri, "experiment": "together", "run_name": f"run-{index}"},
                             Config.for_dataset("digits"))
        logger.log({METRIC: 0.5}, step=0)
        logger.close()
        results.put((index, "ok"))
    except BaseException as err:  # noqa: BLE001 -- reported to the test
        results.put((index, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))


def test_four_runs_starting_together_on_a_new_sqlite_store_all_succeed(tmp_path):
    """MLflow creates and migrates a new sqlite store on first use, unlocked: without dard's lock
    three of four simultaneous first users die in a migration."""
    import multiprocessing as mp

    import mlflow  # noqa: F401 -- imported before the fork, so the four start at once

    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    (tmp_path / "new").mkdir()
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_one_run, args=(uri, i, results)) for i in range(4)]
    for p in procs:
        p.start()
    outcome = dict(results.get(timeout=HANG_S) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert outcome == {i: "ok" for i in range(4)}, outcome
    from dard.tracking import client

    store, _ = client(uri)
    experiment = store.get_experiment_by_name("together")
    assert len(store.search_runs([experiment.experiment_id])) == 4


def test_a_store_that_cannot_be_created_for_want_of_space_is_named_and_not_left_half_made(tmp_path, monkeypatch):
    """sqlite says "database or disk is full" mid-migration (as on a full tmpfs): one error naming
    the store, and no half-migrated database left for the next run to trip on."""
    import pytest
    from mlflow.tracking import MlflowClient

    from dard.tracking import TrackingError, client

    db = tmp_path / "full.db"

    def disk_full(self, *args, **kwargs):
        db.write_bytes(b"SQLite format 3\x00 half a schema")
        raise RuntimeError("(sqlite3.OperationalError) database or disk is full")

    monkeypatch.setattr(MlflowClient, "search_experiments", disk_full)
    with pytest.raises(TrackingError, match=f"tracking store {db}: no space left on its device"):
        client(f"sqlite:///{db}")
    assert not db.exists()


def test_a_run_marker_on_a_storage_uri_stays_a_uri(tmp_path, monkeypatch):
    """`dard train`'s rerun marker under a ``scheme://`` storage path is written there, not into a
    local folder named ``file:`` (pathlib would make ``s3://b/x`` a local ``s3:/b/x``)."""
    from dard.files import within
    from dard.tracking import EpochLogger, record_run, resumable_run

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    storage = (tmp_path / "bucket").as_uri()  # file:///...: the same code path as s3:// or gs://
    marker = within(storage, "run-1", "mlflow_run.json")
    assert marker == f"{storage}/run-1/mlflow_run.json"
    assert resumable_run(uri, marker) is None  # nothing there yet
    logger = EpochLogger({"uri": uri, "experiment": "t"}, Config.for_dataset("digits"))
    logger.close("KILLED")
    record_run(marker, logger.run_id, uri)
    assert (tmp_path / "bucket" / "run-1" / "mlflow_run.json").is_file()
    assert not any(p.name.endswith(":") for p in tmp_path.rglob("*"))
    assert resumable_run(uri, marker) == logger.run_id  # and re-opened for the rerun


def test_a_logged_model_carries_the_metrics_of_the_epoch_it_holds(tmp_path):
    """MLflow links a run's metrics at the logged model's step to the model (its page shows them):
    the step is the epoch whose weights the file holds (here epoch 1 of 0-2), not epoch 0."""
    import mlflow

    from dard.tracking import EpochLogger, log_model

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = Config.for_dataset("digits")
    path = save_model(tmp_path / "m.pt", build("cnn_small", 10, 1), arch="cnn_small", num_classes=10, in_channels=1,
                      dataset="digits", meta={"config": cfg.to_dict(), "selected_epoch": 1})
    logger = EpochLogger({"uri": uri, "experiment": "t"}, cfg)
    for epoch, value in enumerate([0.1, 0.5, 0.3]):
        logger.log({METRIC: value}, epoch)
    info = log_model(logger.run_id, path, torch.rand(2, 1, 8, 8), tracking_uri=uri)
    metrics = {m.key: (m.value, m.step) for m in mlflow.get_logged_model(info.model_id).metrics}
    assert metrics[METRIC] == (0.5, 1)


def test_a_champion_only_from_a_robust_accuracy(tmp_path, capsys):
    """NaN, infinite, negative or above-1 metrics register a version without the alias, and say so;
    the champion stays."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "dard-digits-cnn_small"
    runs = [logged_run(tmp_path, uri, 0.4, lr) for lr in (0.1, 0.2, 0.3, 0.4, 0.5)]
    assert main(["registry", "promote", "--run-id", runs[0], "--tracking-uri", uri]) == 0
    for run, bad in zip(runs[1:], ("nan", "inf", "-0.5", "1.5")):
        capsys.readouterr()
        assert main(["registry", "promote", "--run-id", run, "--metric", bad, "--tracking-uri", uri]) == 0
        said = capsys.readouterr().out
        assert "not a robust accuracy" in said and "stays on v1" in said
        assert [v["aliases"] for v in show(uri, name)][-1] == ["champion"]
    assert [v["promoted"] for v in show(uri, name)] == ["false"] * 4 + ["true"]
