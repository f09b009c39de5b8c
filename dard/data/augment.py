"""The crop/flip augmentation whose parameters the shards record, and in-memory batches.

torchvision's RandomCrop/RandomHorizontalFlip draw their parameters internally and per image;
the shard format must record (dx, dy, flip) for each stored view, and a batched gather is much
faster than per-image transforms on the CPU, so the crop is written here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from dard.config import DataConfig
from dard.data.arrays import Dataset, to_float


@dataclass
class AugmentParams:
    """Per-sample crop offsets in [-pad, pad] (int) and horizontal flips (bool), each (N,)."""

    dx: torch.Tensor
    dy: torch.Tensor
    flip: torch.Tensor


def draw_augment(n: int, padding: int, flip: bool, generator: torch.Generator | None = None) -> AugmentParams:
    dx = torch.randint(-padding, padding + 1, (n,), generator=generator)
    dy = torch.randint(-padding, padding + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return AugmentParams(dx, dy, flips)


def identity_augment(n: int) -> AugmentParams:
    zeros = torch.zeros(n, dtype=torch.long)
    return AugmentParams(zeros, zeros.clone(), torch.zeros(n, dtype=torch.bool))


def apply_augment(images: torch.Tensor, params: AugmentParams, padding: int) -> torch.Tensor:
    """Crop (zero padding, like torchvision's RandomCrop(padding=p)) then flip.

    images: (N, C, H, W) of any dtype; returns the same shape and dtype. A shift (dx, dy) moves
    the crop window by that many pixels from the centre; (0, 0, no flip) is the identity.
    """
    if padding == 0 and not bool(params.flip.any()):
        return images
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = torch.arange(h).view(1, h) + (padding + params.dy.view(n, 1))
    cols = torch.arange(w).view(1, w) + (padding + params.dx.view(n, 1))
    cols = torch.where(params.flip.view(n, 1), cols.flip(1), cols)
    batch = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def iterate_batches(ds: Dataset, batch_size: int, *, shuffle: bool, augment: DataConfig | None = None,
                    generator: torch.Generator | None = None, drop_last: bool = False,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y, index)``: x float32 (B, C, H, W) in [0, 1], y int64 (B,), index into ``ds``.

    With ``augment`` given, each batch gets a fresh random crop/flip from ``generator``.
    """
    n = len(ds)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    images = ds.images
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        batch = images[idx]
        if augment is not None:
            params = draw_augment(len(idx), augment.crop_padding, augment.flip, generator)
            batch = apply_augment(batch, params, augment.crop_padding)
        yield to_float(batch), ds.labels[idx], idx


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)
