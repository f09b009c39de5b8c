"""A split of a dataset: labels always in memory, images uint8 (N, C, H, W) on the 8-bit grid.

A preset's split holds its images in memory (:class:`ArrayDataset`); a split of your own source
decodes only the images asked for (:class:`dard.data.sources.SourceDataset`), so a precompute
task reads its slice and validation its first ``eval_limit`` images. Model inputs are ``float32``
in [0, 1] (:func:`to_float`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., C, H, W) -> float32 in [0, 1]."""
    return images_uint8.float().div_(255.0)


class Dataset:
    """A split. ``labels``: int64 (N,), -1 for an image without a label (a pool's);
    ``read(idx)``: uint8 (len(idx), C, H, W) of those samples; ``images``: all of them."""

    labels: torch.Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def read(self, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    # images: uint8 (N, C, H, W), every sample (an attribute or a property of each kind)

    def subset(self, idx: torch.Tensor | np.ndarray) -> "Dataset":
        raise NotImplementedError

    def compact(self) -> "Dataset":
        """This split holding only what its own samples need (a source's listing of them alone):
        what a task that reads them is sent."""
        return self

    def head(self, n: int | None) -> "Dataset":
        return self if n is None or n >= len(self) else self.subset(torch.arange(n))


@dataclass
class ArrayDataset(Dataset):
    """images: uint8 (N, C, H, W), in memory; labels: int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def read(self, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.images[torch.as_tensor(np.array(idx, dtype=np.int64))]

    def subset(self, idx: torch.Tensor | np.ndarray) -> "ArrayDataset":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return ArrayDataset(self.images[idx], self.labels[idx], self.num_classes, self.name)


@dataclass
class Splits:
    """The run's splits. ``pool``: images whose labels the run does not use (``data.labeled``
    hides the rest of the training split's, ``data.pool`` adds more), None without one."""

    train: Dataset
    val: Dataset
    test: Dataset
    pool: Dataset | None = None
