"""Bad inputs and faults, as a user meets them through the CLI: each ends with a non-zero exit,
one line naming the problem, and nothing written or registered (issue: nothing silent, nothing
leaked). One case per class of defect; the Ray-side ones live in test_sweep/test_cluster_train."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cluster.precompute import precompute
from dard.cli import main
from dard.models import NonFiniteWeightsError, build, save_model
from tests.conftest import HANG_S, digits_config

REPO = Path(__file__).resolve().parents[1]


def fails(argv, capsys, *needles, code=2):
    """Run the CLI; assert the exit code and one stderr line containing every needle."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def shards(trained_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-shards")
    cfg = digits_config(tmp, data={"limit_train": 150}, attack={"steps": 2})
    precompute(cfg, trained_models["teacher"]["model_path"], str(tmp / "s"), views=1, use_ray=False)
    return tmp / "s"


def distill_args(shards, out, *extra):
    return ["distill", "--shards", str(shards), "--limit-train", "150", "--steps", "2", "--epochs", "1",
            "--no-progress", "--out", str(out), *extra]


# ---- 1. silent wrong results ---------------------------------------------------------------------

def test_shards_of_another_split_or_attack_are_refused(shards, tmp_path, capsys):
    out = tmp_path / "s.pt"
    # another split seed would put this run's validation/test samples into its training rows
    fails(distill_args(shards, out, "--set", "data.split_seed=1"), capsys, "data.split_seed 0.0 (run: 1.0)")
    fails(distill_args(shards, out, "--set", "data.val_fraction=0.2"), capsys, "data.val_fraction")
    # another augmentation: the stored views were cropped differently from what the run trains on
    fails(distill_args(shards, out, "--set", "data.crop_padding=3"), capsys, "data.crop_padding")
    fails(distill_args(shards, out, "--steps", "3"), capsys, "attack.steps")
    fails(distill_args(shards, out, "--dpgd-schedule", "cosine"), capsys, "attack.dpgd_schedule")
    assert not out.exists() and not (tmp_path / "s-run").exists()
    assert main(distill_args(shards, out)) == 0 and out.exists()  # the matching run trains


def test_a_refused_ray_training_writes_nothing(shards, tmp_path, monkeypatch, capsys):
    """`dard train` checks its shards before it opens an MLflow run or a run folder."""
    monkeypatch.chdir(tmp_path)  # the default tracking store, ./mlflow.db, would land here
    fails(["train", "--shards", str(shards), "--set", "data.split_seed=1", "--out", str(tmp_path / "s.pt"),
           "--run-dir", str(tmp_path / "r")], capsys, "data.split_seed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_non_finite_numbers_never_reach_a_file(tmp_path, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"optim": {"weight_decay": float("inf")}}))
    out = tmp_path / "t.pt"
    fails(["train-teacher", "--config", str(cfg_file), "--out", str(out)], capsys, "optim.weight_decay", "finite")
    fails(["train-teacher", "--set", "attack.eps=.nan", "--out", str(out)], capsys, "attack.eps")
    # a diverging run stops before a NaN reaches the weights, a checkpoint or the model file
    fails(["train-teacher", "--arch", "cnn_small", "--method", "natural", "--lr", "1e30", "--epochs", "2",
           "--limit-train", "256", "--no-progress", "--out", str(out)], capsys, "non-finite")
    assert not out.exists() and not (tmp_path / "t-run" / "checkpoint.pt").exists()
    model = build("cnn_small", 10, 1)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="fc.weight"):
        save_model(tmp_path / "nan.pt", model, arch="cnn_small", num_classes=10, in_channels=1, dataset="digits")
    assert not (tmp_path / "nan.pt").exists()
    # a NaN model file made elsewhere is refused by evaluate
    payload = {"format": "dard-model/1", "arch": "cnn_small", "num_classes": 10, "in_channels": 1, "arch_kwargs": {},
               "dataset": "digits", "state_dict": model.state_dict(), "meta": {}}
    torch.save(payload, tmp_path / "nan.pt")
    fails(["evaluate", "--model", str(tmp_path / "nan.pt"), "--out-dir", str(tmp_path / "ev")], capsys, "NaN/Inf")
    assert not (tmp_path / "ev").exists()


