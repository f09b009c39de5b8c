"""`dard export`: a .pt2 file that runs where only torch is installed, an ONNX file (float or int8)
that ONNX Runtime runs, a TorchScript file; each kept only if the exported file itself, run by its
own runtime, matches the model and keeps its robustness."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dard.cli import main


def test_export_runs_without_dard_and_is_rechecked(trained_models, tmp_path, capsys):
    model_path = trained_models["trades"]["model_path"]
    out = tmp_path / "student.pt2"
    assert main(["export", "--model", model_path, "--out", str(out), "--limit", "120", "--aa-limit", "30"]) == 0
    printed = capsys.readouterr().out
    assert "PGD-20 (transfer)" in printed and "predictions agree on 100.0% of 120" in printed
    check = json.loads((tmp_path / "student.pt2.check.json").read_text())
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


@pytest.mark.parametrize("fmt,int8", [("onnx", False), ("onnx", True), ("torchscript", False)])
def test_each_format_runs_in_its_own_runtime_and_is_rechecked(trained_models, tmp_path, capsys, fmt, int8):
    model_path = trained_models["trades"]["model_path"]
    out = tmp_path / f"student.{fmt}"
    assert main(["export", "--model", model_path, "--format", fmt, *(["--int8"] if int8 else []), "--out", str(out),
                 "--limit", "120", "--aa-limit", "20"]) == 0
    printed = capsys.readouterr().out
    label = fmt + (" int8" if int8 else "")
    assert f"PyTorch {label:>{max(9, len(label))}}" in printed and "Square (20)" in printed
    check = json.loads((tmp_path / f"student.{fmt}.check.json").read_text())
    assert check["int8"] == int8 and check["samples"] == 120
    if int8:  # quantised: close, not equal; the robustness before and after is what the check is for
        assert check["prediction_agreement"] >= 0.99 and 0 < check["max_abs_logit_diff"]
        assert check["pgd20_transfer"][0] - check["pgd20_transfer"][1] <= 0.02
    else:
        assert check["max_abs_logit_diff"] <= 1e-4 and check["natural"][0] == check["natural"][1]
    # the runtime alone runs the file, with any batch size
    from dard.models import load_model

    x = torch.rand(5, 1, 8, 8)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    else:
        logits = torch.jit.load(str(out))(x)
    model, _ = load_model(model_path)
    with torch.no_grad():
        assert (logits - model(x)).abs().max().item() < (0.05 if int8 else 1e-4)


def _perturbed_pt2(real, path, fmt):
    program = real(path, fmt)
    with torch.no_grad():
        for p in program.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return program


def _perturbed_onnx(real, path, fmt):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path))
    for init in graph.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(w + 0.05 * np.random.randn(*w.shape).astype(np.float32), init.name))
    onnx.save(graph, str(path))
    return real(path, fmt)


@pytest.mark.parametrize("fmt,perturb", [("pt2", _perturbed_pt2), ("onnx", _perturbed_onnx)])
def test_a_broken_export_is_caught_and_not_written(trained_models, tmp_path, monkeypatch, capsys, fmt, perturb):
    """The exported file's weights perturbed after export (as a faulty converter would leave them):
    the re-check runs that file, refuses it with one line, and writes nothing."""
    import dard.export

    real = dard.export.load_export
    monkeypatch.setattr(dard.export, "load_export", lambda path, f: perturb(real, path, f))
    out = tmp_path / f"broken.{fmt}"
    assert main(["export", "--model", trained_models["trades"]["model_path"], "--format", fmt, "--out", str(out),
                 "--limit", "60", "--aa-limit", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the {fmt} export differs from the model (max |delta logit|" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
