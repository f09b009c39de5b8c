"""Adapter over the official AutoAttack (Croce & Hein 2020), packaged as ``pyautoattack``.

Standard version = APGD-CE, APGD-T (9 target classes), FAB-T (9 targets), Square (5000 queries),
each run only on the points still robust: the reported accuracy is the per-point worst case.
On the CPU it takes minutes even for tiny models, so callers pass a subset (``limit``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from dard.attacks.pgd import frozen
from dard.progress import progress_bar

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


@dataclass
class AutoAttackResult:
    """robust: bool (N,) per sample, True where every attack failed; x_adv: (N, C, H, W) in [0, 1];
    per_attack_accuracy: robust accuracy after each attack, as AutoAttack reports it; warnings:
    what AutoAttack's own checks (``pyautoattack/checks.py``) said, word for word; version: of
    the pyautoattack package."""

    robust: torch.Tensor
    x_adv: torch.Tensor
    per_attack_accuracy: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    version: str = ""

    @property
    def accuracy(self) -> float:
        return float(self.robust.float().mean()) if len(self.robust) else float("nan")


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, num_classes: int,
               version: str = "standard", attacks: tuple[str, ...] | None = None, batch_size: int = 256,
               seed: int = 0, device: str | torch.device = "cpu", progress: bool = False) -> AutoAttackResult:
    """Run AutoAttack L-inf on ``x`` (N, C, H, W) in [0, 1] with labels ``y`` (N,).

    ``num_classes`` is the model's real class count: the targeted attacks use
    ``min(9, num_classes - 1)`` target classes (9 is the standard; fewer classes than 10 would
    otherwise fail, and CIFAR-100 models must not be treated as 10-class ones).
    ``attacks`` given -> version ``custom`` with that subset (e.g. ``("apgd-ce", "square")``).
    ``progress``: a bar that advances per attack, names the attack and batch, and redraws every
    second (elapsed time and the estimate keep moving during a long attack).
    """
    import pyautoattack
    from pyautoattack import AutoAttack

    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    device = torch.device(device)
    if attacks is not None:
        version = "custom"
    adversary = AutoAttack(model, eps=eps, norm="Linf", version=version, device=device, seed=seed,
                           attacks=list(attacks) if attacks is not None else None)
    targets = min(9, num_classes - 1)
    adversary.apgd_targeted.n_target_classes = targets
    adversary.fab.n_target_classes = targets
    per_attack: dict[str, float] = {}
    warnings: list[str] = []
    names = list(attacks) if attacks is not None else list(adversary.attacks_to_run)
    with frozen(model), torch.no_grad(), progress_bar(len(names), "AutoAttack", enabled=progress, tick=1.0) as bar:
        # AutoAttack's per-attack accuracies and progress go to its logger: capture them.
        handler = _CaptureAccuracies(per_attack, warnings, bar)
        logger = logging.getLogger("auto-attack")
        logger.addHandler(handler)
        previous_level, previous_propagate = logger.level, logger.propagate
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        adversary.verbose = True  # its progress goes to the logger only; nothing is printed
        try:
            out = adversary.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(previous_level)
            logger.propagate = previous_propagate
        x_adv = out[0] if isinstance(out, tuple) else out
        robust = torch.cat([model(x_adv[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size].cpu()
                            for i in range(0, len(y), batch_size)]) if len(y) else torch.zeros(0, dtype=torch.bool)
    return AutoAttackResult(robust=robust, x_adv=x_adv.detach().cpu(), per_attack_accuracy=per_attack,
                            warnings=list(dict.fromkeys(warnings)), version=getattr(pyautoattack, "__version__", ""))


class _CaptureAccuracies(logging.Handler):
    """Reads AutoAttack's logger: its checks' warnings (WARNING records) word for word; 'robust
    accuracy after APGD-CE: 71.20% ...' into {attack: accuracy}; 'running apgd-t' and 'apgd-t -
    1/2 - ...' into the progress bar. (AutoAttack has no API for these; its log is what it says.)"""

    def __init__(self, sink: dict[str, float], warnings: list[str], bar):
        super().__init__(logging.DEBUG)
        self.sink, self.warnings, self.bar = sink, warnings, bar

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.warnings.append(msg)
        elif msg.startswith("robust accuracy after "):
            name, _, rest = msg[len("robust accuracy after "):].partition(":")
            try:
                self.sink[name.strip().lower()] = float(rest.strip().split("%")[0]) / 100
            except ValueError:
                return
            self.bar.update(1, robust=f"{rest.strip().split('%')[0]}%")
        elif msg.startswith("running "):
            self.bar.note(attack=msg[len("running "):])
        elif " successfully perturbed" in msg:
            attack, batch = msg.split(" - ")[:2]
            self.bar.note(attack=attack, batch=batch)
