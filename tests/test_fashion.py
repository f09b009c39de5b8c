"""Fashion-MNIST through the same commands as digits, on a slice of the real files (Debian's
dataset-fashion-mnist, which .ci/run installs): a teacher, shards from Ray tasks, 2-worker DDP
on Ray Train, a sweep that registers its best student, and the attack suite."""
import json
from pathlib import Path

import pytest

from dard.cli import main

pytestmark = pytest.mark.ray
SLICE = ["--dataset", "fashion-mnist", "--limit-train", "256", "--steps", "2", "--no-progress",
         "--set", "run.eval_limit=64"]


def test_fashion_mnist_teacher_shards_ddp_sweep_evaluate(ray_session, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    teacher, shards, student = tmp_path / "teacher.pt", tmp_path / "shards", tmp_path / "student.pt"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train-teacher", *SLICE, "--arch", "cnn_small", "--method", "sat", "--epochs", "1",
                 "--out", str(teacher)]) == 0
    assert main(["precompute", *SLICE, "--teacher", str(teacher), "--out", str(shards), "--views", "1",
                 "--rows-per-part", "128"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["dataset"] == "fashion-mnist" and manifest["image_shape"] == [1, 28, 28]
    assert manifest["rows"] == 256 and len(manifest["parts"]) == 2 and manifest["attack"]["eps"] == pytest.approx(0.1)

    assert main(["train", *SLICE, "--shards", str(shards), "--workers", "2", "--epochs", "1", "--out", str(student),
                 "--tracking-uri", uri, "--run-dir", str(tmp_path / "ray")]) == 0
    out = capsys.readouterr().out
    assert "on fashion-mnist" in out and student.exists()
    train_run = out.split("MLflow run ")[-1].split()[0]  # a `dard train` run promotes like any other
    assert main(["registry", "promote", "--run-id", train_run, "--tracking-uri", uri]) == 0
    assert "registered dard-fashion-mnist-cnn_small v1" in capsys.readouterr().out

    assert main(["sweep", *SLICE, "--shards", str(shards), "--trials", "1", "--epochs", "1", "--name", "fmnist",
                 "--tracking-uri", uri, "--run-dir", str(tmp_path / "sweep")]) == 0
    versions = MlflowClient(tracking_uri=uri).search_model_versions("name = 'dard-fashion-mnist-cnn_small'")
    assert len(versions) == 2  # the `dard train` run's and the sweep's best

    assert main(["evaluate", "--model", str(student), "--attacks", "natural,pgd20", "--limit", "100", "--no-checks",
                 "--no-progress", "--out-dir", str(tmp_path / "eval")]) == 0
    report = json.loads(next(Path(tmp_path / "eval").glob("*.json")).read_text())
    assert report["samples"]["natural"] == 100 and 0 <= report["accuracy"]["pgd20"] <= report["accuracy"]["natural"]
    assert report["meta"]["dataset"] == "fashion-mnist"
