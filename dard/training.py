"""Single-process training of a teacher (natural/SAT/TRADES) or a student (DARD/ARD/RSLAD/...).

``fit`` is what ``dard train-teacher`` and ``dard distill`` run: build from the config, resume
from ``<out_dir>/checkpoint.pt`` if asked, one checkpoint per epoch, a final model file
``<out_dir>/model.pt`` and ``<out_dir>/history.jsonl`` (one JSON line per epoch). The pieces it
uses (optimizer, schedule, batch streams, validation) are shared with ``cluster/train.py``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from dard.attacks.pgd import cw_inf, pgd
from dard.checkpoint import check_resumable, checkpoint_state, load_checkpoint, restore, save_checkpoint
from dard.config import IMAGE_SHAPE, NUM_CLASSES, Config, save_yaml, to_dict
from dard.data import ArrayDataset, iterate_batches, num_batches, load_splits
from dard.engine import correct_under, resolve_device, train_epoch
from dard.losses import NEEDS_TEACHER, TrainBatch, needs_online_teacher, needs_teacher_adv
from dard.models import arch_kwargs, build_for, file_sha256, load_teacher, save_model
from dard.progress import progress_bar
from dard.teacher import teacher_outputs

log = logging.getLogger("dard")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov and o.momentum > 0)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: ``multistep`` (/10 at each milestone fraction), ``cosine``, ``onecycle``
    (linear warm-up over the first 30 % of epochs to lr, then linear decay to ~0) or ``constant``."""
    o = cfg.optim
    if o.lr_schedule == "multistep":
        marks = [int(round(f * o.epochs)) for f in o.milestones]
        factor = lambda e: 0.1 ** sum(e >= m for m in marks)  # noqa: E731
    elif o.lr_schedule == "cosine":
        factor = lambda e: 0.5 * (1 + math.cos(math.pi * e / o.epochs))  # noqa: E731
    elif o.lr_schedule == "onecycle":
        warm = max(1, round(0.3 * o.epochs))
        factor = lambda e: (e + 1) / warm if e < warm else (o.epochs - e) / max(1, o.epochs - warm)  # noqa: E731
    else:
        factor = lambda e: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Shuffle/augment randomness derived from (seed, epoch, rank): a resumed epoch replays exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)


def online_batches(ds: ArrayDataset, cfg: Config, epoch: int, teacher: nn.Module | None, device: torch.device,
                   batch_size: int | None = None) -> Iterator[TrainBatch]:
    """Training batches for one epoch from memory, teacher outputs computed on the fly."""
    gen = epoch_generator(cfg.run.seed, epoch)
    with_adv = needs_teacher_adv(cfg.loss)
    for x, y, _ in iterate_batches(ds, batch_size or cfg.optim.batch_size, shuffle=True, augment=cfg.data,
                                   generator=gen, drop_last=len(ds) > (batch_size or cfg.optim.batch_size)):
        batch = TrainBatch(x, y)
        if teacher is not None:
            out = teacher_outputs(teacher, x.to(device), y.to(device), cfg.attack, with_adv)
            batch = TrainBatch(x, y, **out)
        yield batch


def open_shards(directory: str, cfg: Config, teacher_path: str | Path | None = None, check: str = "full"):
    """A :class:`ShardReader` checked against the run (dataset, classes, eps, teacher if given)."""
    from dard.shards import ShardReader

    reader = ShardReader(directory, check=check)
    raw = to_dict(cfg)
    reader.check_compatible(dataset=cfg.data.dataset, num_classes=NUM_CLASSES[cfg.data.dataset], eps=cfg.attack.eps,
                            data=raw["data"], attack=raw["attack"],
                            teacher_sha256=file_sha256(teacher_path) if teacher_path else None)
    if reader.manifest["split"] != "train":
        raise ValueError(f"{directory}: holds the {reader.manifest['split']!r} split; training needs 'train' shards")
    return reader


def shard_batches(reader, cfg: Config, rank: int = 0, world_size: int = 1, batch_size: int | None = None):
    """``(epoch -> iterator of TrainBatch, steps per epoch)`` for this rank, from the shards."""
    local = batch_size or cfg.optim.batch_size

    def source(epoch: int) -> Iterator[TrainBatch]:
        return (b.to_train_batch() for b in reader.batches(epoch, local, rank, world_size, seed=cfg.run.seed))

    return source, reader.steps_per_epoch(local, world_size)


def validate(model: nn.Module, ds: ArrayDataset, cfg: Config, limit: int | None = None) -> dict[str, float]:
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


def load_run_teacher(path: str | Path, cfg: Config, teacher_arch: str | None = None) -> tuple[nn.Module, dict]:
    """The distillation teacher, checked against the run's dataset (classes and channels)."""
    dataset = cfg.data.dataset
    model, header = load_teacher(path, teacher_arch, NUM_CLASSES[dataset], IMAGE_SHAPE[dataset][0])
    header["sha256"] = file_sha256(path)
    header["path"] = str(path)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, header


