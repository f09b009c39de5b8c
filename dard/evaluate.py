"""Robustness report: the fixed protocol of docs/design.md §7, an eps curve, and sanity checks.

Protocol (L-inf, inputs in [0, 1]): natural; FGSM; PGD-20 (random start); BIM-10; T-PGD-10
(TRADES KL); CW-inf-20 (margin loss); DPGD-20; Square (official, gradient-free); AutoAttack
standard (official implementation). Step size is the run's ``step_size`` (2/255 for CIFAR) for
every iterative attack; evaluation attacks keep, per sample, the first iterate that fools the
model. Square and AutoAttack run on the first ``autoattack_limit`` samples (minutes on a CPU).

Sanity checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness") are functions of a
finished report (``CHECKS``, the shape of AutoAttack's ``checks.py``); a failed check is printed
and stored in the JSON, never dropped, and a check whose attack was not run says so:
- ``eps0_equals_natural``: the attack loop at eps = 0 gives natural accuracy (a randomised or
  non-deterministic model fails this);
- ``monotone_in_eps``: PGD accuracy does not increase with eps;
- ``iterative_beats_fgsm``: PGD-20 and BIM-10 are no weaker than FGSM;
- ``blackbox_not_stronger``: the gradient-free Square attack is no stronger than the best
  white-box attack (a stronger Square means gradients are masked); needs ``square``;
- ``large_eps_breaks``: at eps = 0.5 PGD drives accuracy to ~0 (<= 5 %);
- ``predictions_vary``: the model predicts more than one class (a collapsed, constant model
  passes most other checks while every accuracy is meaningless).
AutoAttack's own checks (randomised or dynamic defence, probability outputs, Square beating the
gradient attacks, zero gradients, target classes) are kept as the report's ``autoattack.warnings``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from dard.attacks.autoattack import autoattack
from dard.attacks.pgd import projected_gradient_attack
from dard.attacks.registry import ATTACKS, AUTOATTACK, PROTOCOL, SQUARE, AttackParams, check_names
from dard.engine import correct_under, predict
from dard.logs import percent
from dard.progress import progress_bar
from dard.seeding import generator
from dard.tracking import git_commit

if TYPE_CHECKING:
    from dard.config import Config
    from dard.data import Dataset
    from dard.modelfile import ModelFile

log = logging.getLogger("dard")
EPS_CURVE_FACTORS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
LARGE_EPS = 0.5
SUBSET_ATTACKS = (SQUARE, AUTOATTACK)  # run on the first ``autoattack_limit`` samples


@dataclass(frozen=True)
class EvalSettings(AttackParams):
    """The attack parameters (eps/step on the [0, 1] pixel scale, seed, DPGD knobs, Square's
    queries) plus what to run: ``attacks`` (names of ``PROTOCOL``), ``limit`` (the first N samples
    of the split), ``autoattack_limit`` (Square and AutoAttack on the first N of those)."""

    attacks: tuple[str, ...] = PROTOCOL
    limit: int | None = None
    autoattack_limit: int | None = 1000  # AutoAttack is minutes per hundred samples on a CPU
    autoattack_version: str = "standard"
    batch_size: int = 256
    eps_curve: bool = True
    sanity_checks: bool = True
    num_classes: int = 10

    def __post_init__(self) -> None:
        """Refuses values that would make a report meaningless, naming the option."""
        check_names(self.attacks, what="--attacks")
        problems = [f"{name.replace('autoattack_limit', 'aa-limit')}: must be >= 1 (samples), got {value}"
                    for name in ("limit", "autoattack_limit") if (value := getattr(self, name)) is not None and value < 1]
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and 0 <= self.eps <= 1):
            problems.append(f"eps: must be in [0, 1] (pixels in [0, 1], e.g. 8/255), got {self.eps}")
        if not (isinstance(self.step_size, (int, float)) and math.isfinite(self.step_size) and self.step_size > 0):
            problems.append(f"step-size: must be > 0, got {self.step_size}")
        problems += [f"{name.replace('_', '-')}: must be >= {low}, got {getattr(self, name)}"
                     for name, low in (("square_queries", 1), ("batch_size", 1), ("num_classes", 2))
                     if getattr(self, name) < low]
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def for_config(cls, cfg: Config, *, eps: float | None = None, step_size: float | None = None,
                   **overrides) -> "EvalSettings":
        """The evaluation of a model trained under ``cfg``: its eps and step (unless given), its
        classes; ``overrides`` are other fields."""
        return cls(eps=cfg.attack.eps if eps is None else eps,
                   step_size=cfg.attack.step_size if step_size is None else step_size,
                   num_classes=cfg.data.num_classes, **overrides)


@dataclass
class Check:
    """``passed`` None: the check could not run (its attack was not asked for); ``detail`` says why."""

    name: str
    passed: bool | None
    detail: str


@dataclass
class Report:
    accuracy: dict[str, float]
    samples: dict[str, int]
    eps_curve: list[tuple[float, float]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    # AutoAttack's own record: per-attack robust accuracy ({"apgd-ce": 0.71, ...}), its warnings, version
    autoattack: dict = field(default_factory=dict)
    probes: dict = field(default_factory=dict)  # what the sanity checks measure beyond the attacks
    examples: dict | None = None  # a few natural/PGD-20 pairs with predictions, for the report grid
    correct: dict | None = None  # per attack, bool (N,) per sample; not serialised

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def headline(self) -> tuple[str, float, int] | None:
        """(attack, accuracy, samples) of the strongest attack run: the lowest accuracy, AutoAttack
        preferred on a tie; None with natural accuracy only."""
        attacked = [(acc, name != AUTOATTACK, name) for name, acc in self.accuracy.items() if name != "natural"]
        if not attacked:
            return None
        _, _, name = min(attacked)
        return name, self.accuracy[name], self.samples[name]

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "samples": self.samples, "eps_curve": self.eps_curve,
                "checks": [asdict(c) for c in self.checks], "autoattack": self.autoattack, "probes": self.probes,
                "settings": self.settings, "seconds": self.seconds, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        """The inverse of :meth:`to_dict` (a report JSON read back; no examples, no per-sample masks)."""
        return cls(dict(d["accuracy"]), dict(d["samples"]), [tuple(p) for p in d.get("eps_curve", [])],
                   [Check(**c) for c in d.get("checks", [])], dict(d.get("settings", {})),
                   dict(d.get("seconds", {})), dict(d.get("meta", {})), dict(d.get("autoattack", {})),
                   dict(d.get("probes", {})))

    def table(self) -> str:
        """The console view: accuracies in percent with one decimal, checks, AutoAttack's warnings."""
        lines = [f"{'attack':<12} {'accuracy':>9} {'samples':>8} {'seconds':>8}"]
        for name, acc in self.accuracy.items():
            lines.append(f"{name:<12} {percent(acc):>9} {self.samples[name]:>8d} {self.seconds.get(name, 0):>8.1f}")
        steps = self.autoattack.get("per_attack")
        if steps:
            lines.append("AutoAttack, robust after each attack: "
                         + ", ".join(f"{name} {percent(acc)}" for name, acc in steps.items()))
        for c in self.checks:
            lines.append(f"{CHECK_MARK[c.passed]} {c.name}: {c.detail}")
        for w in self.autoattack.get("warnings", []):
            lines.append(f"WARNING autoattack: {w}")
        return "\n".join(lines)