def test_a_constant_model_fails_a_sanity_check(digits_test):
    from dard.evaluate import EvalSettings, evaluate_model

    model = build("cnn_small", 10, 1).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.arange(10.0))  # always predicts class 9
    x, y = digits_test
    report = evaluate_model(model, x[:60], y[:60], EvalSettings(eps=0.2, step_size=0.05, attacks=("natural", "fgsm"),
                                                                 square_queries=20), progress=False)
    check = {c.name: c for c in report.checks}["predictions_vary"]
    assert not check.passed and "constant" in check.detail


def test_empty_splits_limits_and_mismatched_resume_are_errors(tmp_path, capsys):
    out = str(tmp_path / "t.pt")
    fails(["train-teacher", "--set", "data.val_fraction=0", "--out", out], capsys, "data.val_fraction")
    fails(["train-teacher", "--set", "run.eval_limit=0", "--out", out], capsys, "run.eval_limit")
    fails(["train-teacher", "--set", "data.val_fraction=0.5", "--set", "data.test_fraction=0.5", "--out", out], capsys,
          "data.val_fraction")
    base = ["train-teacher", "--arch", "cnn_small", "--method", "natural", "--epochs", "1", "--limit-train", "128",
            "--no-progress", "--out", out]
    assert main(base) == 0
    capsys.readouterr()
    fails([*base[:-2], "--method", "sat", "--out", out, "--resume"], capsys, "loss.method", "--resume")
    fails([*base, "--epochs", "3", "--resume"], capsys, "optim.epochs")
    fails(["evaluate", "--model", out, "--limit", "-5"], capsys, "limit")
    fails(["evaluate", "--model", out, "--limit", "0"], capsys, "limit")
    # numbers that mean nothing: refused where the settings are built, before any attack or file
    for flags, needle in ((["--eps", "-1"], "eps: must be in [0, 1]"), (["--eps", "5"], "eps: must be in [0, 1]"),
                          (["--step-size", "-0.1"], "step-size: must be > 0")):
        fails(["evaluate", "--model", out, *flags, "--out-dir", str(tmp_path / "ev")], capsys, needle)
    assert not (tmp_path / "ev").exists()
    fails([*base, "--set", "optim.grad_clip=-1"], capsys, "optim.grad_clip: must be > 0")  # -1 is gradient ascent
    # counts are checked where they are parsed, each bad one named (argparse stops at the first)
    train = ["train", "--shards", str(tmp_path), "--out", out]
    precompute = ["precompute", "--local", "--teacher", out, "--out", str(tmp_path / "sh")]
    sweep = ["sweep", "--shards", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    for argv, flag, value, rule in ((train, "--workers", "0", ">= 1"), (train, "--max-failures", "-5", ">= 0"),
                                    (precompute, "--views", "0", ">= 1"), (precompute, "--batch", "0", ">= 1"),
                                    (sweep, "--workers-per-trial", "0", ">= 1"), (sweep, "--grace-period", "0", ">= 1")):
        fails([*argv, flag, value], capsys, f"{flag}: must be {rule}, got {value}")
    assert not (tmp_path / "sh").exists() and not (tmp_path / "m.db").exists()


# ---- 2. tracebacks where one line is promised ------------------------------------------------------

@pytest.mark.parametrize("text,needle", [("3\n", "top level"), ("data: [1, 2]\n", "'data'"),
                                         ("1: {a: 2}\n", "section 1"), ("data: {1: 2}\n", "data.1")])
def test_config_files_of_the_wrong_shape(tmp_path, capsys, text, needle):
    (tmp_path / "c.yaml").write_text(text)
    fails(["train-teacher", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "t.pt")], capsys, needle)


