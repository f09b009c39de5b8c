"""Each rank's rows of an epoch, streamed from a :class:`ShardSet` on a local disk or object
storage, in memory bounded by ``data.shuffle_window`` whatever the total shard size.

A *pass* over a kind of rows (labeled, pool, or both as they come) reads one view of every unit
(a record batch of <= 1024 rows): the units in a seeded permutation (the same on every rank),
their rows laid end to end and cut into ``world`` equal contiguous chunks, one per rank (disjoint;
at most ``world - 1`` rows of the pass left out). A rank reads only the units its chunk touches,
``window`` at a time (the next window is fetched while this one trains), checks each against its
digest, shuffles the window's rows with a seeded permutation, and serves them in batches. Epoch
``e`` of a stream that needs ``P`` passes an epoch reads passes ``e*P .. e*P+P-1``, pass ``p``
view ``p mod V``: an epoch depends on nothing before it, so a run resumes at any epoch boundary.
Every rank runs the same number of steps; under DDP a rank whose read fails stops every rank at
the same step (:func:`agree`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from dard.data import TrainBatch
from dard.shards.format import TEACHER_LABEL, ShardError
from dard.shards.shardset import ShardSet, Unit, open_reader

COLUMNS = ("index", "view", "label", "label_source", "confidence", "x", "delta", "t_nat", "t_adv")
MIXED, LABELED, POOL = 0, 1, 2  # stream ids: part of every seed, so each stream shuffles on its own


class PeerShardError(ShardError):
    """Another rank could not read its rows; that rank reports why."""


@dataclass
class ShardBatch:
    """A decoded batch. x: uint8 (B, C, H, W); delta: int8 (B, C, H, W); logits float32 (B, K);
    label int64 (a pool row's is the teacher's argmax); label_source int8 (0 true, 1 teacher);
    confidence float32: the teacher's largest softmax probability on the natural view."""

    index: torch.Tensor
    label: torch.Tensor
    label_source: torch.Tensor
    confidence: torch.Tensor
    x: torch.Tensor
    delta: torch.Tensor
    t_nat: torch.Tensor
    t_adv: torch.Tensor
    view: torch.Tensor

    def to_train_batch(self, pseudo_labels: str = "teacher", threshold: float = 0.0) -> TrainBatch:
        """The loss's batch; a pool row counts in hard-label terms only under ``pseudo_labels:
        teacher`` and with confidence >= ``threshold`` (``label_weight``; None when all rows are labeled)."""
        x = self.x.float() / 255
        x_adv = (self.x.to(torch.int16) + self.delta.to(torch.int16)).float() / 255
        pooled = self.label_source == TEACHER_LABEL
        weight = None
        if bool(pooled.any()):
            usable = pooled & (self.confidence >= threshold) if pseudo_labels == "teacher" else torch.zeros_like(pooled)
            weight = (~pooled | usable).float()
        return TrainBatch(x, self.label.long(), teacher_logits=self.t_nat, x_teacher_adv=x_adv,
                          teacher_logits_adv=self.t_adv, label_weight=weight, index=self.index, pooled=pooled)


class _Readers:
    """Open part files, the most recently used kept (a few file handles, no data)."""

    def __init__(self, shards: ShardSet, keep: int = 8):
        self.shards, self.keep, self.open = shards, keep, OrderedDict()

    def get(self, part: int) -> pa.ipc.RecordBatchFileReader:
        if part in self.open:
            self.open.move_to_end(part)
            return self.open[part][1]
        try:
            self.open[part] = open_reader(self.shards.path(part))
        except (OSError, pa.ArrowInvalid) as err:
            raise ShardError(f"{self.shards.path(part)}: cannot be opened ({err}); re-run `dard precompute --out "
                             f"{self.shards.directory}` to rebuild it") from err
        if len(self.open) > self.keep:
            self.open.popitem(last=False)[1][0].close()
        return self.open[part][1]


def _columns(batch: pa.RecordBatch, lo: int, hi: int, image_shape, num_classes: int) -> dict[str, np.ndarray]:
    """Rows ``lo:hi`` of a unit as numpy arrays (views into Arrow's buffers where possible)."""
    pixels = int(np.prod(image_shape))
    out = {}
    for name in COLUMNS:
        col = batch.column(name)
        if name in ("x", "delta"):
            buf = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=len(col) * pixels, offset=col.offset * pixels)
            out[name] = buf.reshape(len(col), pixels)[lo:hi]
        elif name in ("t_nat", "t_adv"):
            values = col.values.to_numpy()[col.offset * num_classes:(col.offset + len(col)) * num_classes]
            out[name] = values.reshape(len(col), num_classes)[lo:hi]
        else:
            out[name] = col.to_numpy()[lo:hi]
    return out


