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


def test_a_folder_of_images_on_an_object_store_whatever_its_file_names(bucket):
    """File names that a URI would misread (a space, '#', '%', '?') are read as the files they
    are; one S3 client serves a bucket (a folder of N images would otherwise build N of them), and
    its paths are pyarrow's own."""
    import boto3
    import pyarrow.fs as pafs
    import torch

    from dard.data.sources import list_source
    from dard.files import resolve
    from tests.conftest import write_png_folder

    names = ["cat 1", "cat#2", "dog%203", "dog?4"]
    images = torch.arange(4 * 64, dtype=torch.uint8).reshape(4, 1, 8, 8)
    files = write_png_folder(None, images, torch.tensor([0, 0, 1, 1]), names=["cat", "dog"])
    s3 = boto3.client("s3")
    for (rel, data), name in zip(files.items(), names):
        s3.put_object(Bucket="dard", Key=f"odd names/{rel.split('/')[0]}/{name}.png", Body=data)
    listing = list_source(f"folder:{bucket}/odd%20names")
    assert sorted(k.split("/")[1] for k in listing.keys) == sorted(f"{n}.png" for n in names)
    by_name = dict(zip(names, files.values()))
    read = listing.read_bytes(range(len(listing)))
    assert read == [by_name[k.split("/")[1][:-4]] for k in listing.keys]  # each file's own bytes
    for uri in ("s3://dard", "s3://dard/", "s3://dard/a/b/", "s3://dard/a%20b/c", "s3://dard/x?region=us-east-1",
                "s3://key:secret@dard/a"):
        assert resolve(uri)[1] == pafs.FileSystem.from_uri(uri)[1], uri
    assert resolve("s3://dard/a")[0] is resolve("s3://dard/b/c")[0]
