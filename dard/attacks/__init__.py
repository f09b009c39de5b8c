"""Attacks on images in [0, 1] under an L-inf budget: one PGD loop (pgd.py), DPGD, AutoAttack."""
from dard.attacks.dpgd import dice_loss, dpgd, dpgd_from_config, dpgd_inner_loss
from dard.attacks.pgd import (bim, ce_loss, cw_inf, cw_margin_loss, eval_mode, fgsm, kl_to_reference_loss, pgd,
                              projected_gradient_attack, targeted_pgd, trades_pgd)

__all__ = ["bim", "ce_loss", "cw_inf", "cw_margin_loss", "dice_loss", "dpgd", "dpgd_from_config", "dpgd_inner_loss",
           "eval_mode", "fgsm", "kl_to_reference_loss", "pgd", "projected_gradient_attack", "targeted_pgd",
           "trades_pgd"]