def test_malformed_files_are_named(shards, tmp_path, capsys):
    torch.save({"format": "dard-model/1", "arch": "cnn_small"}, tmp_path / "half.pt")
    fails(["evaluate", "--model", str(tmp_path / "half.pt")], capsys, "lacks", "num_classes")
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["parts"][0]["sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    fails(["shards", "inspect", str(copy)], capsys, "malformed 'parts'")


def test_video_labels_without_their_column(trained_models, tmp_path, capsys):
    from dard.video import make_sample

    clip, _ = make_sample(tmp_path / "clip.mp4", n_images=2, frames_per_image=1)
    (tmp_path / "bad.csv").write_text("frame,digit\n0,1\n1,2\n")
    fails(["video", "--input", str(clip), "--model", trained_models["natural"]["model_path"], "--labels",
           str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o.mp4")], capsys, "no 'label' column")
    assert not (tmp_path / "o.mp4").exists()


def test_registry_errors(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    fails(["evaluate", "--model", "models:/dard-digits-cnn_small", "--tracking-uri", uri], capsys, "name an alias")
    for argv in (["registry", "show", "nobody"], ["registry", "promote", "--run-id", "0" * 32],
                 ["evaluate", "--model", "models:/x@champion"]):
        fails([*argv, "--tracking-uri", uri], capsys, "no MLflow database there")
    assert not (tmp_path / "m.db").exists()  # a command that reads the registry creates no store
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments()  # now an empty store
    fails(["registry", "show", "nobody", "--tracking-uri", uri], capsys, "no registered model 'nobody'")
    started = time.time()
    fails(["evaluate", "--model", "models:/x@champion", "--tracking-uri", "http://127.0.0.1:9"], capsys, "unreachable")
    assert time.time() - started < 30
    (tmp_path / "ro.db").write_bytes(b"")
    (tmp_path / "ro.db").chmod(0o444)
    fails(["registry", "show", "x", "--tracking-uri", f"sqlite:///{tmp_path / 'ro.db'}"], capsys, "read-only")


def test_worker_errors_come_out_as_their_own_line():
    class WorkerGroupError(RuntimeError):
        def __init__(self):
            super().__init__("Training failed due to worker errors:\n[Rank 0]\nTraceback ...\n  File x\nlong ...")
            self.worker_failures = {0: ValueError("optim.batch_size 64 is not divisible by 3 workers")}

    from cluster.ray_session import error_line

    assert error_line(WorkerGroupError()) == "optim.batch_size 64 is not divisible by 3 workers"


# ---- 3. faults ---------------------------------------------------------------------------------------

def test_sigterm_stops_training_cleanly(tmp_path):
    out = tmp_path / "t.pt"
    proc = subprocess.Popen([sys.executable, "-m", "dard.cli", "train-teacher", "--arch", "cnn_small", "--epochs", "200",
                             "--steps", "2", "--no-progress", "--out", str(out)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    checkpoint = tmp_path / "t-run" / "checkpoint.pt"
    deadline = time.time() + HANG_S
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("dard train-teacher: terminated") and "Traceback" not in err
    assert not out.exists()
    from dard.checkpoint import load_checkpoint

    assert load_checkpoint(checkpoint)["epoch"] >= 0  # the last finished epoch is intact for --resume


def test_tampered_registry_entry_cannot_run_code(tmp_path, monkeypatch, capsys):
    from dard.config import Config
    from dard.registry import promote
    from dard.tracking import EpochLogger, log_model

    monkeypatch.chdir(tmp_path)  # MLflow's artifact root (./mlruns) lands here
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = Config.for_dataset("digits")
    path = save_model(tmp_path / "m.pt", build("cnn_small", 10, 1), arch="cnn_small", num_classes=10, in_channels=1,
                      dataset="digits", meta={"config": cfg.to_dict()})
    logger = EpochLogger({"uri": uri, "experiment": "t"}, cfg)
    log_model(logger.run_id, path, torch.rand(2, 1, 8, 8), tracking_uri=uri)
    p = promote(uri, logger.run_id, cfg, metric=0.5)
    assert promote(uri, logger.run_id, cfg, metric=0.5).already_registered  # one run is one version
    capsys.readouterr()  # MLflow's own registration messages
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    stored = [f for f in tmp_path.rglob("dard-model.pt") if "mlruns" in f.parts]
    assert stored
    for f in stored:  # a valid model file of another architecture, dropped in place of the registered one
        save_model(f, build("cnn_medium", 10, 1), arch="cnn_medium", num_classes=10, in_channels=1, dataset="digits")
    fails(["evaluate", "--model", f"models:/{p.name}@champion", "--tracking-uri", uri], capsys,
          "replaced after registration")
    for f in stored:
        torch.save({"format": "dard-model/1", "x": Payload()}, f)  # a pickle that runs code when unpickled
    fails(["evaluate", "--model", f"models:/{p.name}@champion", "--tracking-uri", uri], capsys,
          "replaced after registration")
    assert not marker.exists()

    # The program MLflow serves (data/model.pt2) with a payload in place of its weights: under
    # MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false, as the README tells a deployment to run, MLflow
    # checks every record of the archive before torch reads it, and refuses this one.
    import zipfile

    import mlflow

    programs = [f for f in tmp_path.rglob("model.pt2") if "mlruns" in f.parts]
    assert programs
    payload = io.BytesIO()
    torch.save({"w": Payload()}, payload)
    for f in programs:
        with zipfile.ZipFile(f) as z:
            records = {n: z.read(n) for n in z.namelist()}
        weights = [n for n in records if "/data/weights/" in n and not n.endswith(".json")]
        assert weights
        for n in [n for n in records if "/data/weights/" in n and n.endswith("_config.json")]:
            config = json.loads(records[n])  # tell torch to unpickle the records, as a forger would
            for entry in config["config"].values():
                entry["use_pickle"] = True
            records[n] = json.dumps(config).encode()
        with zipfile.ZipFile(f, "w") as z:
            for n, data in records.items():
                z.writestr(n, payload.getvalue() if n in weights else data)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(mlflow.exceptions.MlflowException, match="not a pickle-free payload"):
        mlflow.pyfunc.load_model(f"models:/{p.name}@champion")
    assert not marker.exists()


def test_a_rerun_continues_the_mlflow_run_of_a_killed_training(tmp_path):
    """What `dard train` does on a rerun after its driver died (SIGKILL leaves the run RUNNING,
    a failure leaves it FAILED): the same run continues; one training is one run."""
    from mlflow.tracking import MlflowClient

    from dard.config import Config
    from dard.tracking import EpochLogger, resumable_run

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    marker = tmp_path / "ray" / "job" / "mlflow_run.json"
    assert resumable_run(uri, marker) is None  # first attempt: a new run
    first = EpochLogger({"uri": uri, "experiment": "t", "run_name": "job"}, Config.for_dataset("digits"))
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"run_id": first.run_id}))
    assert resumable_run(uri, marker) == first.run_id  # killed while RUNNING: continued
    first.close("FAILED")
    assert resumable_run(uri, marker) == first.run_id
    assert MlflowClient(uri).get_run(first.run_id).info.status == "RUNNING"  # re-opened for the rerun
    marker.write_text(json.dumps({"run_id": "0" * 32}))
    assert resumable_run(uri, marker) is None  # a run gone from the store: start a new one


def test_a_full_disk_is_named_and_leaves_no_partial_file(tmp_path):
    """A write that fails for want of space (ENOSPC mid-write, as the OS reports it): one clear
    error naming the path, no temporary file left to keep the disk full, the previous file intact."""
    import errno

    from dard.checkpoint import load_checkpoint, save_checkpoint
    from dard.files import atomic_write

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 0, "model": {"w": torch.ones(2)}, "optimizer": {}})

    def fills_the_disk(stream):
        stream.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"no space left on the device holding {path}"):
        atomic_write(path, fills_the_disk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(path)["epoch"] == 0


def test_tampered_storage_never_runs_code(shards, trained_models, tmp_path, capsys):
    """A pickle with a ``__reduce__`` payload put where dard reads files from storage -- a teacher
    (the demo's teacher cache holds the same kind of file), a checkpoint, a shard part whose
    manifest entry was updated to match it -- is refused with one line; the payload never runs.
    (The sweep folder: tests/test_sweep.py; the registry: test_tampered_registry_entry_cannot_run_code.)"""
    import hashlib
    import json
    import pickle
    import shutil

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps({"format": "dard-model/1", "state_dict": Payload()})
    (tmp_path / "teacher.pt").write_bytes(evil)
    fails(["precompute", "--local", "--teacher", str(tmp_path / "teacher.pt"), "--out", str(tmp_path / "sh")], capsys,
          "weights-only")
    out = tmp_path / "t.pt"
    base = ["train-teacher", "--arch", "cnn_small", "--epochs", "1", "--limit-train", "64", "--no-progress",
            "--out", str(out)]
    assert main(base) == 0
    (tmp_path / "t-run" / "checkpoint.pt").write_bytes(evil)
    fails([*base, "--resume"], capsys, "unreadable checkpoint")
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / manifest["parts"][0]["file"]).write_bytes(evil)
    manifest["parts"][0].update(bytes=len(evil), sha256=hashlib.sha256(evil).hexdigest())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    fails(distill_args(str(copy), tmp_path / "s.pt"), capsys, "not a readable Arrow IPC file")
    assert not marker.exists()
