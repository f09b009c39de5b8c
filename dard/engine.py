"""The epoch loop, one training epoch and the evaluation passes: device-, DDP- and AMP-agnostic.

``run_epochs`` is the one epoch loop (lr -> epoch -> scheduler -> validation -> history ->
``on_epoch_end``). It knows nothing of Ray or files: ``dard.training.fit`` passes a callback that
writes the checkpoint and history, the Ray worker (``cluster/train.py``) one that reports to Ray
Train; each DDP rank runs it with its own batches.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from dard.attacks.pgd import cw_inf, pgd
from dard.config import AttackConfig, Config, LossConfig
from dard.data import Dataset, TrainBatch
from dard.logs import percent
from dard.losses import get_loss
from dard.models.registry import unwrap
from dard.progress import progress_bar
from dard.seeding import seed_for


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; training stops before a broken checkpoint is written."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name!r} but CUDA is not available on this machine; use auto or cpu")
    return device


# On a CPU channels_last trains faster once every convolution has 16 or more channels, and slower
# on narrower ones (benchmarks/results/speed-channels-last.md); on CUDA it is used for every model.
CHANNELS_LAST_CPU_MIN_CHANNELS = 16


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """On ``device``, with channels_last weights on CUDA and, when its narrowest convolution has
    ``CHANNELS_LAST_CPU_MIN_CHANNELS`` or more, on a CPU (the same numbers within float rounding)."""
    model = model.to(device)
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    faster = bool(convs) and (device.type == "cuda" or min(convs) >= CHANNELS_LAST_CPU_MIN_CHANNELS)
    return model.to(memory_format=torch.channels_last) if faster else model


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled (no GradScaler needed); a no-op on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def train_epoch(model: nn.Module, batches: Iterable[TrainBatch], optimizer: torch.optim.Optimizer, *,
                loss_cfg: LossConfig, attack_cfg: AttackConfig, device: torch.device, amp: bool = False,
                grad_clip: float | None = None, epoch: int = 0, progress: Callable | None = None) -> dict[str, float]:
    """Train one epoch; returns mean loss, mean of each term, samples and images/s. ``progress(batch,
    loss)`` runs after every optimizer step.

    Raises :class:`NonFiniteLossError` naming the epoch and step on a NaN/Inf loss, before the
    optimizer applies it. Under DDP the decision is taken on the all-reduced gradients, so every
    rank stops at the same step (a rank stopping alone would leave the others in a collective).
    """
    loss_fn = get_loss(loss_cfg.method)
    model.train()
    sums: dict[str, float] = defaultdict(float)
    seen, steps, start = 0, 0, time.perf_counter()
    for step, batch in enumerate(batches):
        batch = batch.to(device)
        with autocast(device, amp):
            result = loss_fn(model, batch, loss_cfg, attack_cfg)
        loss = result.loss
        distributed = model is not unwrap(model)  # DDP: gradients are all-reduced in backward
        if not distributed and not torch.isfinite(loss) or distributed and not _backward_finite(model, loss, optimizer):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step} with method {loss_cfg.method!r} "
                f"(terms: {result.terms}); stopping before it reaches the weights or a checkpoint. "
                "Lower optim.lr, check the teacher's logits, or enable optim.grad_clip.")
        if not distributed:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        n = batch.y.shape[0]
        seen, steps = seen + n, steps + 1
        sums["loss"] += loss.item() * n
        for k, v in result.terms.items():
            sums[k] += v * n
        if progress is not None:
            progress(batch, loss.item())
    elapsed = time.perf_counter() - start
    out = {k: v / max(seen, 1) for k, v in sums.items()}
    out.update(samples=seen, steps=steps, seconds=elapsed, images_per_s=seen / elapsed if elapsed > 0 else math.nan)
    return out


def _backward_finite(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
    """Backward through DDP (every rank joins the all-reduce, whatever its own loss), then whether
    the reduced gradients are finite: the same answer on every rank."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.stack(norms).sum())) if norms else True


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Argmax predictions (N,) for x (N, C, H, W) in [0, 1], eval mode, no grad."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(x[i:i + batch_size].to(device)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def correct_under(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Callable | None = None,
                  batch_size: int = 256) -> torch.Tensor:
    """bool (N,): is each sample classified correctly (after ``attack(model, x, y) -> x_adv``)?"""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        if attack is not None:
            xb = attack(model, xb, yb)
        out.append(predict(model, xb, batch_size).to(yb.device) == yb)
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.bool)


