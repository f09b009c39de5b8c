"""Shipping the student: every training command logs and registers its model the same way, and the
registered champion loads and serves where only MLflow and torch are installed (no dard)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from dard.cli import main
from tests.conftest import HANG_S

QUICK = ["--limit-train", "150", "--epochs", "2", "--steps", "2", "--no-progress"]


def trained_and_promoted(tmp_path, capsys, uri: str, argv: list[str]) -> str:
    """Run a training command; promote the MLflow run it names. Returns the run id."""
    assert main([*argv, *QUICK, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    run_id = out.split("MLflow run ")[1].split()[0]
    assert main(["registry", "promote", "--run-id", run_id, "--tracking-uri", uri]) == 0
    assert "registered dard-digits-cnn_small" in capsys.readouterr().out
    return run_id


def env_without_dard(tmp_path: Path) -> dict[str, str]:
    """A new venv that sees this one's packages (mlflow, torch, uvicorn, ...) but not dard: the
    packages' folder is on its path, and the editable install's hook (a .pth file there) is not run."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # `mlflow models serve --env-manager local` runs `uvicorn` from PATH: this venv's own, as pip would install it
    (venv / "bin" / "uvicorn").write_text(f"#!{venv}/bin/python\nimport sys\nfrom uvicorn.main import main\n"
                                          "sys.exit(main())\n")
    (venv / "bin" / "uvicorn").chmod(0o755)
    return {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(venv / "bin" / "python")}


def test_every_training_path_registers_and_the_champion_runs_without_dard(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from dard.config import Config
    from dard.data import load_splits, to_float
    from dard.registry import load_registered

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    teacher_run = trained_and_promoted(tmp_path, capsys, uri, ["train-teacher", "--arch", "cnn_small", "--method",
                                                               "natural"])
    student_run = trained_and_promoted(tmp_path, capsys, uri, ["distill", "--method", "sat"])
    # model files default into the run folder (not the working directory)
    assert (tmp_path / "runs" / "distill" / "model.pt").is_file() and not list(tmp_path.glob("*.pt"))

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(student_run)
    tags = run.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"] and "dard.config" not in tags
    # the run's note is the model card: what it is for, and the numbers of the epoch it holds
    assert tags["mlflow.note.content"].startswith("### cnn_small for digits, robust to L∞ perturbations of 0.2")
    assert re.fullmatch(r"\d+ samples [0-9a-f]{16}", tags["dard.data.validation"])  # what it was validated on
    held = int(tags["dard.selected_epoch"]) + 1  # counted from 1, as the console's epoch lines count
    assert f"**Validation** (the epoch it holds: {held} of 2, on " in tags["mlflow.note.content"]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["digits-train"]
    assert json.loads(Path(client.download_artifacts(student_run, "config.json", str(tmp_path))).read_text())[
        "loss"]["method"] == "sat"
    version = client.get_model_version_by_alias("dard-digits-cnn_small", "champion")
    assert version.run_id in (teacher_run, student_run) and version.description.startswith(
        "### cnn_small for digits")
    # the model page: the metrics of the epoch whose weights the model holds
    model = client.get_logged_model(tags["dard.logged_model_id"])
    from dard.models import load_model

    epoch = load_model(tmp_path / "runs" / "distill" / "model.pt")[1]["meta"]["selected_epoch"]
    history = [json.loads(line) for line in (tmp_path / "runs" / "distill" / "history.jsonl").read_text().splitlines()]
    shown = {m.key: (m.value, m.step) for m in model.metrics}
    assert model.name == "digits-cnn_small-sat" and shown["val_robust_acc"] == (history[epoch]["val_robust_acc"], epoch)
    assert version.source in (f"models:/{model.model_id}", f"models:/{client.get_run(teacher_run).data.tags['dard.logged_model_id']}")

    # where only mlflow and torch are installed, `mlflow models serve` loads the champion (pickle
    # refused) and answers on loopback with the classes dard's own model file gives, on the whole
    # test split
    env = env_without_dard(tmp_path)
    python = env.pop("PYTHON")
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    assert subprocess.run([python, "-c", "import dard"], env=env, cwd=tmp_path, capture_output=True).returncode != 0
    test = load_splits(Config.for_dataset("digits").data).test
    x = to_float(test.images)
    dard_model, _ = load_registered("models:/dard-digits-cnn_small@champion", uri)
    with torch.no_grad():
        expected = dard_model(x).argmax(1).numpy()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([python, "-m", "mlflow", "models", "serve", "-m", "models:/dard-digits-cnn_small@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline, ready = time.time() + HANG_S, False
        while not ready and time.time() < deadline and server.poll() is None:
            try:
                ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200
            except OSError:
                time.sleep(0.5)
        assert ready, server.stderr.read().decode()[-2000:] if server.poll() is not None else f"no /ping in {HANG_S} s"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                         data=json.dumps({"inputs": x.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=HANG_S).read())
        assert (np.asarray(answer["predictions"]).argmax(1) == expected).all()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