CHECK_MARK = {True: "ok     ", False: "WARNING", None: "skipped"}


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: EvalSettings,
                   progress: bool = True) -> Report:
    """Run the protocol on x (N, C, H, W) in [0, 1], y (N,). Returns a :class:`Report`."""
    if settings.limit is not None:
        x, y = x[:settings.limit], y[:settings.limit]
    model.eval()
    device = next(model.parameters()).device
    accuracy, samples, seconds = {}, {}, {}
    correct: dict[str, torch.Tensor] = {}
    aa_record: dict = {}
    names = [a for a in PROTOCOL if a in settings.attacks or a == "natural"]
    with progress_bar(len(names), "evaluate", enabled=progress) as bar:
        for name in names:
            start = time.perf_counter()
            n = (settings.autoattack_limit or len(y)) if name in SUBSET_ATTACKS else len(y)
            if name == AUTOATTACK:
                result = autoattack(model, x[:n], y[:n], eps=settings.eps, num_classes=settings.num_classes,
                                    version=settings.autoattack_version, batch_size=settings.batch_size,
                                    seed=settings.seed, device=device, progress=progress)
                correct[name] = result.robust
                aa_record = {"version": result.version, "per_attack": result.per_attack_accuracy,
                             "warnings": result.warnings}
                for w in result.warnings:
                    log.warning("AutoAttack: %s", w)
            else:
                correct[name] = correct_under(model, x[:n], y[:n], lambda m, xb, yb, _a=ATTACKS[name]: _a(m, xb, yb, settings),
                                              settings.batch_size)
            accuracy[name] = correct[name].float().mean().item()
            samples[name] = len(correct[name])
            seconds[name] = time.perf_counter() - start
            bar.update(1, attack=name)
    report = Report(accuracy, samples, settings=asdict(settings), seconds=seconds, correct=correct,
                    autoattack=aa_record)
    report.examples = _examples(model, x[:8], y[:8], lambda m, xb, yb: ATTACKS["pgd20"](m, xb, yb, settings))
    if settings.eps_curve or settings.sanity_checks:
        report.eps_curve = eps_curve(model, x, y, settings)
    if settings.sanity_checks:
        report.probes = probes(model, x, y, settings)
        report.checks = [check(report) for check in CHECKS]
    return report


