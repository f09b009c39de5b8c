"""Every random stream of a run, derived from its seed in one place.

A resumed epoch, a rebuilt shard part and each DDP rank replay exactly because each stream is a
fixed function of (run seed, what it is for). The formulas are frozen: changing one changes the
shards and every trained model after it, so a new stream gets a new function here.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_for(seed: int, rank: int = 0, epoch: int = 0) -> int:
    """Training: every (run seed, DDP rank, epoch) its own stream (attack random starts, shuffles,
    augmentation), so ranks draw differently and a resumed epoch replays exactly."""
    return seed * 1_000_003 + epoch * 1_009 + rank


def generator(seed: int) -> torch.Generator:
    """A CPU torch generator seeded with ``seed`` (splits, attack starts, sample picks)."""
    return torch.Generator().manual_seed(seed)


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Shuffle/augment randomness of one epoch on one rank (``seed_for``)."""
    return generator(seed_for(seed, rank, epoch))


def part_generator(seed: int, part_id: int, view: int) -> torch.Generator:
    """Precompute: one view of one shard part (augmentation and the teacher's DPGD starts), so a
    part rebuilt after a crash holds the same rows."""
    return generator(seed * 1_000_003 + part_id * 7_919 + view)


def shard_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which an epoch reads ``n`` shard samples; the same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and CUDA) global generators from one integer (initial weights)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
