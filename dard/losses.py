"""Training objectives: ``natural``, ``sat``, ``trades``, ``ard``, ``rslad``, ``dard``; one signature.

Each is ``loss(student, batch, loss_cfg, attack_cfg) -> LossResult``. Every hard-label term is
:func:`hard_ce`: over the rows with a label (a pool row's is the teacher's argmax, or it is skipped:
``batch.label_weight``). Inner maximisations run
inside the loss (against the student, model in eval mode during the attack); everything that
depends only on the teacher arrives precomputed in the :class:`TrainBatch` (from an online
teacher or from the Arrow shards), so the same function serves both paths.

Reductions: every divergence is a per-sample sum over classes averaged over the batch
(``batchmean``). Peers that used ``torch.mean`` over B x K (ARD's ``nn.KLDivLoss()``, RSLAD's
``kl``) have K times smaller divergence terms; their defaults are mapped as documented below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dard.attacks.dpgd import dice_loss, dpgd_from_config
from dard.attacks.pgd import pgd, trades_pgd
from dard.config import DISTILL_METHODS, ROB_TARGETS, AttackConfig, LossConfig, unknown
from dard.data import TrainBatch
from dard.models.registry import unwrap
from dard.teacher import forward_logits


@dataclass
class LossResult:
    loss: torch.Tensor  # scalar, differentiable w.r.t. the student
    terms: dict[str, float] = field(default_factory=dict)  # each weighted term, for logging


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               kind: str = "kl") -> torch.Tensor:
    """``tau^2 * D(softmax(teacher/tau), softmax(student/tau))``, batch mean.

    kind ``kl``: KL(teacher || student) summed over classes (Hinton's tau^2 keeps gradient scale
    independent of tau). kind ``dice``: the Dice loss of docs/design.md §3 with the teacher's
    distribution as target. The teacher side is detached.
    """
    teacher_probs = F.softmax(teacher_logits.detach().float() / temperature, 1)
    student_scaled = student_logits.float() / temperature
    if kind == "kl":
        d = F.kl_div(F.log_softmax(student_scaled, 1), teacher_probs, reduction="batchmean")
    elif kind == "dice":
        d = dice_loss(F.softmax(student_scaled, 1), teacher_probs).mean()
    else:
        raise ValueError(f"loss.divergence: unknown {kind!r}; choose kl or dice")
    return temperature ** 2 * d


def hard_ce(logits: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
    """``CE(logits, y)`` averaged over the rows that have a hard label: every row, or those whose
    ``batch.label_weight`` is 1 (a pool row without a usable pseudo-label has 0). Zero when none has."""
    if batch.label_weight is None:
        return F.cross_entropy(logits, batch.y)
    per_row = F.cross_entropy(logits, batch.y, reduction="none")
    return (per_row * batch.label_weight).sum() / batch.label_weight.sum().clamp_min(1)


def _require_teacher(batch: TrainBatch, method: str, *fields_: str) -> None:
    missing = [f for f in fields_ if getattr(batch, f) is None]
    if missing:
        raise ValueError(f"loss {method!r} needs teacher outputs {missing} in the batch: pass --teacher or --shards")


def natural(student: nn.Module, batch: TrainBatch, cfg: LossConfig, attack: AttackConfig) -> LossResult:
    """Standard training: ``CE(S(x), y)`` (the non-robust reference)."""
    loss = hard_ce(student(batch.x), batch)
    return LossResult(loss, {"ce": loss.item()})


def sat(student: nn.Module, batch: TrainBatch, cfg: LossConfig, attack: AttackConfig) -> LossResult:
    """SAT / PGD-AT (Madry et al. 2018): ``CE(S(x'), y)``, x' = PGD-CE(student), uniform start.

    Defaults as in Madry's CIFAR setting: eps 8/255, step 2/255, 10 steps.
    """
    x_adv = pgd(unwrap(student), batch.x, batch.y, eps=attack.eps, step_size=attack.step_size, steps=attack.steps)
    loss = hard_ce(student(x_adv), batch)
    return LossResult(loss, {"ce_adv": loss.item()})


def trades(student: nn.Module, batch: TrainBatch, cfg: LossConfig, attack: AttackConfig) -> LossResult:
    """TRADES (Zhang et al. 2019): ``CE(S(x), y) + beta * KL(S(x) || S(x'))``, batchmean.

    x' = T-PGD: ascend KL(S(x) || S(x')) from x + 0.001*N(0,1). beta = 6 (the paper's CIFAR
    value); the official code's ``KLDivLoss(size_average=False) / batch_size`` is batchmean, so
    no rescaling. As upstream, the natural distribution is not detached in the outer KL.
    """
    x_adv = trades_pgd(unwrap(student), batch.x, eps=attack.eps, step_size=attack.step_size, steps=attack.steps)
    logits_nat = student(batch.x)
    ce = hard_ce(logits_nat, batch)
    robust = F.kl_div(F.log_softmax(student(x_adv), 1), F.softmax(logits_nat, 1), reduction="batchmean")
    loss = ce + cfg.trades_beta * robust
    return LossResult(loss, {"ce": ce.item(), "kl_rob": (cfg.trades_beta * robust).item()})


def ard(student: nn.Module, batch: TrainBatch, cfg: LossConfig, attack: AttackConfig) -> LossResult:
    """ARD (Goldblum et al. 2020): ``alpha*tau^2*KL(T(x)/tau || S(x')/tau) + (1-alpha)*CE(S(x), y)``.

    x' = PGD-CE against the student (uniform start); the teacher sees the natural x. Defaults
    tau = 30, alpha = 1 as in the official ``main.py``. Upstream ``nn.KLDivLoss()`` averages over
    B x K, so its KL is 1/K of our batchmean; with alpha = 1 only the scale (hence the effective
    learning rate) differs. Upstream keeps the student in train mode during the attack; here it
    is in eval mode, as in every other method, so BN statistics are not polluted by x'.
    """
    _require_teacher(batch, "ard", "teacher_logits")
    x_adv = pgd(unwrap(student), batch.x, batch.y, eps=attack.eps, step_size=attack.step_size, steps=attack.steps)
    kd = divergence(student(x_adv), batch.teacher_logits, cfg.ard_temperature, "kl")
    loss = cfg.ard_alpha * kd
    terms = {"kd_adv": (cfg.ard_alpha * kd).item()}
    if cfg.ard_alpha < 1:
        ce = hard_ce(student(batch.x), batch)
        loss = loss + (1 - cfg.ard_alpha) * ce
        terms["ce"] = ((1 - cfg.ard_alpha) * ce).item()
    return LossResult(loss, terms)


RSLAD_W_ROB, RSLAD_W_NAT = 5 / 6, 1 / 6


def rslad(student: nn.Module, batch: TrainBatch, cfg: LossConfig, attack: AttackConfig) -> LossResult:
    """RSLAD (Zi et al. 2021): ``5/6*KL(T(x) || S(x')) + 1/6*KL(T(x) || S(x))``, tau = 1.

    x' ascends KL(S(x') || T(x)) from x + 0.001*N(0,1) (``rslad_inner_loss``). Both terms use only
    the teacher's clean soft label. Upstream averages over B x K (``torch.mean``) and multiplies by
    10 on CIFAR-100 to undo 1/K; batchmean needs neither. Equivalent to DARD with w_adv = 0,
    (w_rob, w_nat) = (5/6, 1/6), divergence kl, and a KL-PGD inner attack.
    """
    _require_teacher(batch, "rslad", "teacher_logits")
    teacher_probs = F.softmax(batch.teacher_logits.float(), 1)
    x_adv = trades_pgd(unwrap(student), batch.x, eps=attack.eps, step_size=attack.step_size, steps=attack.steps,
                       reference_probs=teacher_probs)
    rob = divergence(student(x_adv), batch.teacher_logits, 1.0, "kl")
    nat = divergence(student(batch.x), batch.teacher_logits, 1.0, "kl")
    loss = RSLAD_W_ROB * rob + RSLAD_W_NAT * nat
    return LossResult(loss, {"kd_rob": RSLAD_W_ROB * rob.item(), "kd_nat": RSLAD_W_NAT * nat.item()})


@dataclass(frozen=True)
class RobustTerm:
    """One ``loss.rob_target`` of DARD: how the student's adversarial example x_s is found
    (``attack(student, batch, loss_cfg, attack_cfg) -> x_s``), what R(x_s) is (``term(logits_adv,
    logits_nat, x_s, batch, loss_cfg)``), and what that implies: whether R reads S(x)
    (``natural_logits``), whether it queries the teacher itself at x_s (``online_teacher``), and
    whether its hard-label or self-consistency scale sets the loss's (``hard_label_scaled``: the
    search space then keeps the weights as sampled instead of normalising them)."""

    attack: Callable
    term: Callable
    natural_logits: bool = False
    online_teacher: bool = False
    hard_label_scaled: bool = False


def _towards_teacher(student, batch, cfg, attack):
    """DPGD towards the teacher's natural distribution softmax(T(x))."""
    return dpgd_from_config(unwrap(student), batch.x, F.softmax(batch.teacher_logits.float(), 1), attack)


def _teacher_adv_term(logits_adv, logits_nat, x_adv, batch, cfg):
    if batch.online_teacher is None:
        raise ValueError("loss.rob_target='teacher_adv' queries the teacher at x_s: the run needs the "
                         "teacher model (--teacher, or shards whose manifest names a readable teacher)")
    return divergence(logits_adv, forward_logits(batch.online_teacher, x_adv), cfg.temperature, cfg.divergence)


ROBUST_TERMS: dict[str, RobustTerm] = {
    # RSLAD's form: D_tau(T(x) || S(x_s)), x_s = DPGD towards softmax(T(x))
    "teacher_nat": RobustTerm(
        _towards_teacher, lambda adv, nat, x_adv, b, c: divergence(adv, b.teacher_logits, c.temperature, c.divergence)),
    # TRADES' term: beta * KL(S(x) || S(x_s)), x_s = TRADES' KL attack from S(x); as upstream, S(x) is not detached
    "self": RobustTerm(
        lambda st, b, c, a: trades_pgd(unwrap(st), b.x, eps=a.eps, step_size=a.step_size, steps=a.steps),
        lambda adv, nat, x_adv, b, c: c.trades_beta * F.kl_div(F.log_softmax(adv, 1), F.softmax(nat, 1),
                                                                reduction="batchmean"),
        natural_logits=True, hard_label_scaled=True),
    # AdaAD/IAD's idea: D_tau(T(x_s) || S(x_s)), the teacher queried online at x_s (one forward a step)
    "teacher_adv": RobustTerm(_towards_teacher, _teacher_adv_term, online_teacher=True),
    # SAT's term: CE(S(x_s), y), x_s = PGD-CE against the student
    "label": RobustTerm(
        lambda st, b, c, a: pgd(unwrap(st), b.x, b.y, eps=a.eps, step_size=a.step_size, steps=a.steps),
        lambda adv, nat, x_adv, b, c: hard_ce(adv, b), hard_label_scaled=True),
}
if set(ROBUST_TERMS) != set(ROB_TARGETS):  # the config's choices and these records are one list
    raise RuntimeError(f"dard.losses.ROBUST_TERMS {sorted(ROBUST_TERMS)} != config ROB_TARGETS {sorted(ROB_TARGETS)}")


def dard(student: nn.Module, batch: TrainBatch, cfg: LossConfig, attack: AttackConfig) -> LossResult:
    """DARD (docs/design.md), with D_tau = tau^2 * D(softmax(./tau)) and D in {kl, dice}::

        L = w_adv    * D_tau(T(x_d) || S(x_d))   x_d: DPGD vs the teacher (precomputable)
          + w_rob    * R(x_s)                    x_s: the student's own adversarial example, online
          + w_nat    * D_tau(T(x)   || S(x))
          + w_ce     * CE(S(x), y)
          + w_ce_adv * CE(S(x_s), y)

    ``cfg.rob_target`` chooses R and how x_s is found (:data:`ROBUST_TERMS`): ``teacher_nat``
    D_tau(T(x) || S(x_s)), x_s = DPGD towards softmax(T(x)); ``self`` trades_beta * KL(S(x) ||
    S(x_s)), x_s = TRADES' KL attack (with w_ce = 1, w_rob = 1 and no teacher term this *is*
    TRADES); ``teacher_adv`` D_tau(T(x_s) || S(x_s)), x_s as for teacher_nat, T(x_s) from
    ``batch.online_teacher``; ``label`` CE(S(x_s), y), x_s = PGD-CE against the student (with
    w_rob = 1 and no other term this *is* SAT). The paper's public text fixes only "dual supervision
    from natural and adversarial soft labels" with DPGD examples; the form and defaults are ours
    (``benchmarks/results/``). A zero weight skips its term; with w_rob = w_ce_adv = 0 no online
    attack runs.
    """
    _require_teacher(batch, "dard", "teacher_logits")
    tau, kind = cfg.temperature, cfg.divergence
    robust = ROBUST_TERMS[cfg.rob_target]
    loss = torch.zeros((), device=batch.x.device)
    terms: dict[str, float] = {}

    def add(name: str, term: torch.Tensor) -> None:
        nonlocal loss
        loss = loss + term
        terms[name] = term.item()

    if cfg.w_adv > 0:
        _require_teacher(batch, "dard", "x_teacher_adv", "teacher_logits_adv")
        add("kd_adv", cfg.w_adv * divergence(student(batch.x_teacher_adv), batch.teacher_logits_adv, tau, kind))
    needs_nat = cfg.w_nat > 0 or cfg.w_ce > 0 or (cfg.w_rob > 0 and robust.natural_logits)
    logits_nat = student(batch.x) if needs_nat else None
    if cfg.w_rob > 0 or cfg.w_ce_adv > 0:
        x_student_adv = robust.attack(student, batch, cfg, attack)
        logits_adv = student(x_student_adv)
        if cfg.w_rob > 0:
            add("kd_rob", cfg.w_rob * robust.term(logits_adv, logits_nat, x_student_adv, batch, cfg))
        if cfg.w_ce_adv > 0:
            add("ce_adv", cfg.w_ce_adv * hard_ce(logits_adv, batch))
    if cfg.w_nat > 0:
        add("kd_nat", cfg.w_nat * divergence(logits_nat, batch.teacher_logits, tau, kind))
    if cfg.w_ce > 0:
        add("ce", cfg.w_ce * hard_ce(logits_nat, batch))
    return LossResult(loss, terms)


LOSSES: dict[str, Callable[[nn.Module, TrainBatch, LossConfig, AttackConfig], LossResult]] = {
    "natural": natural, "sat": sat, "trades": trades, "ard": ard, "rslad": rslad, "dard": dard,
}

# What each method needs from the teacher: natural soft labels, and DPGD views + their soft labels.
NEEDS_TEACHER = set(DISTILL_METHODS)


def needs_teacher_adv(cfg: LossConfig) -> bool:
    return cfg.method == "dard" and cfg.w_adv > 0


def needs_online_teacher(cfg: LossConfig) -> bool:
    """The teacher model itself is queried during training (not only its precomputed outputs)."""
    return cfg.method == "dard" and cfg.w_rob > 0 and ROBUST_TERMS[cfg.rob_target].online_teacher


def get_loss(method: str):
    if method not in LOSSES:
        raise ValueError(f"loss.method: {unknown(method, LOSSES)}")
    return LOSSES[method]
