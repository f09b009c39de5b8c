"""`dard export`: a .pt2 file that runs where only torch is installed, kept only if the exported
program itself matches the model and keeps its robustness."""
import json
import subprocess
import sys

import torch

from dard.cli import main


def test_export_runs_without_dard_and_is_rechecked(trained_models, tmp_path, capsys):
    model_path = trained_models["trades"]["model_path"]
    out = tmp_path / "student.pt2"
    assert main(["export", "--model", model_path, "--out", str(out), "--limit", "120", "--aa-limit", "30"]) == 0
    printed = capsys.readouterr().out
    assert "PGD-20 (transfer)" in printed and "predictions agree on 100.0% of 120" in printed
    check = json.loads(out.with_suffix(".check.json").read_text())
    assert check["max_abs_logit_diff"] <= 1e-4 and check["natural"][0] == check["natural"][1]
    assert check["pgd20_transfer"][0] == check["pgd20_transfer"][1] and check["square_samples"] == 30
    # where dard cannot be imported, torch alone runs the file, with any batch size
    x = torch.rand(5, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys; sys.modules['dard'] = None; import torch; "
              f"m = torch.export.load({str(out)!r}).module(); "
              f"print(m(torch.load({str(tmp_path / 'x.pt')!r})).argmax(1).tolist())")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    from dard.models import load_model

    model, _ = load_model(model_path)
    with torch.no_grad():
        assert run.stdout.strip() == str(model(x).argmax(1).tolist())


def test_a_broken_export_is_caught_and_not_written(trained_models, tmp_path, monkeypatch, capsys):
    import dard.export

    real = dard.export.load_export

    def perturbed(path):
        program = real(path)
        with torch.no_grad():
            for p in program.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return program

    monkeypatch.setattr(dard.export, "load_export", perturbed)
    out = tmp_path / "broken.pt2"
    assert main(["export", "--model", trained_models["trades"]["model_path"], "--out", str(out), "--limit", "60",
                 "--aa-limit", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the pt2 export differs from the model" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
