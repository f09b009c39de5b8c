"""Datasets, splits and the crop/flip augmentation whose parameters the shards record.

Every dataset is held in memory as ``uint8`` images ``(N, C, H, W)`` on the 8-bit grid plus
``int64`` labels: digits (1797 images, 8x8), Fashion-MNIST (70k, 28x28) and CIFAR (60k, 32x32)
are small enough, and the shard format stores natural views as uint8 too, so both paths see
identical pixels.
Model inputs are ``float32`` in [0, 1].
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from dard.config import DataConfig
from dard.seeding import generator


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder is missing or incomplete; the message says what to put where."""


@dataclass
class TrainBatch:
    """One batch. x: (B, C, H, W) float in [0, 1]; y: (B,) int64.

    Teacher fields (distillation only; logits (B, K) float):
    teacher_logits = T(x); x_teacher_adv = x_d, a DPGD example against the teacher (same range
    and shape as x); teacher_logits_adv = T(x_d); online_teacher = T itself (frozen, on the batch's
    device), only for ``rob_target='teacher_adv'``.
    """

    x: torch.Tensor
    y: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    x_teacher_adv: torch.Tensor | None = None
    teacher_logits_adv: torch.Tensor | None = None
    online_teacher: nn.Module | None = None  # the teacher model, for losses that query it at new points

    def to(self, device: torch.device) -> "TrainBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TrainBatch(move(self.x), move(self.y), move(self.teacher_logits), move(self.x_teacher_adv),
                          move(self.teacher_logits_adv), self.online_teacher)


@dataclass
class ArrayDataset:
    """images: uint8 (N, C, H, W); labels: int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: torch.Tensor | np.ndarray) -> "ArrayDataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ArrayDataset(self.images[idx], self.labels[idx], self.num_classes, self.name)

    def head(self, n: int | None) -> "ArrayDataset":
        return self if n is None or n >= len(self) else self.subset(torch.arange(n))


@dataclass
class Splits:
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., C, H, W) -> float32 in [0, 1]."""
    return images_uint8.float().div_(255.0)


def load_splits(cfg: DataConfig) -> Splits:
    """The run's train/val/test splits. Validation is carved out of training, by ``split_seed``."""
    if cfg.dataset == "digits":
        splits = _digits_splits(cfg)
    elif cfg.dataset in ("cifar10", "cifar100", "fashion-mnist"):
        train, test = _cifar(cfg) if cfg.dataset != "fashion-mnist" else _fashion_mnist(cfg)
        train, val = _split(train, cfg.val_fraction, cfg.split_seed)
        splits = Splits(train, val, test)
    else:
        raise ValueError(f"data.dataset: unknown dataset {cfg.dataset!r}")
    if cfg.limit_train is not None:
        splits.train = splits.train.head(cfg.limit_train)
    empty = [name for name in ("train", "val", "test") if len(getattr(splits, name)) == 0]
    if empty:
        raise ValueError(f"data: the {'/'.join(empty)} split is empty (val_fraction {cfg.val_fraction}, "
                         f"test_fraction {cfg.test_fraction}); every split needs samples")
    return splits


def _digits_splits(cfg: DataConfig) -> Splits:
    from sklearn.datasets import load_digits  # ships its data: nothing is downloaded

    bunch = load_digits()
    # Values are integers 0..16; put them on the 8-bit grid so they are exactly storable as uint8.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    full = ArrayDataset(torch.from_numpy(images), torch.from_numpy(bunch.target.astype(np.int64)), cfg.num_classes, "digits")
    rest, test = _split(full, cfg.test_fraction, cfg.split_seed)
    train, val = _split(rest, cfg.val_fraction / (1 - cfg.test_fraction), cfg.split_seed + 1)
    return Splits(train, val, test)


