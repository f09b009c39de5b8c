"""Robustness report: the fixed protocol of docs/design.md §7, an eps curve, and sanity checks.

Protocol (L-inf, inputs in [0, 1]): natural; FGSM; PGD-20 (random start); BIM-10; T-PGD-10
(TRADES KL); CW-inf-20 (margin loss); DPGD-20; AutoAttack standard (official implementation).
Step size is the run's ``step_size`` (2/255 for CIFAR) for every iterative attack; evaluation
attacks keep, per sample, the first iterate that fools the model.

Sanity checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness") run with every report;
a failed check is printed and stored in the JSON, never dropped:
- ``eps0_equals_natural``: the attack loop at eps = 0 gives natural accuracy (a randomised or
  non-deterministic model fails this);
- ``monotone_in_eps``: PGD accuracy does not increase with eps;
- ``iterative_beats_fgsm``: PGD-20 and BIM-10 are no weaker than FGSM;
- ``blackbox_not_stronger``: the gradient-free Square attack is no stronger than the best
  white-box attack (a stronger Square means gradients are masked);
- ``large_eps_breaks``: at eps = 0.5 PGD drives accuracy to ~0 (<= 5 %);
- ``predictions_vary``: the model predicts more than one class (a collapsed, constant model
  passes most other checks while every accuracy is meaningless).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from dard.attacks.autoattack import autoattack
from dard.attacks.pgd import projected_gradient_attack
from dard.attacks.registry import ATTACKS, AUTOATTACK, PROTOCOL, AttackParams, check_names
from dard.engine import correct_under
from dard.progress import progress_bar
from dard.seeding import generator

EPS_CURVE_FACTORS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
LARGE_EPS = 0.5


@dataclass
class EvalSettings:
    """eps/step on the [0, 1] pixel scale. ``limit`` caps the samples (the first N of the split)."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    attacks: tuple[str, ...] = PROTOCOL
    limit: int | None = None
    autoattack_limit: int | None = 1000  # AutoAttack is minutes per hundred samples on a CPU
    autoattack_version: str = "standard"
    batch_size: int = 256
    seed: int = 0
    dpgd_loss: str = "dice"
    dpgd_schedule: str = "cosine"  # the strongest Dice schedule measured (see dard/attacks/dpgd.py)
    eps_curve: bool = True
    sanity_checks: bool = True
    square_queries: int = 1000
    num_classes: int = 10


@dataclass
class Check:
    name: str
    passed: bool
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
    examples: dict | None = None  # a few natural/PGD-20 pairs with predictions, for the report grid
    correct: dict | None = None  # per attack, bool (N,) per sample; not serialised

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "samples": self.samples, "eps_curve": self.eps_curve,
                "checks": [asdict(c) for c in self.checks], "settings": self.settings, "seconds": self.seconds,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        """The inverse of :meth:`to_dict` (a report JSON read back; no examples, no per-sample masks)."""
        return cls(dict(d["accuracy"]), dict(d["samples"]), [tuple(p) for p in d.get("eps_curve", [])],
                   [Check(**c) for c in d.get("checks", [])], dict(d.get("settings", {})),
                   dict(d.get("seconds", {})), dict(d.get("meta", {})))

    def table(self) -> str:
        lines = [f"{'attack':<12} {'accuracy':>9} {'samples':>8} {'seconds':>8}"]
        for name, acc in self.accuracy.items():
            lines.append(f"{name:<12} {100 * acc:>8.2f}% {self.samples[name]:>8d} {self.seconds.get(name, 0):>8.1f}")
        for c in self.checks:
            lines.append(f"{'ok  ' if c.passed else 'WARNING'} {c.name}: {c.detail}")
        return "\n".join(lines)


