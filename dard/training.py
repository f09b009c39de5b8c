"""Single-process training of a teacher (natural/SAT/TRADES) or a student (DARD/ARD/RSLAD/...).

``fit`` is what ``dard train-teacher`` and ``dard distill`` run: build from the config, resume
from ``<out_dir>/checkpoint.pt`` if asked, one checkpoint per epoch, a final model file
``<out_dir>/model.pt`` and ``<out_dir>/history.jsonl`` (one JSON line per epoch). The epoch loop
is ``dard.engine.run_epochs``; the pieces around it (optimizer, schedule, batch streams, teacher
loading) are shared with ``cluster/train.py``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from dard.checkpoint import check_resumable, checkpoint_state, load_checkpoint, restore, save_checkpoint
from dard.config import Config, save_yaml, to_dict
from dard.data import ArrayDataset, TrainBatch, iterate_batches, num_batches, load_splits
from dard.engine import epoch_line, place_model, resolve_device, run_epochs
from dard.losses import NEEDS_TEACHER, needs_online_teacher, needs_teacher_adv
from dard.models import build_for, file_sha256, load_teacher_for, save_for
from dard.seeding import epoch_generator, seed_everything
from dard.teacher import teacher_outputs

log = logging.getLogger("dard")


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


def with_online_teacher(source: Callable[[int], Iterator[TrainBatch]],
                        teacher: nn.Module | None) -> Callable[[int], Iterator[TrainBatch]]:
    """``source`` with the online teacher attached to every batch (``rob_target='teacher_adv'``);
    ``source`` itself when there is none."""
    if teacher is None:
        return source
    return lambda epoch: (dataclasses.replace(b, online_teacher=teacher) for b in source(epoch))


def open_shards(directory: str, cfg: Config, teacher_path: str | Path | None = None, check: str = "full"):
    """A :class:`ShardReader` checked against the run (dataset, classes, eps, teacher if given)."""
    from dard.shards import ShardReader

    reader = ShardReader(directory, check=check)
    raw = to_dict(cfg)
    reader.check_compatible(dataset=cfg.data.dataset, num_classes=cfg.data.num_classes, eps=cfg.attack.eps,
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


def load_run_teacher(path: str | Path, cfg: Config, teacher_arch: str | None = None) -> tuple[nn.Module, dict]:
    """The distillation teacher, checked against the run's dataset (classes and channels)."""
    model, header = load_teacher_for(path, cfg.data, teacher_arch)
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
    seed_everything(cfg.run.seed)  # the initial weights
    device = resolve_device(cfg.run.device)
    splits = load_splits(cfg.data)
    model = place_model(build_for(cfg.model, cfg.data), device)
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

    batches = with_online_teacher(batch_source or (lambda e: online_batches(splits.train, cfg, e, teacher, device)),
                                  online_teacher)

    def persist(epoch: int, metrics: dict, history: list) -> None:
        save_checkpoint(ckpt_path, checkpoint_state(model, optimizer, scheduler, epoch, to_dict(cfg), history,
                                                    {"teacher": teacher_header}))
        # rewritten whole each epoch, so a resumed run never duplicates or loses a line
        (out_dir / "history.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
        log.info(epoch_line(cfg, metrics))
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)

    steps = batches_per_epoch or num_batches(len(splits.train), cfg.optim.batch_size,
                                             drop_last=len(splits.train) > cfg.optim.batch_size)
    history = run_epochs(model, optimizer, scheduler, cfg, batches, device=device, steps=steps, start_epoch=start_epoch,
                         history=history, val=splits.val, on_epoch_end=persist, progress=cfg.run.progress)
    metrics = history[-1] if history else {}

    meta = {"method": cfg.loss.method, "config": to_dict(cfg), "final_metrics": metrics,
            "teacher": {k: teacher_header[k] for k in ("arch", "sha256", "path") if k in teacher_header}
            if teacher_header else None, **(extra_meta or {})}
    model_path = save_for(out_dir / "model.pt", model, cfg.model, cfg.data, meta)
    return {**metrics, "model_path": str(model_path), "checkpoint_path": str(ckpt_path), "out_dir": str(out_dir)}