def _split(ds: ArrayDataset, fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Stratified-free random split: (rest, held_out) with round(fraction*N) held out."""
    gen = generator(seed)
    perm = torch.randperm(len(ds), generator=gen)
    n_held = int(round(fraction * len(ds)))
    held, rest = perm[:n_held].sort().values, perm[n_held:].sort().values
    return ds.subset(rest), ds.subset(held)


_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", "torchvision.datasets.CIFAR10"),
    "cifar100": ("cifar-100-python", "torchvision.datasets.CIFAR100"),
}


def _cifar(cfg: DataConfig) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR from a local folder in torchvision's format; never downloads."""
    from torchvision import datasets

    name, data_dir = cfg.dataset, cfg.data_dir

    folder, cls_name = _CIFAR_LAYOUT[name]
    howto = (f"Put the extracted python-version archive there, so that <data_dir>/{folder}/ exists "
             f"(the layout {cls_name}(root=<data_dir>, download=True) creates on a machine with internet), "
             f"and pass --data-dir <data_dir>.")
    if not data_dir:
        raise DatasetNotFoundError(f"{name}: no --data-dir given. {howto}")
    root = Path(data_dir).expanduser()
    if not (root / folder).is_dir():
        raise DatasetNotFoundError(f"{name}: {root / folder} does not exist. {howto}")
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    out = []
    for train in (True, False):
        try:
            ds = cls(root=str(root), train=train, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise DatasetNotFoundError(f"{name}: {root / folder} is incomplete or corrupted ({err}). {howto}") from err
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        out.append(ArrayDataset(images, torch.as_tensor(ds.targets, dtype=torch.long), cfg.num_classes, name))
    return out[0], out[1]


# Where Debian's dataset-fashion-mnist package puts the original IDX files: the default --data-dir.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# split -> (images file, labels file, number of samples), as Zalando publishes them
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000)}


def _fashion_mnist(cfg: DataConfig) -> tuple[ArrayDataset, ArrayDataset]:
    """Fashion-MNIST from its four IDX files (gzipped or not); never downloads.

    ``data_dir`` (default :data:`FASHION_MNIST_DIR`) holds the files itself, or torchvision's
    ``FashionMNIST/raw/`` layout below it. Returns (train 60k, test 10k), images uint8 (N, 1, 28, 28).
    """
    root = Path(cfg.data_dir or FASHION_MNIST_DIR).expanduser()
    howto = ("Install Debian's dataset-fashion-mnist package (it puts them in "
             f"{FASHION_MNIST_DIR}), or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
             "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in a folder and pass --data-dir <folder>.")
    folder = next((d for d in (root, root / "FashionMNIST" / "raw") if d.is_dir() and _idx_path(d, "train-images-idx3-ubyte")), root)
    out = []
    for split, (images_name, labels_name, n) in _FASHION_FILES.items():
        images = _read_idx(folder, images_name, 0x0803, (n, 28, 28), howto)
        labels = _read_idx(folder, labels_name, 0x0801, (n,), howto)
        if labels.max() >= cfg.num_classes:
            raise DatasetNotFoundError(f"fashion-mnist: {_idx_path(folder, labels_name)} holds label {labels.max()}; "
                                       f"expected 0..{cfg.num_classes - 1}: the file is corrupt. {howto}")
        out.append(ArrayDataset(torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64)),
                                cfg.num_classes, "fashion-mnist"))
    return out[0], out[1]


def _idx_path(folder: Path, name: str) -> Path | None:
    return next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)


def _read_idx(folder: Path, name: str, magic: int, shape: tuple[int, ...], howto: str) -> np.ndarray:
    """One IDX file of unsigned bytes, checked: magic number, dimensions and length are the published ones."""
    path = _idx_path(folder, name)
    if path is None:
        raise DatasetNotFoundError(f"fashion-mnist: {folder / name}(.gz) does not exist. {howto}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DatasetNotFoundError(f"fashion-mnist: {path} cannot be read ({type(err).__name__}: {err}). {howto}") from err
    header = 4 + 4 * len(shape)
    found_magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(len(shape))) if len(raw) >= header else None
    if found_magic != magic or dims != shape or len(raw) != header + int(np.prod(shape)):
        raise DatasetNotFoundError(f"fashion-mnist: {path} is not the expected IDX file (magic {found_magic}, dimensions "
                                   f"{dims}, {len(raw)} bytes; expected magic {magic}, dimensions {shape}, "
                                   f"{header + int(np.prod(shape))} bytes). {howto}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Augmentation with explicit parameters.
# torchvision's RandomCrop/RandomHorizontalFlip draw their parameters internally and per image;
# the shard format must record (dx, dy, flip) for each stored view, and a batched gather is much
# faster than per-image transforms on the CPU, so the crop is written here.


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


def iterate_batches(ds: ArrayDataset, batch_size: int, *, shuffle: bool, augment: DataConfig | None = None,
                    generator: torch.Generator | None = None, drop_last: bool = False,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y, index)``: x float32 (B, C, H, W) in [0, 1], y int64 (B,), index into ``ds``.

    With ``augment`` given, each batch gets a fresh random crop/flip from ``generator``.
    """
    n = len(ds)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        images = ds.images[idx]
        if augment is not None:
            params = draw_augment(len(idx), augment.crop_padding, augment.flip, generator)
            images = apply_augment(images, params, augment.crop_padding)
        yield to_float(images), ds.labels[idx], idx


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)
