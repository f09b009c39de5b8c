"""Training a teacher (natural/SAT/TRADES) or a student (DARD/ARD/RSLAD/...): one run assembly.

:func:`prepare` builds everything a training process needs from the config -- model, optimizer,
schedule, this rank's batches (in memory with the teacher run online, or from soft-label shards),
the online-teacher rule, validation data -- and :meth:`Run.resume` is the one resume check.
``fit`` (``dard train-teacher``, ``dard distill``, the benchmarks, the demo) and the Ray Train
worker (``cluster/train.py``) are both ``prepare`` -> resume -> ``Run.epochs`` -> persist: ``fit``
writes ``<out_dir>/checkpoint.pt`` each epoch, ``<out_dir>/history.jsonl`` and ``<out_dir>/model.pt``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from dard.checkpoint import (check_resumable, checkpoint_state, load_checkpoint, note_best, restore, save_checkpoint,
                             selected, selection_metric)
from dard.config import Config, save_yaml, to_dict
from dard.data import Dataset, Splits, TrainBatch, iterate_batches, load_splits, num_batches
from dard.engine import epoch_line, place_model, resolve_device, run_epochs
from dard.lineage import data_record, shards_record
from dard.losses import NEEDS_TEACHER, needs_online_teacher, needs_teacher_adv
from dard.modelfile import save_for
from dard.models import build_for, file_sha256, load_teacher_for
from dard.seeding import epoch_generator, seed_everything
from dard.shards import ShardSet, agreed, check_fingerprint, epoch_batches, rank_plan
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


def online_batches(ds: Dataset, cfg: Config, epoch: int, teacher: nn.Module | None, device: torch.device,
                   batch_size: int | None = None) -> Iterator[TrainBatch]:
    """Training batches for one epoch from memory, teacher outputs computed on the fly."""
    gen = epoch_generator(cfg.run.seed, epoch)
    with_adv = needs_teacher_adv(cfg.loss)
    for x, y, index in iterate_batches(ds, batch_size or cfg.optim.batch_size, shuffle=True, augment=cfg.data,
                                       generator=gen, drop_last=len(ds) > (batch_size or cfg.optim.batch_size)):
        batch = TrainBatch(x, y, index=index)
        if teacher is not None:
            out = teacher_outputs(teacher, x.to(device), y.to(device), cfg.attack, with_adv)
            batch = TrainBatch(x, y, index=index, **out)
        yield batch


def with_online_teacher(source: Callable[[int], Iterator[TrainBatch]],
                        teacher: nn.Module | None) -> Callable[[int], Iterator[TrainBatch]]:
    """``source`` with the online teacher attached to every batch (``rob_target='teacher_adv'``);
    ``source`` itself when there is none."""
    if teacher is None:
        return source
    return lambda epoch: (dataclasses.replace(b, online_teacher=teacher) for b in source(epoch))


def open_shards(directory: str | ShardSet, cfg: Config, teacher_path: str | Path | None = None,
                splits: Splits | None = None) -> ShardSet:
    """The shards a run trains from, checked once here and then passed down as they are: every
    part's size and unit digests, the manifest against the run (dataset, classes, the pinned data
    and attack fields, the teacher if given), the manifest's fingerprint against its own fields,
    and for a preset every row against the run's own training split and pool (``splits``: the
    run's, if loaded), whatever the manifest says. A :class:`ShardSet` given is taken as checked."""
    if isinstance(directory, ShardSet):
        return directory
    shards = ShardSet.open(str(directory), full=True)
    raw = to_dict(cfg)
    shards.check_compatible(dataset=cfg.data.dataset, num_classes=cfg.data.num_classes, data=raw["data"],
                            attack=raw["attack"], teacher_sha256=file_sha256(teacher_path) if teacher_path else None)
    if shards.manifest["split"] != "train":
        raise ValueError(f"{directory}: holds the {shards.manifest['split']!r} split; training needs 'train' shards")
    if cfg.data.preset:
        splits = splits or load_splits(cfg.data)
        shards.check_rows(splits, "train", cfg.data.crop_padding)
    check_fingerprint(shards.directory, shards.manifest)
    return shards


def shard_batches(shards: ShardSet, cfg: Config, rank: int = 0, world_size: int = 1, batch_size: int | None = None):
    """``(epoch -> iterator of TrainBatch, steps per epoch)`` for this rank, streamed from the shards
    (:mod:`dard.shards.stream`); under DDP every rank agrees before each step that its read succeeded."""
    plan = rank_plan(shards, rank=rank, world=world_size, seed=cfg.run.seed,
                     batch_size=batch_size or cfg.optim.batch_size, pool_share=cfg.data.pool_share,
                     window=cfg.data.shuffle_window, steps_per_epoch=cfg.optim.steps_per_epoch)
    loss = cfg.loss

    def source(epoch: int) -> Iterator[TrainBatch]:
        return (b.to_train_batch(loss.pseudo_labels, loss.pseudo_threshold)
                for b in agreed(epoch_batches(plan, epoch)))

    return source, plan.steps


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


