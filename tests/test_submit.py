"""Job packaging: what `ray job submit --working-dir .` would upload, checked before Ray builds it."""
import shutil
import subprocess
from pathlib import Path

import pytest

from cluster.submit import PackageTooLarge, check_package
from dard.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_a_working_dir_with_600_mb_of_shards_is_refused_before_upload_naming_the_file(tmp_path, capsys):
    work = tmp_path / "job"
    (work / "data").mkdir(parents=True)
    (work / "train.py").write_text("print('hi')\n")
    with open(work / "data" / "part-00000.arrow", "wb") as f:  # 600 MB, sparse: nothing is written
        f.truncate(600 * 2**20)
    with pytest.raises(PackageTooLarge, match=r"data/part-00000.arrow \(600 MiB\)"):
        check_package(str(work))
    assert main(["submit", "--working-dir", str(work), "--address", "http://127.0.0.1:9", "--", "python",
                 "train.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data/part-00000.arrow" in err and ".rayignore" in err
    assert check_package(str(work), excludes=["data/"])[0] == 1  # left out: the job goes


def test_what_the_readme_commands_write_stays_out_of_the_package(tmp_path):
    """A checkout that ran every README command (its outputs written where those commands write
    them) packages to what git tracks, as Ray would build it."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    copy = tmp_path / "checkout"
    for rel in tracked:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, copy / rel)
    outputs = ["runs/demo/shards/part-00000.arrow", "runs/demo/dard/model.pt", "runs/distill/checkpoint.pt",
               "mlflow.db", "mlflow.db.lock", "mlruns/1/abc/artifacts/model/data/model.pt2", "shards/manifest.json",
               "shards/part-00000.arrow", "teacher.pt", "teacher-run/history.jsonl", "student.pt", "student.onnx",
               "student.onnx.check.json", "student-eval/robustness.html", "dard-digits-cnn_small-champion-eval/robustness.json",
               "sample.mp4", "sample.labels.csv", "sample-dpgd20.mp4", "runs/bench-pool/x/model.pt"]
    for rel in outputs:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(b"x" * 1000)
    from cluster.ray_private import package_files

    packaged = {path for path, _ in package_files(str(copy))}
    assert packaged <= set(tracked), sorted(packaged - set(tracked))
    assert not packaged & set(outputs)
    assert {"README.md", "dard/cli.py", "cluster/jobs/train.py"} <= packaged
