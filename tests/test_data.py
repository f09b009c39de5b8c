import hashlib
import pickle

import numpy as np
import pytest
import torch

from dard.config import DataConfig
from dard.data import (AugmentParams, DatasetNotFoundError, apply_augment, draw_augment, identity_augment,
                       iterate_batches, load_splits)


def test_digits_splits_are_fixed_disjoint_and_in_range():
    a, b = load_splits(DataConfig("digits")), load_splits(DataConfig("digits"))
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert torch.equal(a.test.labels, b.test.labels) and torch.equal(a.train.images, b.train.images)
    other = load_splits(DataConfig("digits", split_seed=1))
    assert not torch.equal(a.test.labels, other.test.labels)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 8, 8)
    # real digits: all ten classes, pixel values spread over the 8-bit grid
    assert set(a.test.labels.tolist()) == set(range(10)) and int(a.train.images.max()) == 255
    x, y, idx = next(iterate_batches(a.test, 32, shuffle=False))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.shape == (32, 1, 8, 8)


def test_augment_identity_shift_and_flip():
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    assert torch.equal(apply_augment(img, identity_augment(2), padding=2), img)
    shift = AugmentParams(torch.tensor([1, 0]), torch.tensor([0, -1]), torch.tensor([False, True]))
    out = apply_augment(img, shift, padding=2)
    # dx=+1: column j of the output is column j+1 of the input, the last column is zero padding
    assert torch.equal(out[0, :, :, :3], img[0, :, :, 1:]) and int(out[0, :, :, 3].abs().sum()) == 0
    # dy=-1 then flip: row i is row i-1 of the input, mirrored; first row is padding
    assert torch.equal(out[1, :, 1:, :], img[1, :, :3, :].flip(-1)) and int(out[1, :, 0].abs().sum()) == 0


def test_draw_augment_ranges():
    p = draw_augment(1000, 4, True, torch.Generator().manual_seed(0))
    assert p.dx.min() == -4 and p.dx.max() == 4 and 0.4 < p.flip.float().mean() < 0.6
    assert not draw_augment(100, 1, False).flip.any()


def _write_cifar(root, n_train_per_batch=4, n_test=5, classes=10):
    """A tiny archive in the python CIFAR-10 layout (the files torchvision reads)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    md5 = {}
    for name in names:
        n = n_test if name == "test_batch" else n_train_per_batch
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, classes, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    meta = {"label_names": [f"c{i}" for i in range(classes)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    md5["batches.meta"] = hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()
    return md5


def test_cifar_from_local_folder(tmp_path, monkeypatch):
    from torchvision import datasets

    md5 = _write_cifar(tmp_path)
    # torchvision verifies the real archive's md5 sums; point it at our tiny files' sums instead.
    monkeypatch.setattr(datasets.CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(datasets.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]})
    splits = load_splits(DataConfig("cifar10", data_dir=str(tmp_path), val_fraction=0.2))
    assert len(splits.train) == 16 and len(splits.val) == 4 and len(splits.test) == 5
    assert splits.train.images.shape[1:] == (3, 32, 32) and splits.train.images.dtype == torch.uint8
    assert splits.test.num_classes == 10


def test_cifar_missing_or_corrupt_folder_says_what_to_do(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no --data-dir"):
        load_splits(DataConfig("cifar10"))
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python does not exist"):
        load_splits(DataConfig("cifar100", data_dir=str(tmp_path)))
    _write_cifar(tmp_path)  # real md5 sums do not match: torchvision reports corruption
    with pytest.raises(DatasetNotFoundError, match="incomplete or corrupted"):
        load_splits(DataConfig("cifar10", data_dir=str(tmp_path)))


def _write_idx(path, magic, array, gz):
    import gzip

    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)  # level 1: the test writes 47 MB


def _write_fashion(folder, n_train=60000, n_test=10000, gz=True, seed=0):
    """The four IDX files of Fashion-MNIST's published shapes, random pixels (what the loader checks)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        written[prefix] = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", 0x0803, written[prefix][0], gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", 0x0801, written[prefix][1], gz)
    return written


@pytest.mark.parametrize("layout", ["flat-gz", "torchvision-raw"])
def test_fashion_mnist_from_idx_files_both_layouts(tmp_path, layout):
    folder = tmp_path if layout == "flat-gz" else tmp_path / "FashionMNIST" / "raw"
    written = _write_fashion(folder, gz=layout == "flat-gz")
    splits = load_splits(DataConfig("fashion-mnist", data_dir=str(tmp_path), val_fraction=0.1))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    assert splits.train.images.shape[1:] == (1, 28, 28) and splits.train.images.dtype == torch.uint8
    # the bytes are the files': the test split as written, train + val a partition of the training file
    assert np.array_equal(splits.test.images[:, 0].numpy(), written["t10k"][0])
    assert np.array_equal(splits.test.labels.numpy(), written["t10k"][1])
    train_images, train_labels = written["train"]
    assert int(splits.train.images.sum()) + int(splits.val.images.sum()) == int(train_images.sum())
    assert int(splits.train.labels.sum()) + int(splits.val.labels.sum()) == int(train_labels.sum())


def test_fashion_mnist_wrong_files_are_refused_by_name(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"train-images-idx3-ubyte\(\.gz\) does not exist.*dataset-fashion-mnist"):
        load_splits(DataConfig("fashion-mnist", data_dir=str(tmp_path)))
    _write_fashion(tmp_path, n_test=9999)  # a truncated test set: dimensions differ from the published ones
    with pytest.raises(DatasetNotFoundError, match=r"t10k-images-idx3-ubyte.gz is not the expected IDX file.*9999"):
        load_splits(DataConfig("fashion-mnist", data_dir=str(tmp_path)))
    _write_fashion(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-10])  # a cut-off gzip stream
    with pytest.raises(DatasetNotFoundError, match="train-labels-idx1-ubyte.gz cannot be read"):
        load_splits(DataConfig("fashion-mnist", data_dir=str(tmp_path)))
    _write_fashion(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    import gzip
    raw = bytearray(gzip.decompress(images.read_bytes()))
    raw[3] = 0x01  # the magic number of a label file
    images.write_bytes(gzip.compress(bytes(raw), compresslevel=1))
    with pytest.raises(DatasetNotFoundError, match="magic 2049"):
        load_splits(DataConfig("fashion-mnist", data_dir=str(tmp_path)))


def test_fashion_mnist_real_files_installed_by_ci():
    """The real data set from Debian's dataset-fashion-mnist (.ci/run installs it): the published
    counts, all ten classes balanced, pixels spread over the 8-bit grid."""
    from pathlib import Path

    from dard.data import FASHION_MNIST_DIR

    assert Path(FASHION_MNIST_DIR).is_dir(), (f"{FASHION_MNIST_DIR} is missing: install Debian's dataset-fashion-mnist "
                                              "(bash .ci/run does)")
    splits = load_splits(DataConfig("fashion-mnist"))
    assert (len(splits.train) + len(splits.val), len(splits.test)) == (60000, 10000)
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    assert int(splits.test.images.max()) == 255 and 0.25 < float(splits.test.images.float().mean() / 255) < 0.32