def _examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack) -> dict:
    device = next(model.parameters()).device
    x_adv = attack(model, x.to(device), y.to(device)).cpu() if attack is not None else x
    with torch.no_grad():
        p_nat = torch.softmax(model(x.to(device)), 1).cpu()
        p_adv = torch.softmax(model(x_adv.to(device)), 1).cpu()
    return {"x": x, "x_adv": x_adv, "y": y, "pred": p_nat.argmax(1), "conf": p_nat.amax(1),
            "pred_adv": p_adv.argmax(1), "conf_adv": p_adv.amax(1)}


def _pgd_at(eps: float, steps: int, seed: int, step_size: float | None = None) -> Callable:
    step = step_size if step_size is not None else max(eps / 4, 1e-12)

    def attack(m, x, y):
        # Runs the loop even at eps = 0 (no shortcut), so the eps-0 check exercises the pipeline.
        return projected_gradient_attack(m, x, y, eps=eps, step_size=step, steps=steps, random_start="uniform",
                                         labels_for_early_keep=y, generator=generator(seed))

    return attack


def eps_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: EvalSettings, steps: int = 10) -> list[tuple[float, float]]:
    """PGD-``steps`` accuracy at eps = factor * s.eps (step eps/4) for each EPS_CURVE_FACTORS."""
    out = []
    for factor in EPS_CURVE_FACTORS:
        eps = factor * s.eps
        acc = correct_under(model, x, y, _pgd_at(eps, steps, s.seed), s.batch_size).float().mean().item()
        out.append((eps, acc))
    return out


def probes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: EvalSettings) -> dict:
    """What the sanity checks measure besides the protocol's attacks: PGD-5 accuracy at eps = 0,
    PGD-20 accuracy at ``LARGE_EPS``, and how many classes the natural predictions span."""
    device = next(model.parameters()).device
    return {"eps0": correct_under(model, x, y, _pgd_at(0.0, 5, s.seed, step_size=s.step_size),
                                  s.batch_size).float().mean().item(),
            "large_eps": correct_under(model, x, y, _pgd_at(LARGE_EPS, 20, s.seed), s.batch_size).float().mean().item(),
            "classes": predict(model, x.to(device), s.batch_size).unique().numel(),
            "label_classes": y.unique().numel(), "samples": len(y)}


# ---- the sanity checks: each a function of a finished report ----

def _tolerance(report: Report, samples: int | None = None) -> float:
    return 1.0 / max(samples or report.probes["samples"], 1) + 0.005  # one sample of slack plus half a point


def eps0_equals_natural(r: Report) -> Check:
    zero, nat = r.probes["eps0"], r.accuracy["natural"]
    return Check("eps0_equals_natural", abs(zero - nat) < 1e-9, f"PGD at eps=0 {percent(zero)} vs natural {percent(nat)}")


