"""Storage URIs stay URIs: shards, model files, checkpoints, run markers and a sweep's sealed state on
``s3://`` -- a fake S3 (moto's server on loopback, ``tests/conftest.py``), reached through pyarrow
as a real bucket would be -- and never a local folder named ``s3:`` (pathlib turns ``s3://b/x`` into ``s3:/b/x``)."""
import json

import pytest

from dard.cli import main


def test_shards_and_a_student_on_an_object_store(bucket, trained_models, tmp_path, monkeypatch, capsys):
    import boto3

    from dard.files import listing

    monkeypatch.chdir(tmp_path)
    shards, student = f"{bucket}/shards", f"{bucket}/models/student.pt"
    quick = ["--limit-train", "150", "--steps", "2", "--no-progress"]
    assert main(["precompute", *quick, "--teacher", trained_models["natural"]["model_path"], "--out", shards,
                 "--local", "--rows-per-part", "64"]) == 0
    assert main(["shards", "inspect", shards]) == 0
    assert "150 labeled samples x 1 views" in capsys.readouterr().out
    assert main(["distill", *quick, "--method", "rslad", "--shards", shards, "--epochs", "1", "--out", student,
                 "--no-tracking"]) == 0
    assert main(["evaluate", "--model", student, "--attacks", "natural", "--limit", "40", "--no-checks",
                 "--no-progress", "--out-dir", str(tmp_path / "eval")]) == 0
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="dard")["Contents"]}
    assert "models/student.pt" in keys and "shards/manifest.json" in keys
    assert set(listing(shards)) == {k[len("shards/"):] for k in keys if k.startswith("shards/") and not k.endswith("/")}
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))


def test_markers_checkpoints_and_a_sealed_sweep_state_on_an_object_store(bucket, tmp_path, monkeypatch):
    import torch
    from mlflow.tracking import MlflowClient

    from dard.checkpoint import load_checkpoint, save_checkpoint
    from dard.config import Config
    from dard.files import write_bytes
    from dard.tracking import EpochLogger, record_run, resumable_run
    from tuning.sealed_state import check_sealed, seal

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    run = EpochLogger({"uri": uri, "experiment": "t"}, Config.for_dataset("digits"))
    marker = f"{bucket}/ray/job/mlflow_run.json"
    assert resumable_run(uri, marker) is None
    record_run(marker, run.run_id, uri)
    assert resumable_run(uri, marker) == run.run_id

    save_checkpoint(f"{bucket}/ray/job/checkpoint.pt", {"epoch": 3, "model": {"w": torch.ones(2)}, "optimizer": {}})
    assert load_checkpoint(f"{bucket}/ray/job/checkpoint.pt")["epoch"] == 3

    folder = f"{bucket}/sweeps/s"
    write_bytes(f"{folder}/tuner.pkl", b"state")
    write_bytes(f"{folder}/trial/result.json", json.dumps({"x": 1}).encode())
    client = MlflowClient(tracking_uri=uri)
    seal(folder, client, run.run_id)
    check_sealed(folder, client, run.run_id)  # as sealed: resumable
    write_bytes(f"{folder}/tuner.pkl", b"a pickle that runs code")
    with pytest.raises(ValueError, match=r"1 file\(s\) changed, added or removed .* \(first: tuner.pkl\)"):
        check_sealed(folder, client, run.run_id)
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))