def online_teacher_for(cfg: Config, teacher_path: str | Path | None, device: torch.device,
                       expected_sha256: str | None = None, teacher_arch: str | None = None) -> nn.Module | None:
    """The frozen teacher on ``device`` when the loss queries it online (``rob_target='teacher_adv'``),
    else None. ``expected_sha256`` (from a shard manifest) must match the file, so the online
    teacher is the one whose soft labels the shards hold."""
    if not needs_online_teacher(cfg.loss):
        return None
    if teacher_path is None or not Path(teacher_path).is_file():
        raise ValueError(f"loss.rob_target='teacher_adv' queries the teacher online, but no teacher file is readable "
                         f"at {teacher_path}: pass --teacher PATH (the file the shards were built from)")
    teacher, header = load_run_teacher(teacher_path, cfg, teacher_arch)
    if expected_sha256 is not None and header["sha256"] != expected_sha256:
        raise ValueError(f"{teacher_path}: sha256 {header['sha256'][:12]}... is not the shards' teacher "
                         f"({expected_sha256[:12]}...)")
    return teacher.to(device).eval()


def fit(cfg: Config, *, teacher_path: str | Path | None = None, teacher_arch: str | None = None, resume: bool = False,
        batch_source: Callable[[int], Iterator[TrainBatch]] | None = None, batches_per_epoch: int | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None, extra_meta: dict | None = None) -> dict:
    """Train per ``cfg`` in this process; returns the last epoch's metrics plus paths.

    ``batch_source(epoch)`` replaces the in-memory online batches (used for training from
    shards); teacher outputs then come from the source. Distillation methods need either a
    ``teacher_path`` or a ``batch_source``.
    """
    cfg.validate()
    out_dir = Path(cfg.run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out_dir / "config.yaml")
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    splits = load_splits(cfg.data)
    model = build_for(cfg.model, cfg.data.dataset).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    teacher, teacher_header = None, None
    if cfg.loss.method in NEEDS_TEACHER and batch_source is None:
        if teacher_path is None:
            raise ValueError(f"method {cfg.loss.method!r} distils from a teacher: pass --teacher PATH (or --shards DIR)")
        teacher, teacher_header = load_run_teacher(teacher_path, cfg, teacher_arch)
        teacher = teacher.to(device)
    online_teacher = teacher if teacher is not None and needs_online_teacher(cfg.loss) else \
        online_teacher_for(cfg, teacher_path, device, teacher_arch=teacher_arch)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    ckpt_path = out_dir / "checkpoint.pt"
    history: list[dict] = []
    start_epoch = 0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        check_resumable(state, to_dict(cfg), ckpt_path)
        start_epoch = restore(state, model, optimizer, scheduler)
        history = list(state.get("history", []))
        log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    elif resume:
        log.info("no checkpoint at %s; starting from scratch", ckpt_path)

    n_batches = batches_per_epoch or num_batches(len(splits.train), cfg.optim.batch_size,
                                                 drop_last=len(splits.train) > cfg.optim.batch_size)
    metrics: dict = history[-1] if history else {}
    for epoch in range(start_epoch, cfg.optim.epochs):
        lr = optimizer.param_groups[0]["lr"]
        batches = batch_source(epoch) if batch_source else online_batches(splits.train, cfg, epoch, teacher, device)
        if online_teacher is not None:
            batches = (dataclasses.replace(b, online_teacher=online_teacher) for b in batches)
        with progress_bar(n_batches, f"{cfg.loss.method} epoch {epoch + 1}/{cfg.optim.epochs}",
                          enabled=cfg.run.progress) as bar:
            train_metrics = train_epoch(model, batches, optimizer, loss_cfg=cfg.loss, attack_cfg=cfg.attack,
                                        device=device, amp=cfg.optim.amp, grad_clip=cfg.optim.grad_clip, epoch=epoch,
                                        progress=lambda n, loss: bar.update(1, loss=loss))
        scheduler.step()
        metrics = {"epoch": epoch, "lr": lr, **{f"train_{k}": v for k, v in train_metrics.items()}}
        if (epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == cfg.optim.epochs:
            metrics.update(validate(model, splits.val, cfg, cfg.run.eval_limit))
        history.append(metrics)
        save_checkpoint(ckpt_path, checkpoint_state(model, optimizer, scheduler, epoch, to_dict(cfg), history,
                                                    {"teacher": teacher_header}))
        # rewritten whole each epoch, so a resumed run never duplicates or loses a line
        (out_dir / "history.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
        log.info("epoch %d: %s", epoch + 1, _brief(metrics))
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)

    meta = {"method": cfg.loss.method, "config": to_dict(cfg), "final_metrics": metrics,
            "teacher": {k: teacher_header[k] for k in ("arch", "sha256", "path") if k in teacher_header}
            if teacher_header else None, **(extra_meta or {})}
    model_path = save_model(out_dir / "model.pt", model, arch=cfg.model.arch, num_classes=NUM_CLASSES[cfg.data.dataset],
                            in_channels=IMAGE_SHAPE[cfg.data.dataset][0], dataset=cfg.data.dataset,
                            arch_kwargs=arch_kwargs(cfg.model), meta=meta)
    return {**metrics, "model_path": str(model_path), "checkpoint_path": str(ckpt_path), "out_dir": str(out_dir)}


def _brief(m: dict) -> str:
    keys = ("train_loss", "val_natural_acc", "val_pgd_acc", "val_robust_acc", "train_images_per_s")
    return ", ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)
