"""Adapter over the official AutoAttack (Croce & Hein 2020), packaged as ``pyautoattack``.

Standard version = APGD-CE, APGD-T (9 target classes), FAB-T (9 targets), Square (5000 queries),
each run only on the points still robust: the reported accuracy is the per-point worst case.
On the CPU it takes minutes even for tiny models, so callers pass a subset (``limit``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from dard.attacks.pgd import frozen

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


@dataclass
class AutoAttackResult:
    """robust: bool (N,) per sample, True where every attack failed; x_adv: (N, C, H, W) in [0, 1]."""

    robust: torch.Tensor
    x_adv: torch.Tensor
    per_attack_accuracy: dict[str, float]

    @property
    def accuracy(self) -> float:
        return float(self.robust.float().mean()) if len(self.robust) else float("nan")


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, num_classes: int,
               version: str = "standard", attacks: tuple[str, ...] | None = None, batch_size: int = 256,
               seed: int = 0, device: str | torch.device = "cpu") -> AutoAttackResult:
    """Run AutoAttack L-inf on ``x`` (N, C, H, W) in [0, 1] with labels ``y`` (N,).

    ``num_classes`` is the model's real class count: the targeted attacks use
    ``min(9, num_classes - 1)`` target classes (9 is the standard; fewer classes than 10 would
    otherwise fail, and CIFAR-100 models must not be treated as 10-class ones).
    ``attacks`` given -> version ``custom`` with that subset (e.g. ``("apgd-ce", "square")``).
    """
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
    with frozen(model), torch.no_grad():
        # AutoAttack's per-attack accuracies go to its logger; capture them for the report.
        handler = _CaptureAccuracies(per_attack)
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
    return AutoAttackResult(robust=robust, x_adv=x_adv.detach().cpu(), per_attack_accuracy=per_attack)


class _CaptureAccuracies(logging.Handler):
    """Parses 'robust accuracy after APGD-CE: 71.20% ...' lines into {attack: accuracy}."""

    def __init__(self, sink: dict[str, float]):
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("robust accuracy after "):
            name, _, rest = msg[len("robust accuracy after "):].partition(":")
            try:
                self.sink[name.strip().lower()] = float(rest.strip().split("%")[0]) / 100
            except ValueError:
                pass
