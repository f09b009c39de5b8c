"""One training epoch and one evaluation pass: device-agnostic, DDP-agnostic, AMP-ready.

The loops know nothing of Ray: ``cluster/train.py`` calls them inside each DDP worker with its
own rank's batches, the single-process CLI calls them directly.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn

from dard.config import AttackConfig, LossConfig
from dard.losses import TrainBatch, get_loss


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


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled (no GradScaler needed); a no-op on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def train_epoch(model: nn.Module, batches: Iterable[TrainBatch], optimizer: torch.optim.Optimizer, *,
                loss_cfg: LossConfig, attack_cfg: AttackConfig, device: torch.device, amp: bool = False,
                grad_clip: float | None = None, epoch: int = 0, progress: Callable | None = None) -> dict[str, float]:
    """Train one epoch; returns mean loss, mean of each term, samples and images/s.

    Raises :class:`NonFiniteLossError` naming the epoch and step on a NaN/Inf loss, before the
    optimizer applies it.
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
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step} with method {loss_cfg.method!r} "
                f"(terms: {result.terms}); stopping before it reaches the weights or a checkpoint. "
                "Lower optim.lr, check the teacher's logits, or enable optim.grad_clip.")
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
            progress(n, loss.item())
    elapsed = time.perf_counter() - start
    out = {k: v / max(seen, 1) for k, v in sums.items()}
    out.update(samples=seen, steps=steps, seconds=elapsed, images_per_s=seen / elapsed if elapsed > 0 else math.nan)
    return out


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
