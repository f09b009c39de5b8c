"""Sweeps end to end: MLflow parent/child runs, registry champion logic, resume, early errors."""
import os
import pickle
import re
import signal
import time

import pytest

from dard.cli import main
from dard.registry import METRIC
from tests.conftest import REPO, signal_when

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def sweep_env(ray_session, trained_models, digits_png, tmp_path_factory):
    """Shards of the digits as a folder of PNGs (your own images: the sweep registers under the
    folder's name)."""
    from cluster.precompute import precompute
    from dard.data import source_config

    tmp = tmp_path_factory.mktemp("sweep")
    source = f"folder:{digits_png}"
    cfg = source_config("digits-png", data={"source": source}, attack={"steps": 2},
                        run={"out_dir": str(tmp), "progress": False})
    precompute(cfg, trained_models["teacher"]["model_path"], str(tmp / "shards"), views=1, use_ray=False)
    return {"dir": tmp, "shards": str(tmp / "shards"), "uri": f"sqlite:///{tmp / 'mlflow.db'}", "source": source}


def runs_named(client, name):
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("mlflow.runName") == name]


def sweep_args(env, name, *extra, epochs=6):
    # storage as a URI (file://, the code path of s3:// and gs://: Tune's state, the seal, the best model)
    return ["sweep", "--shards", env["shards"], "--source", env["source"], "--steps", "2", "--epochs", str(epochs),
            "--no-progress", "--name", name, "--tracking-uri", env["uri"], "--run-dir", str(env["dir"] / "run"),
            "--storage-path", (env["dir"] / "run" / "sweeps").as_uri(), "--set", "run.eval_limit=90", *extra]


def test_sweep_interrupted_resumed_and_registered(sweep_env, tmp_path, capsys):
    """One sweep, SIGTERM after its first trial: exit 143, its state sealed, nothing registered, its
    parent run closed KILLED; --resume (the trials it started with, not others) runs the other
    trial only, registers the champion, which then loads and evaluates by name."""
    from mlflow.tracking import MlflowClient

    from dard.registry import show
    from tuning.sweep import child_runs

    # no early stopping here: every trial runs its 3 epochs, so "finished" is unambiguous
    epochs = 3
    args = sweep_args(sweep_env, "first", "--trials", "2", "--space", "rslad-like", "--grace-period", str(epochs),
                      epochs=epochs)
    # the sweep joins the test session's Ray, as `dard sweep` joins a cluster named by RAY_ADDRESS;
    # SIGTERM (what a scheduler or `kill` sends) 1 s after the sweep has said that its first trial
    # finished (from Tune's on_trial_complete, after which Tune marks the trial TERMINATED), while
    # that trial's workers stop: Ray Train's controller may then write a traceback ("Graceful
    # shutdown of backend failed"), which goes to dard.log, not the console (cluster/ray_session.py)
    client = MlflowClient(tracking_uri=sweep_env["uri"])

    def first_children():
        parents = runs_named(client, "first")
        return parents, (child_runs(sweep_env["uri"], parents[0].info.run_id) if parents else [])

    finished_at: list[float] = []

    def a_trial_finished(out: str) -> bool:
        if not finished_at and re.search(rf"^trial \S+: {epochs} epochs", out, re.M):
            finished_at.append(time.time())
        return bool(finished_at) and time.time() - finished_at[0] > 1

    code, err, timeline = signal_when(args, signal.SIGTERM, a_trial_finished)
    assert code == 143, timeline
    assert err.strip().splitlines()[-1].startswith("dard sweep: terminated:") and "Traceback" not in err, timeline
    assert not re.search(r"^\[I \d{4}-", err, re.M), err  # Optuna's INFO lines go to dard.log, not the console
    parents, children = first_children()
    assert len(parents) == 1 and parents[0].info.status == "KILLED"  # closed as stopped; --resume reopens it
    assert not any(k.startswith("best.") for k in parents[0].data.tags)
    assert not client.search_registered_models()
    finished_before = {c.data.tags["dard.trial_id"] for c in children if c.info.status == "FINISHED"}
    assert len(finished_before) == 1

    # Tune unpickles the sweep folder on restore: a tampered tuner.pkl is refused before it is read
    folder = sweep_env["dir"] / "run" / "sweeps" / "first"
    tuner_pkl = folder / "tuner.pkl"
    original, marker = tuner_pkl.read_bytes(), tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    tuner_pkl.write_bytes(pickle.dumps(Payload()))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert "changed, added or removed since the sweep stopped (first: tuner.pkl)" in capsys.readouterr().err
    assert not marker.exists()
    tuner_pkl.write_bytes(original)
    other = list(args)
    other[other.index("--trials") + 1] = "3"
    assert main([*other, "--resume"]) == 2  # not the sweep it started as
    assert "was started with 2 trials" in capsys.readouterr().err

    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "registered dard-digits-png-cnn_small v1" in out and "new champion" in out
    # the console has dard's lines only: Tune's experiment box and TensorBoard hint are not printed
    ours = ("epoch ", "trial ", "sweep first:", "best parameters:", "MLflow parent run ", "registered ")
    assert all(line.startswith(ours) for line in out.splitlines() if line.strip()), out
    reported = re.search(r"best validation robust \(PGD\+CW\) accuracy (\S+%)", out).group(1)
    assert f"(val_robust_acc {reported})" in out  # what the sweep reports is what the model it registers scored
    parents, children = first_children()
    assert len(parents) == 1  # the same parent run continues
    finished = [c.data.tags["dard.trial_id"] for c in children if c.info.status == "FINISHED"]
    assert len(set(finished)) == 2 and len(finished) == 2  # N trials in total, the finished one not re-run
    assert finished_before <= set(finished)
    assert parents[0].info.status == "FINISHED" and any(k.startswith("best.") for k in parents[0].data.tags)
    # the execution that Ctrl-C stopped was replaced by the resumed one: closed KILLED, not left open
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    for child in (c for c in children if c.info.status == "FINISHED"):  # each trial's own parameters,
        p = child.data.params                                              # normalised weights summing to 1
        assert float(p["loss.w_adv"]) + float(p["loss.w_rob"]) + float(p["loss.w_nat"]) == pytest.approx(1, abs=1e-6)
        assert "trial.temperature" in p and "val_pgd_acc" in child.data.metrics
    # the URI stayed a URI: the state and the best model are in the folder it names, no local "file:" folder
    assert (folder / "best-model.pt").is_file() and (folder / "dard-sealed-state.json").is_file()
    assert not (REPO / "file:").exists() and not any(p.name == "file:" for p in sweep_env["dir"].rglob("*"))
    versions = show(sweep_env["uri"], "dard-digits-png-cnn_small")
    assert versions[0]["aliases"] == ["champion"] and float(versions[0][METRIC]) > 0.02  # above an untrained student
    # a worse run leaves the alias alone: tests/test_registry.py (the same promote, by run id)

    # the champion loads by name and evaluates
    assert main(["evaluate", "--model", "models:/dard-digits-png-cnn_small@champion", "--tracking-uri", sweep_env["uri"],
                 "--attacks", "natural,pgd20", "--limit", "50", "--no-checks", "--no-progress",
                 "--out-dir", str(tmp_path / "eval")]) == 0
    assert "pgd20" in capsys.readouterr().out
    assert main(["registry", "show", "dard-digits-png-cnn_small", "--tracking-uri", sweep_env["uri"]]) == 0
    shown = capsys.readouterr().out
    assert "v1" in shown and "aliases=champion" in shown


