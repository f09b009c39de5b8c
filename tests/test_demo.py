"""`dard demo --quick` end to end (Ray, MLflow, registry), then a re-run that reuses finished stages."""
import os
import re
import subprocess
import sys

import pytest
import torch

from cluster.demo import _cached_teacher, teacher_cache_dir
from dard.cli import main
from dard.config import teacher_config
from dard.models import load_model

pytestmark = pytest.mark.ray


def test_demo_quick_end_to_end_on_a_folder_of_images(ray_session, digits_png, tmp_path, capsys):
    """The first run as a user starts it (its own process and Ray, no RAY_AUTH_MODE set), on a
    folder of PNGs the test made: a console of stage and epoch lines and progress bars, no warning
    or error line; the re-run in-process."""
    out, uri = tmp_path / "demo", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    source = ["--source", f"folder:{digits_png}"]
    run = subprocess.run([sys.executable, "-m", "dard.cli", "demo", "--quick", *source, "--out", str(out),
                          "--tracking-uri", uri], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    printed = run.stdout
    # tqdm's bars and redraws, cut out of the lines: a library line can follow a bar on the same line
    bar = re.compile(r"(?:[\w/ .-]+: )?\s*\d+%\|[^|]*\|[^\[]*\[[^\]]*\]")
    console = [bar.sub("", line) for line in re.split(r"[\r\n]", printed + run.stderr)]
    # the demo's own sanity-check block may speak of warnings: 2-epoch students are near chance
    ours = (printed.split("sanity-check warnings:\n", 1)[1].split("\n\n", 1)[0].splitlines()
            if "sanity-check warnings:" in printed else [])
    noise = [line for line in console if line not in ours and line != "sanity-check warnings:"
             and re.search(r"warn|error|traceback", line, re.I)]
    assert not noise, noise
    assert len(printed.splitlines()) <= 60
    table = (out / "results.md").read_text()
    assert "DARD" in table and "SAT" in table and "pgd20" in table and "natural" in table
    assert all(f"[{i}/7]" in printed for i in range(1, 8))
    for name in ("teacher", "dard", "sat"):  # one report path with `dard evaluate`: provenance, classes
        page = (out / "reports" / f"{name}.html").read_text()
        assert "model sha256" in page and "Classes (output order): 0, 1, 2" in page
    assert (out / "dard" / "model.pt").exists() and (out / "sat" / "model.pt").exists()
    assert "autoattack" in table and "not run on teacher" in table  # the students' headline, not the teacher's
    assert (out / "dard.log").exists()
    (cached,) = teacher_cache_dir().glob("digits-png-cnn_medium-*/model.pt")
    assert (out / "shards" / "manifest.json").exists()
    assert "dard-digits-png-cnn_small" in printed
    # MLflow's artifacts beside its database, not in the working directory
    assert list((tmp_path / "mlruns").rglob("robustness/dard.json"))
    # the champion's card and tags carry the attack suite's test numbers, with their sample counts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version_by_alias("dard-digits-png-cnn_small", "champion")
    assert version.tags["dard.test.autoattack"].endswith("(10 samples)") and "dard.evaluation_run" in version.tags
    assert "| AutoAttack (standard) |" in version.description and "not evaluated yet" not in version.description
    assert client.get_registered_model("dard-digits-png-cnn_small").description == version.description
    # a re-run reuses teacher, shards and students
    assert main(["demo", "--quick", *source, "--out", str(out), "--tracking-uri", uri]) == 0
    printed_again = capsys.readouterr().out
    assert printed.count("reused") == 0 and printed_again.count("reused") == 5
    assert "reused the reports of teacher, DARD, SAT" in printed_again  # same model files, same settings
    assert (out / "results.md").read_text() == table
    assert f"reused {cached} (sha256 verified)" in printed_again


def test_cached_teacher_is_reused_only_when_its_hash_and_recipe_match(tmp_path, monkeypatch):
    monkeypatch.setenv("DARD_CACHE", str(tmp_path))

    def recipe(epochs=1):
        return teacher_config("digits", model={"arch": "cnn_small"}, optim={"epochs": epochs},
                              data={"limit_train": 256}, run={"progress": False})

    path, what = _cached_teacher(recipe(), fresh=False)
    assert what == f"trained {path}" and path.is_relative_to(tmp_path)
    assert _cached_teacher(recipe(), fresh=False) == (path, f"reused {path} (sha256 verified)")
    weights = load_model(path)[0].state_dict()
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit
    assert _cached_teacher(recipe(), fresh=False)[1] == f"trained {path}"
    again = load_model(path)[0].state_dict()  # rebuilt from its last checkpoint: the same teacher
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    other, what = _cached_teacher(recipe(epochs=2), fresh=False)
    assert other != path and what == f"trained {other}"


def test_a_report_is_reused_only_for_the_same_model_file_and_settings(tmp_path, tiny_model, digits_test):
    from cluster.demo import _previous_report
    from dard.evaluate import EvalSettings, evaluate_model
    from dard.report import write_report

    x, y = digits_test
    settings = EvalSettings(eps=0.2, step_size=0.05, attacks=("natural", "fgsm"), limit=40, eps_curve=False,
                            sanity_checks=False)
    report = evaluate_model(tiny_model, x, y, settings, progress=False)
    report.meta = {"model": "DARD", "model_sha256": "a" * 64}
    write_report(report, tmp_path, stem="dard")
    again, files = _previous_report(tmp_path, "dard", "a" * 64, settings)
    assert again.accuracy == report.accuracy and again.samples == report.samples
    assert set(files) == {"dard.json", "dard.csv", "dard.html", "dard-examples.png"}
    assert _previous_report(tmp_path, "dard", "b" * 64, settings) is None  # another model file
    other = EvalSettings(**{**settings.__dict__, "limit": 41})
    assert _previous_report(tmp_path, "dard", "a" * 64, other) is None  # other settings
    assert _previous_report(tmp_path, "sat", "a" * 64, settings) is None  # no report yet