def monotone_in_eps(r: Report) -> Check:
    tol = _tolerance(r)
    rises = [(a, b) for (a, b) in zip(r.eps_curve, r.eps_curve[1:]) if b[1] > a[1] + tol]
    return Check("monotone_in_eps", not rises, "PGD accuracy non-increasing in eps" if not rises else
                 "accuracy rises with eps: " + ", ".join(f"{percent(a[1])} at {a[0]:.4f} -> {percent(b[1])} at {b[0]:.4f}"
                                                         for a, b in rises))


def iterative_beats_fgsm(r: Report) -> Check:
    acc = r.accuracy
    if "fgsm" not in acc:
        return Check("iterative_beats_fgsm", None, "fgsm not run")
    weaker = [n for n in ("pgd20", "bim10") if n in acc and acc[n] > acc["fgsm"] + _tolerance(r)]
    return Check("iterative_beats_fgsm", not weaker, "PGD-20 and BIM-10 no weaker than FGSM" if not weaker else
                 "weaker than FGSM: " + ", ".join(f"{n} {percent(acc[n])} > fgsm {percent(acc['fgsm'])}" for n in weaker))


def blackbox_not_stronger(r: Report) -> Check:
    white = [k for k in r.accuracy if k not in ("natural", SQUARE, AUTOATTACK)]
    if SQUARE not in r.accuracy or not white:
        return Check("blackbox_not_stronger", None, "needs square and a white-box attack (add them to --attacks)")
    n = r.samples[SQUARE]
    square = r.accuracy[SQUARE]
    # the per-sample results of the white-box attacks, restricted to Square's subset
    best_white = min(r.correct[k][:n].float().mean().item() for k in white)
    passed = square >= best_white - _tolerance(r, n)
    return Check("blackbox_not_stronger", passed,
                 f"Square ({r.settings['square_queries']} queries) {percent(square)} vs best white-box "
                 f"{percent(best_white)} on {n} samples" + ("" if passed else ": gradient masking suspected"))


def large_eps_breaks(r: Report) -> Check:
    big = r.probes["large_eps"]
    return Check("large_eps_breaks", big <= 0.05, f"PGD-20 at eps={LARGE_EPS} leaves {percent(big)} (expected ~0)")


def predictions_vary(r: Report) -> Check:
    classes = r.probes["classes"]
    varied = classes > 1 or r.probes["label_classes"] <= 1
    return Check("predictions_vary", varied, f"natural predictions span {classes} classes"
                 + ("" if varied else " (a constant classifier: its accuracy under attack means nothing)"))


CHECKS: tuple[Callable[[Report], Check], ...] = (eps0_equals_natural, monotone_in_eps, iterative_beats_fgsm,
                                                  blackbox_not_stronger, large_eps_breaks, predictions_vary)


def provenance(header: dict) -> dict:
    """Where a report's numbers come from: the model file's sha256, its MLflow run (registry
    models), this code's commit and version, the AutoAttack package's version, the date (UTC)."""
    from datetime import datetime, timezone
    from importlib.metadata import PackageNotFoundError, version

    def package(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"model_sha256": header.get("sha256"), "run_id": header.get("run_id"), "commit": git_commit(),
            "dard_version": package("dard"), "autoattack_version": package("pyautoattack"),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def evaluate_file(model_file: "ModelFile", data: "Dataset", settings: EvalSettings, *, name: str, split: str,
                  dataset: str, progress: bool = True) -> Report:
    """The protocol on ``data`` (a split, decoded here) for a loaded model file, the report's meta
    filled the one way every command fills it: what the model is (architecture, method, classes,
    input), where the numbers come from (provenance) and which split of which dataset."""
    report = evaluate_model(model_file.model, data.images.float() / 255, data.labels, settings, progress=progress)
    report.meta = {"model": name, "arch": model_file.arch, "dataset": dataset, "split": split,
                   "method": model_file.method, "classes": model_file.classes, "input": model_file.input,
                   "model_sha256": model_file.sha256, "provenance": provenance(model_file.header)}
    return report
