"""What the teacher contributes to a batch; none of it depends on the student.

``teacher_outputs`` is the one implementation used both online (every training step) and by the
shard precompute (once, stored): T(x), and for DARD the DPGD view x_d against the teacher with
one-hot labels as the Dice target, and T(x_d).
"""
from __future__ import annotations

import torch
from torch import nn

from dard.attacks.dpgd import dpgd_from_config
from dard.attacks.pgd import eval_mode
from dard.config import AttackConfig


@torch.no_grad()
def forward_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float32 logits (B, K) in eval mode, no grad."""
    with eval_mode(model):
        return model(x).float()


def teacher_outputs(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig, with_adv: bool,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """x: (B, C, H, W) in [0, 1]; y: (B,). Returns ``teacher_logits`` (B, K) and, if ``with_adv``,
    ``x_teacher_adv`` (B, C, H, W) in [0, 1] within eps of x and ``teacher_logits_adv`` (B, K)."""
    out = {"teacher_logits": forward_logits(teacher, x)}
    if with_adv:
        x_adv = dpgd_from_config(teacher, x, y, attack, generator=generator)
        out["x_teacher_adv"] = x_adv
        out["teacher_logits_adv"] = forward_logits(teacher, x_adv)
    return out


def quantize_delta(x_uint8: torch.Tensor, x_adv: torch.Tensor, eps: float) -> torch.Tensor:
    """The perturbation x_adv - x on the 8-bit grid: int8 with |delta| <= floor(eps*255) and
    x + delta in [0, 255]. x_uint8: (B, C, H, W) uint8; x_adv: same shape, float in [0, 1]."""
    bound = int(eps * 255 + 1e-6)
    target = torch.round(x_adv.float().cpu() * 255).clamp(0, 255).to(torch.int16)
    return (target - x_uint8.to(torch.int16)).clamp(-bound, bound).to(torch.int8)
