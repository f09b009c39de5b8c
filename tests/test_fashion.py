"""Your own images through every command: a folder of real Fashion-MNIST PNGs (Debian's
dataset-fashion-mnist, which .ci/run installs, written as ``train/`` and ``test/`` folders with a
sub-folder per class): a teacher, shards from Ray tasks, 2-worker DDP on Ray Train, a registered
student, the attack suite and an ONNX export that names the classes. (A sweep on a folder of
images and the version it registers: tests/test_sweep.py.)"""
import json
import re
from pathlib import Path

import pytest

from dard.cli import main
from dard.config import FASHION_CLASSES, Config
from tests.conftest import write_png_folder

pytestmark = pytest.mark.ray
NAMES = [c.replace("/", "-") for c in FASHION_CLASSES]  # a folder name cannot hold "/"


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory):
    """600 training and 200 test images of the real files as PNGs, a sub-folder per class name."""
    from dard.data.presets import _fashion_mnist

    train, test = _fashion_mnist(Config.for_dataset("fashion-mnist").data)
    root = tmp_path_factory.mktemp("fmnist") / "fashion-png"
    write_png_folder(root / "train", train.images[:600], train.labels[:600], names=NAMES)
    write_png_folder(root / "test", test.images[:200], test.labels[:200], names=NAMES)
    return root


def test_a_folder_of_your_images_through_every_command(fashion_folder, ray_session, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from dard.export import read_metadata

    teacher, shards, student = tmp_path / "teacher.pt", tmp_path / "shards", tmp_path / "student.pt"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    slice_ = ["--source", f"folder:{fashion_folder}", "--limit-train", "256", "--steps", "2", "--no-progress",
              "--set", "run.eval_limit=64"]
    assert main(["config", "--source", f"folder:{fashion_folder}"]) == 0
    printed = capsys.readouterr().out
    assert "dataset: fashion-png" in printed and "source: folder:" + str(fashion_folder / "train") in printed
    assert "eps: 0.1" in printed and "crop_padding: 4" in printed  # the rule for 28x28 grey images
    assert main(["train-teacher", *slice_, "--arch", "cnn_small", "--method", "sat", "--epochs", "1",
                 "--out", str(teacher), "--tracking-uri", uri]) == 0
    assert main(["precompute", *slice_, "--teacher", str(teacher), "--out", str(shards), "--views", "1",
                 "--rows-per-part", "100"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["dataset"] == "fashion-png" and manifest["image_shape"] == [1, 28, 28]
    assert manifest["classes"] == sorted(NAMES) and manifest["samples"] == {"labeled": 256, "pool": 0}
    assert manifest["rows"] == 256 and len(manifest["parts"]) == 3 and manifest["attack"]["eps"] == pytest.approx(0.1)

    assert main(["train", *slice_, "--shards", str(shards), "--workers", "2", "--epochs", "1", "--out", str(student),
                 "--tracking-uri", uri, "--run-dir", str(tmp_path / "ray")]) == 0
    out = capsys.readouterr().out
    assert "on fashion-png" in out and student.exists()
    train_run = out.split("MLflow run ")[-1].split()[0]  # a `dard train` run promotes like any other
    assert main(["registry", "promote", "--run-id", train_run, "--tracking-uri", uri]) == 0
    assert "registered dard-fashion-png-cnn_small v1" in capsys.readouterr().out


    champion = "models:/dard-fashion-png-cnn_small@champion"
    assert main(["evaluate", "--model", champion, "--tracking-uri", uri, "--attacks", "natural,pgd20", "--limit",
                 "100", "--no-checks", "--no-progress", "--out-dir", str(tmp_path / "eval")]) == 0
    report = json.loads(next(Path(tmp_path / "eval").glob("*.json")).read_text())
    assert report["samples"]["natural"] == 100 and 0 <= report["accuracy"]["pgd20"] <= report["accuracy"]["natural"]
    assert report["meta"]["dataset"] == "fashion-png" and report["meta"]["classes"] == sorted(NAMES)
    # ... and its numbers reach the registered version: tags, metrics of an evaluation run, its card
    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version_by_alias("dard-fashion-png-cnn_small", "champion")
    assert version.tags["dard.test.natural"].endswith("(100 samples)") and "dard.evaluation_run" in version.tags
    evaluation = client.get_run(version.tags["dard.evaluation_run"])
    assert {"test_natural_acc", "test_pgd20_acc"} <= set(evaluation.data.metrics)
    assert "| PGD-20 |" in version.description and "Intended use" in version.description
    assert "Limitations" in client.get_registered_model("dard-fashion-png-cnn_small").description
    # lineage: the student's run names its teacher and shards (tags, dataset inputs), and walks back
    run = client.get_run(version.run_id)
    teacher_sha = __import__("dard.models", fromlist=["file_sha256"]).file_sha256(teacher)
    assert run.data.tags["dard.teacher.sha256"] == teacher_sha and run.data.tags["dard.shards.digest"]
    # what its validation accuracy was measured on (the images it scored), which the champion rule compares
    scored = int(run.data.metrics["val_samples"])
    assert re.fullmatch(rf"{scored} samples [0-9a-f]{{16}}", run.data.tags["dard.data.validation"])
    assert version.tags["dard.validation"].startswith(run.data.tags["dard.data.validation"] + " of fashion-png, PGD-")
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests["fashion-png-shards"] == run.data.tags["dard.shards.digest"] and "fashion-png-train" in digests
    capsys.readouterr()
    assert main(["lineage", champion, "--tracking-uri", uri]) == 0
    walked = capsys.readouterr().out
    assert f"teacher: cnn_small sha256 {teacher_sha}" in walked and "shards: " in walked
    # each run with the accuracy of the epoch its model holds (what promotion compares), in the console's format
    held = r"holds epoch 1: validation robust accuracy \d+\.\d%"
    assert re.search(rf"\n  run {version.run_id} \(.*\), {held}\n", walked), walked
    assert re.search(rf"\n    its run \w+ \(train-teacher sat cnn_small\), {held}$", walked.strip()), walked
    assert main(["export", "--model", champion, "--tracking-uri", uri, "--format", "onnx", "--limit", "50",
                 "--aa-limit", "5", "--out", str(tmp_path / "student.onnx")]) == 0
    assert json.loads(read_metadata(tmp_path / "student.onnx", "onnx")["dard.classes"]) == sorted(NAMES)
