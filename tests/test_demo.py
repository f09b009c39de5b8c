"""`dard demo --quick` end to end (Ray, MLflow, registry), then a re-run that reuses finished stages."""
import pytest

from dard.cli import main

pytestmark = pytest.mark.ray


def test_demo_quick_end_to_end(tmp_path, capsys):
    out, uri = tmp_path / "demo", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["demo", "--quick", "--out", str(out), "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert "DARD" in table and "SAT" in table and "pgd20" in table and "natural" in table
    assert all(f"[{i}/7]" in printed for i in range(1, 8))
    for name in ("teacher", "dard", "sat"):
        assert (out / "reports" / f"{name}.html").exists() and (out / name / "model.pt").exists()
    assert (out / "shards" / "manifest.json").exists()
    assert "dard-digits-cnn_small" in printed
    # a re-run reuses teacher, shards and students
    assert main(["demo", "--quick", "--out", str(out), "--tracking-uri", uri]) == 0
    assert printed.count("reused") == 0 and capsys.readouterr().out.count("reused") == 4