class KindStream:
    """One rank's rows of ``kinds`` (``("labeled",)``, ``("pool",)`` or both), pass after pass."""

    def __init__(self, shards: ShardSet, kinds: tuple[str, ...], stream_id: int, rank: int, world: int, seed: int,
                 window: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.shards, self.kinds, self.stream_id = shards, kinds, stream_id
        self.rank, self.world, self.seed, self.window = rank, world, seed, window
        self.rows_per_view = sum(shards.samples(k) for k in kinds)
        self.per_rank = self.rows_per_view // world  # every rank's share of a pass

    def segments(self, p: int) -> list[tuple[Unit, int, int]]:
        """Pass ``p``: this rank's (unit, first row, end row) in reading order."""
        units = self.shards.units(self.kinds, p % self.shards.views)
        order = np.random.default_rng([self.seed, self.stream_id, p]).permutation(len(units))
        out, start = [], 0
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        for i in order:
            u = units[i]
            end = start + u.rows
            if end > lo and start < hi:
                out.append((u, max(lo, start) - start, min(hi, end) - start))
            start = end
        return out

    def rows(self, epoch: int, need: int) -> Iterator["_Window"]:
        """Shuffled windows of rows, ``need`` rows in all, for ``epoch``."""
        if need == 0:
            return
        if self.per_rank == 0:
            raise ShardError(f"{self.shards.directory}: no {'/'.join(self.kinds)} rows for rank {self.rank} of {self.world}")
        passes = math.ceil(need / self.per_rank)
        windows = [(p, w, segs[w:w + self.window]) for p in range(epoch * passes, (epoch + 1) * passes)
                   for segs in [self.segments(p)] for w in range(0, len(segs), self.window)]
        readers = _Readers(self.shards)
        served = 0
        with ThreadPoolExecutor(1) as prefetch:
            ahead = prefetch.submit(self._load, readers, *windows[0]) if windows else None
            for k in range(len(windows)):
                window = ahead.result()
                ahead = prefetch.submit(self._load, readers, *windows[k + 1]) if k + 1 < len(windows) else None
                yield window
                served += len(window)
                if served >= need:
                    break
            if ahead is not None:
                ahead.cancel()

    def _load(self, readers: _Readers, p: int, w: int, segments: list) -> "_Window":
        shape, classes = self.shards.image_shape, self.shards.num_classes
        files = {u.part: readers.get(u.part) for u, _, _ in segments}  # opened here: the cache is this thread's

        def read(part: int) -> list[dict[str, np.ndarray]]:  # one part's units, in one thread
            return [_columns(self.shards.read_unit(u, files[part]), lo, hi, shape, classes)
                    for u, lo, hi in segments if u.part == part]

        if len(files) > 1 and "://" in self.shards.directory:  # object storage: the window's parts' reads at once
            with ThreadPoolExecutor(len(files)) as pool:
                read_parts = dict(zip(files, pool.map(read, files)))
        else:
            read_parts = {part: read(part) for part in files}
        taken = {part: iter(units) for part, units in read_parts.items()}
        units = [next(taken[u.part]) for u, _, _ in segments]
        sizes = [len(u["index"]) for u in units]
        order = np.random.default_rng([self.seed, self.stream_id, p, self.rank, w]).permutation(sum(sizes))
        return _Window(units, np.cumsum([0] + sizes), order)


@dataclass
class _Window:
    """The units of one window as read (no copy), and the shuffled order their rows are served in."""

    units: list[dict[str, np.ndarray]]
    starts: np.ndarray  # first row of each unit within the window
    order: np.ndarray

    def __len__(self) -> int:
        return len(self.order)

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows (positions in the window), in that order, as one small array per column."""
        unit = np.searchsorted(self.starts, rows, side="right") - 1
        present = np.unique(unit)
        where = np.concatenate([np.flatnonzero(unit == u) for u in present])
        back = np.empty_like(where)
        back[where] = np.arange(len(where))  # gathered unit by unit, then each row put back in its place
        return {name: np.concatenate([self.units[u][name][rows[unit == u] - self.starts[u]] for u in present])[back]
                for name in COLUMNS}


def _batches_of(stream: KindStream, epoch: int, size: int, steps: int) -> Iterator[dict[str, np.ndarray]]:
    """``steps`` batches of ``size`` rows from ``stream``'s epoch, gathered from its windows."""
    windows = stream.rows(epoch, size * steps)
    window, at = None, 0
    for _ in range(steps):
        parts, wanted = [], size
        while wanted:
            if window is None or at == len(window):
                window, at = next(windows), 0
            take = min(wanted, len(window) - at)
            parts.append(window.gather(window.order[at:at + take]))
            at, wanted = at + take, wanted - take
        yield parts[0] if len(parts) == 1 else {name: np.concatenate([p[name] for p in parts]) for name in COLUMNS}
    windows.close()


@dataclass
class RankPlan:
    """What one rank reads each step: ``(stream, rows)`` per stream, and ``steps`` an epoch."""

    streams: list[tuple[KindStream, int]]
    steps: int


def rank_plan(shards: ShardSet, *, rank: int, world: int, seed: int, batch_size: int, pool_share: float | None,
              window: int, steps_per_epoch: int | None = None) -> RankPlan:
    """Rows per step from each kind and steps per epoch for ``rank``. ``batch_size``: the rank's
    (local) batch. Without pool rows, or with ``pool_share`` None, one stream of every row; else
    ``round(pool_share * batch)`` pool rows and the rest labeled. Steps: ``steps_per_epoch``, else
    one pass over the rank's rows (labeled + pool)."""
    pooled = shards.samples("pool") > 0
    if not pooled or pool_share is None:
        kinds = ("labeled", "pool") if pooled else ("labeled",)
        stream = KindStream(shards, kinds, MIXED if pooled else LABELED, rank, world, seed, window)
        parts = [(stream, batch_size)]
    else:
        m_pool = round(pool_share * batch_size)
        parts = [(KindStream(shards, ("labeled",), LABELED, rank, world, seed, window), batch_size - m_pool),
                 (KindStream(shards, ("pool",), POOL, rank, world, seed, window), m_pool)]
        parts = [(s, m) for s, m in parts if m > 0]
    empty = [f"{'/'.join(s.kinds)} rows" for s, _ in parts if s.per_rank == 0]
    if empty:
        raise ShardError(f"{shards.directory}: holds no {empty[0]} for {world} rank(s); the run draws {parts[0][1]} a step")
    steps = steps_per_epoch or sum(s.per_rank for s, _ in parts) // batch_size
    return RankPlan(parts, steps)


def epoch_batches(plan: RankPlan, epoch: int) -> Iterator[ShardBatch]:
    """This rank's :class:`ShardBatch` es of ``epoch``, ``plan.steps`` of them."""
    sources = [_batches_of(stream, epoch, size, plan.steps) for stream, size in plan.streams]
    shards = plan.streams[0][0].shards
    c, h, w = shards.image_shape
    for _ in range(plan.steps):
        got = [next(s) for s in sources]
        rows = {name: np.concatenate([g[name] for g in got]) if len(got) > 1 else got[0][name] for name in COLUMNS}
        n = len(rows["index"])

        def image(name: str, dtype) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(rows[name].view(dtype).reshape(n, h, w, c).transpose(0, 3, 1, 2)))

        yield ShardBatch(index=torch.from_numpy(rows["index"].astype(np.int64)),
                         label=torch.from_numpy(rows["label"].astype(np.int64)),
                         label_source=torch.from_numpy(rows["label_source"].astype(np.int8)),
                         confidence=torch.from_numpy(rows["confidence"].astype(np.float32)),
                         x=image("x", np.uint8), delta=image("delta", np.int8),
                         t_nat=torch.from_numpy(rows["t_nat"].astype(np.float32)),
                         t_adv=torch.from_numpy(rows["t_adv"].astype(np.float32)),
                         view=torch.from_numpy(rows["view"].astype(np.int64)))
    for s in sources:
        s.close()


def agree(ok: bool) -> bool:
    """Whether every DDP rank is ``ok`` (one all-reduce of a flag; True without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def agreed(batches: Iterator[ShardBatch]) -> Iterator[ShardBatch]:
    """``batches``, with every rank agreeing before each step that its read succeeded: a rank that
    failed raises its :class:`ShardError`, the others :class:`PeerShardError`, at the same step."""
    while True:
        try:
            batch, error = next(batches), None
        except StopIteration:
            return
        except ShardError as err:
            batch, error = None, err
        if not agree(error is None):
            raise error if error is not None else PeerShardError("another rank could not read its shard rows")
        yield batch