@dataclass
class Run:
    """One training process (or one DDP rank), assembled by :func:`prepare`.

    ``batches(epoch)`` yields this rank's :class:`TrainBatch` es, ``steps`` of them; ``val`` is the
    validation split on rank 0 (None elsewhere); ``teacher``/``shards`` say where the teacher's
    outputs come from (``{"arch", "sha256", "path"}``, ``{"directory", "fingerprint"}``) and are
    recorded in every checkpoint and in the model file, with ``data``, what the training split is.
    """

    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    batches: Callable[[int], Iterator[TrainBatch]]
    steps: int
    val: Dataset | None
    teacher: dict | None = None
    shards: dict | None = None
    data: dict | None = None  # the training split's lineage record (dard.lineage.data_record), rank 0
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # the best epoch so far and its weights (dard.checkpoint.note_best)

    def resume(self, state: dict, where: str | Path) -> None:
        """Continue from a checkpoint ``state`` (read from ``where``); refuses one written under
        another config (:func:`dard.checkpoint.check_resumable`)."""
        check_resumable(state, to_dict(self.cfg), where)
        self.start_epoch = restore(state, self.model, self.optimizer, self.scheduler)
        self.history = list(state.get("history", []))
        self.best = (state.get("extra") or {}).get("best")
        log.info("resumed from %s at epoch %d", where, self.start_epoch)

    def checkpoint(self, epoch: int, history: list[dict]) -> dict:
        """The checkpoint state after ``epoch`` (0-based, finished)."""
        return checkpoint_state(self.model, self.optimizer, self.scheduler, epoch, to_dict(self.cfg), history,
                                {"teacher": self.teacher, "shards": self.shards, "data": self.data, "best": self.best})

    def epochs(self, on_epoch_end: Callable[[int, dict, list], None], **kwargs) -> list[dict]:
        """``dard.engine.run_epochs`` from ``start_epoch``, noting the best epoch before
        ``on_epoch_end`` persists it; returns the whole history."""
        def noted(epoch: int, metrics: dict, history: list) -> None:
            self.best = note_best(self.best, epoch, metrics, self.model, selection_metric(self.cfg.loss.method))
            on_epoch_end(epoch, metrics, history)

        return run_epochs(self.model, self.optimizer, self.scheduler, self.cfg, self.batches, device=self.device,
                          steps=self.steps, start_epoch=self.start_epoch, history=self.history, val=self.val,
                          on_epoch_end=noted, **kwargs)

    def save_model(self, path: str | Path, history: list[dict], extra_meta: dict | None = None) -> tuple[Path, dict]:
        """The model file of the selected epoch (:func:`dard.checkpoint.selected`): weights,
        architecture, the run's config, teacher, shards, that epoch's metrics and which it was."""
        return save_selected(path, self.checkpoint(len(history) - 1, history), self.cfg, extra_meta)


def save_selected(path: str | Path, state: dict, cfg: Config, extra_meta: dict | None = None) -> tuple[Path, dict]:
    """The model file a run ships, from its last checkpoint ``state``: the selected epoch's weights
    with that epoch's metrics (``final_metrics``), its number (``selected_epoch``) and the last
    epoch's metrics (``last_metrics``). ``fit`` and the Ray Train driver both write it here.
    Returns (path, the file's meta)."""
    weights, epoch = selected(state)
    history = state.get("history") or []
    model = build_for(cfg.model, cfg.data)
    model.load_state_dict(weights)
    extra = state.get("extra") or {}
    meta = {"method": cfg.loss.method, "config": to_dict(cfg),
            "final_metrics": next((h for h in history if h.get("epoch") == epoch), {}), "selected_epoch": epoch,
            "last_metrics": history[-1] if history else {}, "teacher": extra.get("teacher"),
            "shards": extra.get("shards"), "data": extra.get("data"), **(extra_meta or {})}
    return save_for(path, model, cfg, meta), meta


