import json

import torch
from torch import nn

from dard.evaluate import EvalSettings, evaluate_model
from dard.report import write_report
from tests.conftest import load


class Quantised(nn.Module):
    """Gradient masking: rounding the input to 4 levels has zero gradient almost everywhere."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 3) / 3)


def test_full_report_on_a_trained_model(trained_models, digits_test, tmp_path):
    model = load(trained_models["trades"]["model_path"])
    x, y = digits_test
    settings = EvalSettings(eps=0.2, step_size=0.05, limit=150, autoattack_limit=40, square_queries=200)
    report = evaluate_model(model, x, y, settings, progress=False)
    acc = report.accuracy
    assert set(acc) >= {"natural", "fgsm", "pgd20", "bim10", "tpgd10", "cw20", "dpgd20", "autoattack", "square"}
    assert acc["pgd20"] <= acc["fgsm"] + 0.01 and acc["pgd20"] < acc["natural"]
    assert not report.warnings, report.table()
    assert len(report.eps_curve) == 7 and report.eps_curve[0][1] == acc["natural"]
    paths = write_report(report, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["accuracy"]["pgd20"] == acc["pgd20"] and len(saved["checks"]) == 6
    assert paths["png"].stat().st_size > 1000 and "pgd20" in paths["csv"].read_text()
    html = paths["html"].read_text()
    assert "data:image/png;base64" in html and "pgd20" in html and "Sanity checks" in html
    assert paths["grid"].stat().st_size > 1000


def test_gradient_masked_model_trips_the_checks(trained_models, digits_test):
    model = Quantised(load(trained_models["natural"]["model_path"])).eval()
    x, y = digits_test
    settings = EvalSettings(eps=0.2, step_size=0.05, attacks=("natural", "fgsm", "pgd20", "square"), limit=150,
                            autoattack_limit=150, square_queries=300)
    report = evaluate_model(model, x, y, settings, progress=False)
    failed = {c.name for c in report.warnings}
    assert "blackbox_not_stronger" in failed, report.table()
    assert "WARNING" in report.table()


class Randomised(nn.Module):
    """A randomised defence: noise on the logits at every call (AutoAttack's check_randomized trips)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        logits = self.inner(x)
        return logits + 0.5 * torch.randn_like(logits)


def test_autoattack_warnings_and_per_attack_accuracies_reach_the_report(trained_models, digits_test, tmp_path):
    model = Randomised(load(trained_models["trades"]["model_path"])).eval()
    x, y = digits_test
    settings = EvalSettings(eps=0.2, step_size=0.05, attacks=("natural", "autoattack"), limit=20, autoattack_limit=20,
                            eps_curve=False, sanity_checks=False)
    report = evaluate_model(model, x, y, settings, progress=False)
    assert any("randomized defense" in w for w in report.autoattack["warnings"]), report.autoattack
    assert set(report.autoattack["per_attack"]) >= {"apgd-ce"} and report.autoattack["version"]
    assert "WARNING autoattack: it seems to be a randomized defense" in report.table()
    paths = write_report(report, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["autoattack"]["warnings"] == report.autoattack["warnings"]
    assert "randomized defense" in paths["html"].read_text()
