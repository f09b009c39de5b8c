"""The training batch every loss takes, from memory or from shards."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TrainBatch:
    """One batch. x: (B, C, H, W) float in [0, 1]; y: (B,) int64 (a pool row's is the teacher's
    argmax, never a hidden true label).

    ``label_weight`` (B,) float in {0, 1}, None when every row has its true label: which rows the
    hard-label terms count (a pool row without a pseudo-label, under ``loss.pseudo_labels: none`` or
    below ``loss.pseudo_threshold``, has 0). Teacher fields (distillation only; logits (B, K)
    float): teacher_logits = T(x); x_teacher_adv = x_d, a DPGD example against the teacher (same
    range and shape as x); teacher_logits_adv = T(x_d); online_teacher = T itself (frozen, on the
    batch's device), only for ``rob_target='teacher_adv'``.
    """

    x: torch.Tensor
    y: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    x_teacher_adv: torch.Tensor | None = None
    teacher_logits_adv: torch.Tensor | None = None
    online_teacher: nn.Module | None = None  # the teacher model, for losses that query it at new points
    label_weight: torch.Tensor | None = None
    index: torch.Tensor | None = None  # (B,) each row's sample in its split (what a step trained on)
    pooled: torch.Tensor | None = None  # (B,) bool: a pool row (its index is in the pool, its label the teacher's)

    def to(self, device: torch.device) -> "TrainBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TrainBatch(move(self.x), move(self.y), move(self.teacher_logits), move(self.x_teacher_adv),
                          move(self.teacher_logits_adv), self.online_teacher, move(self.label_weight), self.index,
                          self.pooled)
