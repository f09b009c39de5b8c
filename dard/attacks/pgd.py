"""One L-inf projected-gradient loop; FGSM, BIM, PGD, targeted PGD, T-PGD and CW-inf are settings.

Inputs and outputs are images ``(B, C, H, W)`` float in [0, 1]; ``eps`` and step sizes are on
the same scale (8/255 for CIFAR). Every attack:
- puts the model in eval mode for the attack and restores its previous mode afterwards;
- differentiates with ``torch.autograd.grad`` w.r.t. the input only, so no gradient ever lands
  in the model's parameters (``.grad`` stays untouched);
- returns ``x_adv`` with ``|x_adv - x| <= eps`` and ``0 <= x_adv <= 1``, detached.

The loss callables take ``(logits (B, K), target)`` and return a per-sample loss ``(B,)`` that the
attack *maximises*.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Model in eval mode inside the block (BN uses running stats, samples are independent)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside the block, both restored after: an attack that
    calls ``backward`` (AutoAttack's FAB) then leaves nothing in ``p.grad``."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        with eval_mode(model):
            for p in model.parameters():
                p.requires_grad_(False)
            yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


# ---- per-sample losses to maximise -----------------------------------------------------------

def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def targeted_ce_loss(logits: torch.Tensor, target_classes: torch.Tensor) -> torch.Tensor:
    """Maximising minus CE towards the target class = moving the prediction to it."""
    return -F.cross_entropy(logits, target_classes, reduction="none")


def cw_margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CW-inf margin: max_{j != y} z_j - z_y (positive once the sample is misclassified)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def kl_to_reference_loss(logits: torch.Tensor, reference_probs: torch.Tensor) -> torch.Tensor:
    """KL(reference || softmax(logits)) per sample: TRADES' T-PGD inner loss, RSLAD's with a teacher."""
    return F.kl_div(F.log_softmax(logits, 1), reference_probs, reduction="none").sum(1)


# ---- step-size schedules -----------------------------------------------------------------------

def cosine_step(step_size: float, t: int, steps: int) -> float:
    """Starts at 2*step_size and decays to 0: the same mean step as a constant schedule."""
    return step_size * (1 + math.cos(math.pi * t / steps))


def projected_gradient_attack(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, eps: float,
                              step_size: float, steps: int, loss_fn: LossFn = ce_loss,
                              random_start: str = "uniform", schedule: str = "constant",
                              channel_mask: tuple[int, ...] = (), sample_weight_fn=None,
                              labels_for_early_keep: torch.Tensor | None = None,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """Maximise ``loss_fn(model(x_adv), target)`` over the L-inf ball of radius ``eps`` around ``x``.

    Args:
        x: (B, C, H, W) float in [0, 1]. target: whatever ``loss_fn`` takes (labels or probabilities).
        random_start: ``uniform`` (U(-eps, eps), Madry PGD), ``normal`` (0.001*N(0,1), TRADES/RSLAD)
            or ``none`` (FGSM/BIM).
        schedule: ``constant``; ``cosine`` (see :func:`cosine_step`); ``apgd``: per-sample step
            starting at 2*step_size, halved at checkpoints where the best loss improved in fewer than
            75 % of the steps since the last one, restarting from the best point (APGD, Croce & Hein
            2020, condition 1, without momentum). With ``apgd`` the best-loss iterate is returned.
        channel_mask: input channels whose gradient is zeroed (DPGD's channel-wise masking).
        sample_weight_fn: ``(logits, t) -> (B,)`` weights on the per-sample loss (SegPGD weighting).
        labels_for_early_keep: if given (evaluation), a sample keeps the first iterate that
            misclassifies it (``argmax != label``), so a later step cannot undo a success.
    Returns: x_adv, detached, same shape as x.
    """
    if steps == 0:
        return x.detach().clone()
    x = x.detach()
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    if random_start == "uniform":
        noise = (torch.rand(x.shape, generator=generator, device="cpu").to(x.device) * 2 - 1) * eps
    elif random_start == "normal":
        noise = 0.001 * torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
    elif random_start == "none":
        noise = torch.zeros_like(x)
    else:
        raise ValueError(f"random_start must be uniform, normal or none, got {random_start!r}")
    x_adv = torch.max(torch.min(x + noise, upper), lower)
    batch = x.shape[0]
    view = (batch,) + (1,) * (x.dim() - 1)
    apgd = schedule == "apgd"
    if apgd:
        per_sample_step = torch.full((batch,), 2 * step_size, device=x.device)
        checkpoint_every = max(2, math.ceil(0.2 * steps))
        best_loss = torch.full((batch,), float("-inf"), device=x.device)
        best_x = x_adv.clone()
        improved_count = torch.zeros(batch, device=x.device)
        best_at_last_checkpoint = best_loss.clone()
    elif schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be constant, cosine or apgd, got {schedule!r}")
    keep = labels_for_early_keep
    result = x_adv.clone() if keep is not None else None
    done = torch.zeros(batch, dtype=torch.bool, device=x.device)

    with eval_mode(model), torch.enable_grad():
        for t in range(steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            per_sample = loss_fn(logits, target)
            if keep is not None:
                fooled = (logits.argmax(1) != keep) & ~done
                result[fooled] = x_adv.detach()[fooled]
                done |= fooled
            if apgd:
                current = per_sample.detach()
                better = current > best_loss
                improved_count += better.float()
                best_x[better] = x_adv.detach()[better]
                best_loss = torch.where(better, current, best_loss)
            objective = per_sample if sample_weight_fn is None else per_sample * sample_weight_fn(logits.detach(), t)
            if objective.requires_grad:
                grad, = torch.autograd.grad(objective.sum(), x_adv, allow_unused=True)
            else:
                grad = None
            if grad is None:  # output does not depend on the input (a fully masked model): no move
                grad = torch.zeros_like(x_adv)
            if channel_mask:
                grad[:, list(channel_mask)] = 0
            if apgd:
                step = per_sample_step.view(view)
            elif schedule == "cosine":
                step = cosine_step(step_size, t, steps)
            else:
                step = step_size
            x_adv = x_adv.detach() + step * grad.sign()
            x_adv = torch.max(torch.min(x_adv, upper), lower)
            if apgd and (t + 1) % checkpoint_every == 0 and t + 1 < steps:
                stalled = (improved_count < 0.75 * checkpoint_every) | (best_loss <= best_at_last_checkpoint)
                per_sample_step = torch.where(stalled, per_sample_step / 2, per_sample_step)
                x_adv[stalled] = best_x[stalled]
                improved_count.zero_()
                best_at_last_checkpoint = best_loss.clone()
        if apgd:  # score the final iterate too (the loop scored iterates 0..steps-1)
            with torch.no_grad():
                better = loss_fn(model(x_adv), target) > best_loss
            best_x[better] = x_adv[better]
            x_adv = best_x
        if keep is not None:
            result[~done] = x_adv[~done]
            x_adv = result
    return x_adv.detach()


# ---- named attacks (torchattacks-style uniform call: attack(model, x, y) -> x_adv) -----------

def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, **kw) -> torch.Tensor:
    """Goodfellow et al. 2015: one signed-gradient step of size eps, no random start."""
    return projected_gradient_attack(model, x, y, eps=eps, step_size=eps, steps=1, random_start="none", **kw)


def bim(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int = 10, **kw) -> torch.Tensor:
    """Kurakin et al. 2017: iterative FGSM from the clean point (no random start)."""
    return projected_gradient_attack(model, x, y, eps=eps, step_size=step_size, steps=steps, random_start="none", **kw)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int = 20, **kw) -> torch.Tensor:
    """Madry et al. 2018: CE ascent from a uniform random start."""
    return projected_gradient_attack(model, x, y, eps=eps, step_size=step_size, steps=steps, random_start="uniform", **kw)


def cw_inf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int = 20, **kw) -> torch.Tensor:
    """CW-inf: PGD on the Carlini-Wagner margin loss (not the CW-L2 optimisation attack)."""
    return projected_gradient_attack(model, x, y, eps=eps, step_size=step_size, steps=steps, loss_fn=cw_margin_loss,
                                     random_start="uniform", **kw)


def trades_pgd(model: nn.Module, x: torch.Tensor, eps: float, step_size: float, steps: int = 10,
               reference_probs: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """T-PGD (TRADES' inner maximisation): ascend KL(f(x) || f(x')) from x + 0.001*N(0, 1).

    ``reference_probs`` defaults to the model's own clean prediction; pass a teacher's soft labels
    to get RSLAD's inner attack. Needs no labels.
    """
    if reference_probs is None:
        with torch.no_grad(), eval_mode(model):
            reference_probs = F.softmax(model(x), 1)
    return projected_gradient_attack(model, x, reference_probs, eps=eps, step_size=step_size, steps=steps,
                                     loss_fn=kl_to_reference_loss, random_start="normal", **kw)


def targeted_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int = 20,
                 target_classes: torch.Tensor | None = None, num_classes: int | None = None,
                 generator: torch.Generator | None = None, **kw) -> torch.Tensor:
    """Targeted PGD towards ``target_classes`` (default: a random wrong class per sample, seeded)."""
    if target_classes is None:
        if num_classes is None:
            with torch.no_grad(), eval_mode(model):
                num_classes = model(x[:1]).shape[1]
        offset = torch.randint(1, num_classes, y.shape, generator=generator).to(y.device)
        target_classes = (y + offset) % num_classes
    return projected_gradient_attack(model, x, target_classes, eps=eps, step_size=step_size, steps=steps,
                                     loss_fn=targeted_ce_loss, random_start="uniform", generator=generator, **kw)