def _bound(name: str, s: EvalSettings) -> Callable:
    """The registry's attack ``name`` with ``s``'s parameters, as ``attack(model, x, y) -> x_adv``."""
    params = AttackParams(s.eps, s.step_size, s.seed, s.dpgd_loss, s.dpgd_schedule)
    return lambda m, x, y: ATTACKS[name](m, x, y, params)


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: EvalSettings,
                   progress: bool = True) -> Report:
    """Run the protocol on x (N, C, H, W) in [0, 1], y (N,). Returns a :class:`Report`."""
    check_names(settings.attacks)
    for name in ("limit", "autoattack_limit"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise ValueError(f"{name.replace('autoattack_limit', 'aa-limit')}: must be >= 1 (samples), got {value}")
    if settings.limit is not None:
        x, y = x[:settings.limit], y[:settings.limit]
    model.eval()
    device = next(model.parameters()).device
    accuracy, samples, seconds = {}, {}, {}
    correct: dict[str, torch.Tensor] = {}
    names = [a for a in PROTOCOL if a in settings.attacks or a == "natural"]
    with progress_bar(len(names), "evaluate", enabled=progress) as bar:
        for name in names:
            start = time.perf_counter()
            if name == AUTOATTACK:
                n = settings.autoattack_limit or len(y)
                result = autoattack(model, x[:n], y[:n], eps=settings.eps, num_classes=settings.num_classes,
                                    version=settings.autoattack_version, batch_size=settings.batch_size,
                                    seed=settings.seed, device=device, progress=progress)
                correct[name] = result.robust
            else:
                correct[name] = correct_under(model, x, y, _bound(name, settings), settings.batch_size)
            accuracy[name] = correct[name].float().mean().item()
            samples[name] = len(correct[name])
            seconds[name] = time.perf_counter() - start
            bar.update(1, attack=name)
    report = Report(accuracy, samples, settings=asdict(settings), seconds=seconds, correct=correct)
    report.examples = _examples(model, x[:16], y[:16], _bound("pgd20", settings))
    if settings.eps_curve:
        report.eps_curve = eps_curve(model, x, y, settings)
    if settings.sanity_checks:
        report.checks = sanity_checks(model, x, y, settings, report)
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


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: EvalSettings, report: Report) -> list[Check]:
    acc = report.accuracy
    tol = 1.0 / max(len(y), 1) + 0.005  # one sample of slack plus half a point
    checks = []
    zero = correct_under(model, x, y, _pgd_at(0.0, 5, s.seed, step_size=s.step_size), s.batch_size).float().mean().item()
    checks.append(Check("eps0_equals_natural", abs(zero - acc["natural"]) < 1e-9,
                        f"PGD at eps=0 {100 * zero:.2f}% vs natural {100 * acc['natural']:.2f}%"))
    curve = report.eps_curve or eps_curve(model, x, y, s)
    rises = [(a, b) for (a, b) in zip(curve, curve[1:]) if b[1] > a[1] + tol]
    checks.append(Check("monotone_in_eps", not rises,
                        "PGD accuracy non-increasing in eps" if not rises else
                        "accuracy rises with eps: " + ", ".join(f"{100 * a[1]:.1f}% at {a[0]:.4f} -> {100 * b[1]:.1f}% "
                                                                 f"at {b[0]:.4f}" for a, b in rises)))
    if "fgsm" in acc:
        weaker = [n for n in ("pgd20", "bim10") if n in acc and acc[n] > acc["fgsm"] + tol]
        checks.append(Check("iterative_beats_fgsm", not weaker,
                             "PGD-20 and BIM-10 no weaker than FGSM" if not weaker else
                             "weaker than FGSM: " + ", ".join(f"{n} {100 * acc[n]:.2f}% > fgsm {100 * acc['fgsm']:.2f}%"
                                                              for n in weaker)))
    white = {k: v for k, v in acc.items() if k not in ("natural", AUTOATTACK)}
    if white:
        n_square = min(len(y), s.autoattack_limit or len(y), 500)
        start = time.perf_counter()
        square = _square_accuracy(model, x[:n_square], y[:n_square], s)
        report.seconds.setdefault("square", time.perf_counter() - start)
        # the per-sample results of the white-box attacks, restricted to Square's subset
        best_white_on_subset = min(report.correct[k][:n_square].float().mean().item() for k in white)
        passed = square >= best_white_on_subset - (1.0 / n_square + 0.005)
        checks.append(Check("blackbox_not_stronger", passed,
                             f"Square ({s.square_queries} queries) {100 * square:.2f}% vs best white-box "
                             f"{100 * best_white_on_subset:.2f}% on {n_square} samples"
                             + ("" if passed else ": gradient masking suspected")))
        report.accuracy.setdefault("square", square)
        report.samples.setdefault("square", n_square)
    big = correct_under(model, x, y, _pgd_at(LARGE_EPS, 20, s.seed), s.batch_size).float().mean().item()
    checks.append(Check("large_eps_breaks", big <= 0.05,
                        f"PGD-20 at eps={LARGE_EPS} leaves {100 * big:.2f}% (expected ~0)"))
    from dard.engine import predict

    classes = predict(model, x.to(next(model.parameters()).device), s.batch_size).unique().numel()
    varied = classes > 1 or y.unique().numel() <= 1
    checks.append(Check("predictions_vary", varied,
                        f"natural predictions span {classes} classes" + ("" if varied else
                        " (a constant classifier: its accuracy under attack means nothing)")))
    return checks


def _square_accuracy(model, x, y, s: EvalSettings) -> float:
    """Square attack alone (official implementation) with ``s.square_queries`` queries."""
    from pyautoattack.square import SquareAttack

    device = next(model.parameters()).device
    attack = SquareAttack(model, p_init=0.8, n_queries=s.square_queries, eps=s.eps, norm="Linf", n_restarts=1,
                          seed=s.seed, verbose=False, device=device, resc_schedule=False)
    model.eval()
    with torch.no_grad():
        x_adv = attack.perturb(x.to(device), y.to(device))
        return (model(x_adv).argmax(1).cpu() == y).float().mean().item()