def test_the_best_trial_is_the_one_whose_kept_epoch_is_best(tmp_path):
    """Trial A ends higher than B, but B keeps an earlier epoch better than any of A's: B wins, with
    the metrics of the epoch it keeps (the model it registers), not of its last."""
    from types import SimpleNamespace

    import torch

    from dard.checkpoint import checkpoint_state, note_best, save_checkpoint
    from tuning.sweep import _best

    def trial(name, scores):
        model, history, best = torch.nn.Linear(2, 2), [], None
        for epoch, score in enumerate(scores):
            history.append({"epoch": epoch, "val_robust_acc": score, "val_natural_acc": 0.5})
            best = note_best(best, epoch, history[-1], model, "val_robust_acc")
        (tmp_path / name).mkdir()
        state = checkpoint_state(model, torch.optim.SGD(model.parameters(), lr=0.1), None, len(scores) - 1, {},
                                 history, {"best": best})
        save_checkpoint(tmp_path / name / "checkpoint.pt", state)
        return SimpleNamespace(metrics={"checkpoint_path": str(tmp_path / name), "val_robust_acc": scores[-1]})

    a, b = trial("a", [0.10, 0.20, 0.30]), trial("b", [0.10, 0.40, 0.25])
    kept, best = _best([a, b])
    assert best is b and kept["epoch"] == 1 and kept["val_robust_acc"] == 0.40
    kept, best = _best([a, trial("c", [0.3, 0.2, 0.1])])
    assert best is a and kept["epoch"] == 2  # a tie: the first


def test_bad_inputs_fail_before_any_trial(sweep_env, capsys):
    assert main(sweep_args(sweep_env, "x", "--space", "nope")) == 2
    assert "unknown search space 'nope'" in capsys.readouterr().err
    assert main(sweep_args(sweep_env, "x", "--tracking-uri", "http://127.0.0.1:9")) == 2
    assert "unreachable" in capsys.readouterr().err
    assert main(sweep_args(sweep_env, "x", "--temperature", "0")) == 2
    assert "loss.temperature" in capsys.readouterr().err
    assert main(sweep_args(sweep_env, "never-ran", "--resume")) == 2
    assert "no sweep at" in capsys.readouterr().err
