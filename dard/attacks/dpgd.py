"""DPGD: projected sign-gradient ascent on a Dice loss over the class distribution (docs/design.md §3).

The paper ("Dice Adversarial Robustness Distillation", arXiv 2509.11525) names DPGD a SegPGD-style
attack adapted to classification with a dynamic step size and channel-wise gradient masking; its
formulas are not public. Ours:

    l_dice(p, q) = 1 - 2 * sum_c p_c q_c / (sum_c p_c^2 + sum_c q_c^2),   p = softmax(f(x'))

with q the one-hot label or, when attacking a student in DARD, the teacher's soft label. Unlike
``1 - p_y`` the squared denominator also rewards piling mass on one wrong class (the paper's
"high-confidence misclassifications"). Knobs: inner loss ``dice | ce | dice+ce | cw``, step
schedule ``constant | cosine | apgd`` (the "dynamic step size"), channel mask, random start.

SegPGD's correct/fooled weighting (``segpgd_weighting``) is kept off by default: under sign
steps a positive per-sample weight cancels, so its only effect is freezing fooled samples while
lambda_t = 0 (docs/design.md §3, "trap").

Measured (``benchmarks/dpgd_variants.py``, digits test split, 359 samples, eps 0.2, step 0.05,
10 steps, same random start as PGD; accuracy %, lower = stronger attack)::

    model            PGD-10  dice/const  dice/cosine  dice/apgd  cw/apgd  AutoAttack
    TRADES teacher     74.7        74.1         73.5       72.1     67.4        60.2
    DARD student       64.6        63.2         59.6       60.2     54.6        41.5
    TRADES student     65.2        64.6         63.2       62.7     54.0        43.7
    SAT student        66.3        66.6         64.6       64.9     65.2        56.0
    RSLAD student      61.8        61.3         57.4       58.5     52.6        40.7

Every Dice variant is at least as strong as PGD-10 except dice/constant on the SAT student
(one sample weaker); the cosine and apgd schedules are 1-4 points stronger than constant on
every model (mean 63.7 vs 66.0) and tie with each other. Defaults therefore: evaluation DPGD
uses ``cosine`` (``dard.evaluate.EvalSettings``); the training inner attack keeps ``constant``,
the setting every benchmark run in ``benchmarks/results/methods-digits.md`` used (switching it
is a knob, ``attack.dpgd_schedule``, not yet benchmarked). The CW margin loss is stronger still,
and AutoAttack below everything, as it should be.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dard.attacks.pgd import cw_margin_loss, projected_gradient_attack
from dard.config import DPGD_LOSSES, unknown


def dice_loss(probs: torch.Tensor, target_probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-sample ``1 - 2<p, q> / (|p|^2 + |q|^2)`` for (B, K) distributions; in [0, 1]."""
    overlap = (probs * target_probs).sum(1)
    return 1 - 2 * overlap / (probs.pow(2).sum(1) + target_probs.pow(2).sum(1) + eps)


def as_distribution(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels (B,) int -> one-hot (B, K) float; probabilities (B, K) pass through."""
    return F.one_hot(target, num_classes).float() if target.dim() == 1 else target


def dpgd_inner_loss(name: str):
    """``(logits, target) -> (B,)`` for the named inner loss; target = labels or probabilities."""
    if name not in DPGD_LOSSES:
        raise ValueError(f"attack.dpgd_loss: {unknown(name, DPGD_LOSSES)}")

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        q = as_distribution(target, logits.shape[1])
        if name == "cw":
            return cw_margin_loss(logits, q.argmax(1))
        out = 0
        if "dice" in name:
            out = out + dice_loss(F.softmax(logits, 1), q)
        if "ce" in name:
            out = out - (q * F.log_softmax(logits, 1)).sum(1)  # soft cross-entropy
        return out

    return loss


def segpgd_weights(steps: int):
    """SegPGD's weights: (1 - lambda_t) on still-correct samples, lambda_t on fooled ones, lambda_t = t/(2T)."""

    def weights(logits: torch.Tensor, t: int, target: torch.Tensor) -> torch.Tensor:
        lam = t / (2 * steps)
        correct = logits.argmax(1) == as_distribution(target, logits.shape[1]).argmax(1)
        return torch.where(correct, 1 - lam, lam).to(logits.dtype)

    return weights


def dpgd(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, eps: float, step_size: float, steps: int = 10,
         loss: str = "dice", schedule: str = "constant", channel_mask: tuple[int, ...] = (),
         random_start: bool = True, segpgd_weighting: bool = False,
         labels_for_early_keep: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """DPGD adversarial examples.

    Args:
        x: (B, C, H, W) float in [0, 1]; eps/step_size on that scale.
        target: labels (B,) int64, or soft labels (B, K) summing to 1 (a teacher's softmax).
    Returns: x_adv (B, C, H, W) in [0, 1] with |x_adv - x| <= eps, detached.
    """
    weight_fn = None
    if segpgd_weighting:
        base = segpgd_weights(steps)
        weight_fn = lambda logits, t: base(logits, t, target)  # noqa: E731
    return projected_gradient_attack(
        model, x, target, eps=eps, step_size=step_size, steps=steps, loss_fn=dpgd_inner_loss(loss),
        random_start="uniform" if random_start else "none", schedule=schedule, channel_mask=channel_mask,
        sample_weight_fn=weight_fn, labels_for_early_keep=labels_for_early_keep, generator=generator)


def dpgd_from_config(model: nn.Module, x: torch.Tensor, target: torch.Tensor, attack_cfg, **kw) -> torch.Tensor:
    """DPGD with the knobs of an :class:`dard.config.AttackConfig`."""
    a = attack_cfg
    return dpgd(model, x, target, eps=a.eps, step_size=a.step_size, steps=a.steps, loss=a.dpgd_loss,
                schedule=a.dpgd_schedule, channel_mask=tuple(a.dpgd_channel_mask), random_start=a.random_start,
                segpgd_weighting=a.dpgd_segpgd_weighting, **kw)
