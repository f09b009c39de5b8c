"""The run's splits, from a preset or your own source, by seed: train / validation / test, the
labeled subset (``data.labeled``) and the unlabeled pool (``data.pool``).

Validation is carved out of training by ``split_seed``; without a fixed test set (digits, a source
without ``test_source``) the test split is carved first, then validation from the rest
(``split_seed + 1``). ``data.labeled`` keeps the labels of N training samples, stratified by class
(each class its share, largest remainders first), and moves the rest to the pool with its labels
removed (-1): nothing downstream can read them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dard.config import DataConfig
from dard.data.arrays import Dataset, Splits
from dard.data.presets import load_preset
from dard.data.sources import SourceDataset, list_source
from dard.seeding import generator


def load_splits(cfg: DataConfig) -> Splits:
    """The splits of a resolved data config (:func:`dard.data.resolve`): presets in memory, a
    source's splits decoded on demand."""
    full, test = load_preset(cfg) if cfg.preset else source_sets(cfg)
    if test is None:
        rest, test = _split(full, cfg.test_fraction, cfg.split_seed)
        train, val = _split(rest, cfg.val_fraction / (1 - cfg.test_fraction), cfg.split_seed + 1)
    else:
        train, val = _split(full, cfg.val_fraction, cfg.split_seed)
    if cfg.limit_train is not None:
        train = train.head(cfg.limit_train)
    pool = None
    if cfg.labeled is not None:
        if cfg.labeled >= len(train):
            raise ValueError(f"data.labeled: {cfg.labeled} labeled samples leave no pool: the training split holds "
                             f"{len(train)}")
        keep = labeled_positions(train.labels, cfg.labeled, cfg.split_seed)
        hidden = np.setdiff1d(np.arange(len(train)), keep)
        train, pool = train.subset(keep), Unlabeled(train.subset(hidden))
    if cfg.pool is not None:
        extra = pool_set(cfg)
        pool = extra if pool is None else ConcatDataset([pool, extra])
    empty = [name for name, ds in (("train", train), ("val", val), ("test", test)) if len(ds) == 0]
    if empty:
        raise ValueError(f"data: the {'/'.join(empty)} split is empty (val_fraction {cfg.val_fraction}, "
                         f"test_fraction {cfg.test_fraction}); every split needs samples")
    return Splits(train, val, test, pool)


def _split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Random split: (rest, held_out) with round(fraction*N) held out, each in the original order."""
    perm = torch.randperm(len(ds), generator=generator(seed))
    n_held = int(round(fraction * len(ds)))
    held, rest = perm[:n_held].sort().values, perm[n_held:].sort().values
    return ds.subset(rest), ds.subset(held)


def labeled_positions(labels: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """``n`` positions stratified by class: each class gets its share of ``n`` (largest remainders
    first), drawn by a seeded permutation; sorted."""
    labels = labels.numpy()
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * n / len(labels)
    take = np.floor(share).astype(np.int64)
    take[np.argsort(-(share - take), kind="stable")[:n - int(take.sum())]] += 1
    rng = np.random.default_rng([seed, 0x1abe1ed])
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def source_sets(cfg: DataConfig) -> tuple[SourceDataset, SourceDataset | None]:
    """A resolved source's training images and its fixed test set (None: carved by seed)."""
    train = list_source(cfg.source, image_column=cfg.image_column, label_column=cfg.label_column)
    test = (list_source(cfg.test_source, image_column=cfg.image_column, label_column=cfg.label_column,
                        classes=train.classes) if cfg.test_source else None)
    return _dataset(train, cfg), None if test is None else _dataset(test, cfg)


def pool_set(cfg: DataConfig) -> SourceDataset:
    """``data.pool``: images without labels, decoded to the run's shape (resized and converted as
    needed: a pool serves the run's images)."""
    listing = list_source(cfg.pool, labeled=False, image_column=cfg.image_column, label_column=cfg.label_column)
    return SourceDataset(listing, np.arange(len(listing)), torch.from_numpy(listing.labels), tuple(cfg.image_shape),
                         True, True, cfg.num_classes, f"{cfg.dataset}-pool")


def _dataset(listing, cfg: DataConfig) -> SourceDataset:
    return SourceDataset(listing, np.arange(len(listing)), torch.from_numpy(listing.labels), tuple(cfg.image_shape),
                         cfg.image_size is not None, cfg.channels is not None, cfg.num_classes, cfg.dataset)


@dataclass
class Unlabeled(Dataset):
    """``base`` with its labels removed (all -1): the images of a split whose labels are hidden."""

    base: Dataset

    def __post_init__(self) -> None:
        self.labels = torch.full((len(self.base),), -1, dtype=torch.long)
        self.num_classes, self.name = self.base.num_classes, self.base.name

    def read(self, idx) -> torch.Tensor:
        return self.base.read(idx)

    @property
    def images(self) -> torch.Tensor:
        return self.base.images

    def subset(self, idx) -> "Unlabeled":
        return Unlabeled(self.base.subset(idx))

    def compact(self) -> "Unlabeled":
        return Unlabeled(self.base.compact())


@dataclass
class ConcatDataset(Dataset):
    """Datasets one after the other (a pool of hidden-label samples, then an external one)."""

    parts: list[Dataset]

    def __post_init__(self) -> None:
        self.labels = torch.cat([p.labels for p in self.parts])
        self.num_classes, self.name = self.parts[0].num_classes, self.parts[0].name
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def read(self, idx) -> torch.Tensor:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        which = np.searchsorted(self.starts, idx, side="right") - 1
        out = None
        for k in np.unique(which):
            at = np.flatnonzero(which == k)
            images = self.parts[k].read(idx[at] - self.starts[k])
            if out is None:
                out = torch.empty((len(idx), *images.shape[1:]), dtype=images.dtype)
            out[torch.from_numpy(at)] = images
        return out if out is not None else torch.zeros(0, dtype=torch.uint8)

    @property
    def images(self) -> torch.Tensor:
        return torch.cat([p.images for p in self.parts])

    def subset(self, idx) -> "Dataset":
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return _Picked(self, idx)


@dataclass
class _Picked(Dataset):
    base: Dataset
    idx: np.ndarray

    def __post_init__(self) -> None:
        self.labels = self.base.labels[torch.from_numpy(self.idx)]
        self.num_classes, self.name = self.base.num_classes, self.base.name

    def read(self, idx) -> torch.Tensor:
        return self.base.read(self.idx[np.asarray(idx, dtype=np.int64).reshape(-1)])

    @property
    def images(self) -> torch.Tensor:
        return self.read(np.arange(len(self)))

    def subset(self, idx) -> "_Picked":
        return _Picked(self.base, self.idx[np.asarray(idx, dtype=np.int64).reshape(-1)])

    def compact(self) -> Dataset:
        """The picked samples of each part, compacted, one after the other."""
        which = np.searchsorted(self.base.starts, self.idx, side="right") - 1
        order = np.argsort(which, kind="stable")
        if not (order == np.arange(len(order))).all():
            return self  # picked across parts out of order: keep the reference (rare; never planned so)
        pieces = [self.base.parts[k].subset(self.idx[which == k] - self.base.starts[k]).compact()
                  for k in np.unique(which)]
        return pieces[0] if len(pieces) == 1 else ConcatDataset(pieces)