def prepare(cfg: Config, *, teacher_path: str | Path | None = None, teacher_arch: str | None = None,
            shards: str | Path | ShardSet | None = None, rank: int = 0, world_size: int = 1,
            device: torch.device | None = None) -> Run:
    """Assemble a run from ``cfg`` for ``rank`` of ``world_size`` (DDP ranks stream ``shards``).

    Teacher outputs come from ``shards`` when given (a directory, checked here, or a
    :class:`ShardSet` a driver checked; a ``teacher_path`` must then be the shards' teacher), else
    from the teacher at ``teacher_path`` run online (distillation methods need one; only labeled
    samples are trained on). A loss that queries the teacher itself (``rob_target='teacher_adv'``)
    loads it either way, checked by sha256 against the shards. ``optim.batch_size`` is global: each
    rank takes ``batch_size / world_size``. Raises ValueError naming what is missing or inconsistent.
    """
    seed_everything(cfg.run.seed)  # the initial weights (DDP broadcasts rank 0's anyway)
    device = device or resolve_device(cfg.run.device)
    model = place_model(build_for(cfg.model, cfg.data), device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    if cfg.optim.batch_size % world_size:
        raise ValueError(f"optim.batch_size {cfg.optim.batch_size} is not divisible by {world_size} workers")
    local = cfg.optim.batch_size // world_size
    splits = load_splits(cfg.data) if shards is None or rank == 0 else None
    if shards is not None:
        checked = open_shards(shards, cfg, teacher_path, splits=splits)
        source, steps = shard_batches(checked, cfg, rank, world_size, local)
        if steps == 0:
            raise ValueError(f"{checked.samples('labeled') + checked.samples('pool')} samples are too few for a global "
                             f"batch of {cfg.optim.batch_size}")
        made_by = checked.manifest["teacher"]
        teacher = {k: made_by.get(k) for k in ("arch", "sha256", "path")}
        shard_info = shards_record(checked)
        # Everything else the teacher contributes is in the shards; an online teacher is the shards'
        # own file unless teacher_path names one, and must be the file they were built from.
        online = online_teacher_for(cfg, teacher_path or made_by.get("path"), device,
                                    expected_sha256=made_by.get("sha256"), teacher_arch=teacher_arch)
    else:
        if world_size > 1:
            raise ValueError("distributed training reads its batches from shards: pass shards=")
        if cfg.optim.steps_per_epoch is not None or cfg.data.pool_share is not None:
            raise ValueError("optim.steps_per_epoch and data.pool_share apply to training from shards (--shards); "
                             "in memory an epoch is one pass over the labeled samples")
        loaded, teacher, shard_info = None, None, None
        if cfg.loss.method in NEEDS_TEACHER:
            if teacher_path is None:
                raise ValueError(f"method {cfg.loss.method!r} distils from a teacher: pass --teacher PATH "
                                 "(or --shards DIR)")
            loaded, header = load_run_teacher(teacher_path, cfg, teacher_arch)
            loaded = loaded.to(device)
            teacher = {k: header[k] for k in ("arch", "sha256", "path") if k in header}
        online = (loaded.eval() if loaded is not None and needs_online_teacher(cfg.loss) else
                  online_teacher_for(cfg, teacher_path, device, teacher_arch=teacher_arch))
        train = splits.train
        source = lambda epoch: online_batches(train, cfg, epoch, loaded, device)  # noqa: E731
        steps = num_batches(len(train), local, drop_last=len(train) > local)
    # rank 0 validates on the first eval_limit samples: decoded once (a source's), kept for every epoch
    val = splits.val.head(cfg.run.eval_limit) if rank == 0 else None
    return Run(cfg, model, optimizer, scheduler, device, with_online_teacher(source, online), steps, val,
               teacher, shard_info, data_record(cfg, splits.train, val) if rank == 0 else None)


def fit(cfg: Config, *, teacher_path: str | Path | None = None, teacher_arch: str | None = None,
        shards: str | Path | None = None, resume: bool = False,
        on_epoch_end: Callable[[int, dict], None] | None = None, extra_meta: dict | None = None) -> dict:
    """Train per ``cfg`` in this process (see :func:`prepare` for ``teacher_path``/``shards``);
    resume from ``<run.out_dir>/checkpoint.pt`` when ``resume``. Returns the selected epoch's
    metrics (best validation robust accuracy; the model file holds its weights) plus
    ``selected_epoch``, ``model_path``, ``checkpoint_path`` and ``out_dir``."""
    out_dir = Path(cfg.run.out_dir)
    run = prepare(cfg, teacher_path=teacher_path, teacher_arch=teacher_arch, shards=shards)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out_dir / "config.yaml")
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.exists():
        run.resume(load_checkpoint(ckpt_path), ckpt_path)
    elif resume:
        log.info("no checkpoint at %s; starting from scratch", ckpt_path)

    def persist(epoch: int, metrics: dict, history: list) -> None:
        save_checkpoint(ckpt_path, run.checkpoint(epoch, history))
        # rewritten whole each epoch, so a resumed run never duplicates or loses a line
        (out_dir / "history.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
        log.info(epoch_line(cfg, metrics))
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)

    history = run.epochs(persist, progress=cfg.run.progress)
    model_path, meta = run.save_model(out_dir / "model.pt", history, extra_meta)
    return {**meta["final_metrics"], "selected_epoch": meta["selected_epoch"], "model_path": str(model_path),
            "checkpoint_path": str(ckpt_path), "out_dir": str(out_dir)}
