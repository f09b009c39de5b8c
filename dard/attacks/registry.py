"""Evaluation attacks by name, one call shape: ``ATTACKS[name](model, x, y, params) -> x_adv``.

x (N, C, H, W) in [0, 1], y (N,) labels; x_adv stays in the L-inf ball of ``params.eps`` and in
[0, 1]. Every iterative attack keeps, per sample, the first iterate that fools the model, and
draws its random start from a generator seeded with ``params.seed`` (each call alike, so a
batch's result does not depend on the batches before it). ``dard evaluate``, the CLI's help and
``dard video`` read the names from here. ``square`` is the official gradient-free Square attack.
AutoAttack (``AUTOATTACK``) is the official implementation with its own batching and progress
(``dard.attacks.autoattack``); the protocol runs it by name after these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dard.attacks.dpgd import dpgd
from dard.attacks.pgd import bim, cw_inf, fgsm, pgd, trades_pgd
from dard.config import EVAL_ATTACKS, unknown
from dard.seeding import generator


@dataclass(frozen=True)
class AttackParams:
    """eps and step_size on the [0, 1] pixel scale; the DPGD knobs for ``dpgd20``."""

    eps: float
    step_size: float
    seed: int = 0
    dpgd_loss: str = "dice"
    dpgd_schedule: str = "cosine"  # the strongest Dice schedule measured (see dard/attacks/dpgd.py)
    square_queries: int = 1000  # Square's model queries per sample (AutoAttack's standard run uses 5000)


def _gen(p: AttackParams) -> torch.Generator:
    return generator(p.seed)


def square(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, p: AttackParams) -> torch.Tensor:
    """The official Square attack (Andriushchenko et al. 2020, AutoAttack's implementation): random
    square updates, no gradients; ``p.square_queries`` queries, seeded with ``p.seed``."""
    from pyautoattack.square import SquareAttack

    attack = SquareAttack(model, p_init=0.8, n_queries=p.square_queries, eps=p.eps, norm="Linf", n_restarts=1,
                          seed=p.seed, verbose=False, device=x.device, resc_schedule=False)
    with torch.no_grad():
        return attack.perturb(x, y)


Attack = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, AttackParams], torch.Tensor]

ATTACKS: dict[str, Attack] = {
    "natural": lambda m, x, y, p: x,
    "fgsm": lambda m, x, y, p: fgsm(m, x, y, p.eps, labels_for_early_keep=y),
    "pgd20": lambda m, x, y, p: pgd(m, x, y, p.eps, p.step_size, 20, labels_for_early_keep=y, generator=_gen(p)),
    "bim10": lambda m, x, y, p: bim(m, x, y, p.eps, p.step_size, 10, labels_for_early_keep=y),
    "tpgd10": lambda m, x, y, p: trades_pgd(m, x, p.eps, p.step_size, 10, labels_for_early_keep=y, generator=_gen(p)),
    "cw20": lambda m, x, y, p: cw_inf(m, x, y, p.eps, p.step_size, 20, labels_for_early_keep=y, generator=_gen(p)),
    "dpgd20": lambda m, x, y, p: dpgd(m, x, y, eps=p.eps, step_size=p.step_size, steps=20, loss=p.dpgd_loss,
                                      schedule=p.dpgd_schedule, labels_for_early_keep=y, generator=_gen(p)),
    "square": square,
}
SQUARE = "square"
AUTOATTACK = "autoattack"
PROTOCOL = EVAL_ATTACKS  # every name `dard evaluate` knows, in report order
if (*ATTACKS, AUTOATTACK) != PROTOCOL:
    raise ImportError(f"dard.config.EVAL_ATTACKS {PROTOCOL} and the registry {(*ATTACKS, AUTOATTACK)} differ")


def check_names(names, known=PROTOCOL, what: str = "attacks") -> None:
    """ValueError naming the unknown ones and the choices."""
    bad = sorted(set(names) - set(known))
    if bad:
        raise ValueError(f"{what}: {unknown(', '.join(bad), known)}")