def validation_metrics(model: nn.Module, ds: Dataset, cfg: Config, limit: int | None = None) -> dict[str, float]:
    """Validation accuracies on ``ds[:limit]`` under attack eps/step, k = run.eval_pgd_steps:
    natural, PGD-k (CE), CW-k (margin), and ``val_robust_acc``: the sample survives both.

    ``val_robust_acc`` is what selection uses: PGD-CE alone overstates distilled students, whose
    soft targets leave small logit margins that a margin attack (and AutoAttack's APGD-T) finds.
    """
    ds = ds.head(limit)
    x, y = ds.images.float() / 255, ds.labels
    a, k = cfg.attack, cfg.run.eval_pgd_steps
    nat = correct_under(model, x, y)
    rob_pgd = correct_under(model, x, y, lambda m, xb, yb: pgd(m, xb, yb, eps=a.eps, step_size=a.step_size, steps=k,
                                                               labels_for_early_keep=yb))
    rob_cw = correct_under(model, x, y, lambda m, xb, yb: cw_inf(m, xb, yb, eps=a.eps, step_size=a.step_size, steps=k,
                                                                 labels_for_early_keep=yb))
    return {"val_natural_acc": nat.float().mean().item(), "val_pgd_acc": rob_pgd.float().mean().item(),
            "val_cw_acc": rob_cw.float().mean().item(), "val_robust_acc": (rob_pgd & rob_cw).float().mean().item(),
            "val_samples": len(ds)}


EpochEnd = Callable[[int, dict, list], None]


def run_epochs(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: Config,
               batches: Callable[[int], Iterator[TrainBatch]], *, device: torch.device, steps: int,
               start_epoch: int = 0, history: list | None = None, val: Dataset | None = None, rank: int = 0,
               extra_metrics: dict | None = None, on_epoch_end: EpochEnd | None = None,
               on_step: Callable[[int, int, TrainBatch], None] | None = None, progress: bool = False) -> list[dict]:
    """Train epochs ``start_epoch .. optim.epochs - 1``; returns the history (one dict per epoch).

    ``batches(epoch)``: this rank's batches; ``steps``: how many per epoch (for the bar). Each epoch
    seeds torch from ``seed_for(run.seed, rank, epoch)`` first (attack random starts). Validation
    on ``val`` (rank 0 passes it, others None) every ``run.eval_every`` epochs and at the last.
    ``on_epoch_end(epoch, metrics, history)`` persists or reports; ``on_step(epoch, step, batch)``
    runs after every optimizer step (step counts from 1).
    """
    history = list(history or [])
    for epoch in range(start_epoch, cfg.optim.epochs):
        torch.manual_seed(seed_for(cfg.run.seed, rank, epoch))
        lr = optimizer.param_groups[0]["lr"]
        counter = [0]
        with progress_bar(steps, f"{cfg.loss.method} epoch {epoch + 1}/{cfg.optim.epochs}", enabled=progress) as bar:
            def after_step(batch: TrainBatch, loss: float, _epoch: int = epoch) -> None:
                counter[0] += 1
                bar.update(1, loss=loss)
                if on_step is not None:
                    on_step(_epoch, counter[0], batch)

            stats = train_epoch(model, batches(epoch), optimizer, loss_cfg=cfg.loss, attack_cfg=cfg.attack,
                                device=device, amp=cfg.optim.amp, grad_clip=cfg.optim.grad_clip, epoch=epoch,
                                progress=after_step)
        scheduler.step()
        metrics = {"epoch": epoch, "lr": lr, **(extra_metrics or {}), **{f"train_{k}": v for k, v in stats.items()}}
        if val is not None and ((epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == cfg.optim.epochs):
            metrics.update(validation_metrics(unwrap(model), val, cfg, cfg.run.eval_limit))
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics, history)
    return history


def validation_summary(cfg: Config, metrics: dict) -> str:
    """A command's closing line: the validation accuracies of the epoch its model file holds
    (``selected_epoch``, when ``metrics`` name it), the one that chose it (PGD+CW) included."""
    nan, k = float("nan"), cfg.run.eval_pgd_steps
    said = (f"validation natural {percent(metrics.get('val_natural_acc', nan))}, "
            f"PGD-{k} {percent(metrics.get('val_pgd_acc', nan))}")
    if "val_robust_acc" in metrics:
        said += f", PGD-{k}+CW-{k} {percent(metrics['val_robust_acc'])}"
    if "selected_epoch" in metrics:
        said += f" (the weights of epoch {metrics['selected_epoch'] + 1}/{cfg.optim.epochs}, the best on validation)"
    return said


def epoch_line(cfg: Config, metrics: dict) -> str:
    """The one line a person reads per epoch: loss, validation accuracies in percent, speed."""
    k = cfg.run.eval_pgd_steps
    parts = [f"loss {metrics['train_loss']:.3f}"] if "train_loss" in metrics else []
    parts += [f"{label} {percent(metrics[key])}" for key, label in (
        ("val_natural_acc", "val natural"), ("val_pgd_acc", f"PGD-{k}"), ("val_robust_acc", f"PGD-{k}+CW-{k}"))
        if key in metrics]
    if "train_images_per_s" in metrics:
        parts.append(f"{metrics['train_images_per_s']:.0f} img/s")
    return f"epoch {metrics['epoch'] + 1}/{cfg.optim.epochs}: " + ", ".join(parts)
