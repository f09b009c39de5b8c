"""The presets: scikit-learn's digits (embedded), Fashion-MNIST (IDX files) and CIFAR-10/100
(torchvision's folder layout), read from local files into memory; nothing is downloaded.

Each returns ``(train, test)`` as :class:`ArrayDataset` s, uint8 (N, C, H, W); digits has no test
split of its own (``test`` None: the split carves one by seed).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from dard.config import DataConfig
from dard.data.arrays import ArrayDataset


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder is missing or incomplete; the message says what to put where."""


def load_preset(cfg: DataConfig) -> tuple[ArrayDataset, ArrayDataset | None]:
    """The preset ``cfg.dataset``'s training images and its fixed test split (None for digits)."""
    if cfg.dataset == "digits":
        return _digits(cfg), None
    if cfg.dataset == "fashion-mnist":
        return _fashion_mnist(cfg)
    return _cifar(cfg)


def _digits(cfg: DataConfig) -> ArrayDataset:
    from sklearn.datasets import load_digits  # ships its data: nothing is downloaded

    bunch = load_digits()
    # Values are integers 0..16; put them on the 8-bit grid so they are exactly storable as uint8.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(bunch.target.astype(np.int64)), cfg.num_classes,
                        "digits")


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
