"""Datasets: the presets (digits, Fashion-MNIST, CIFAR) and your own images (folders, tables;
local or object storage), their splits, the augmentation the shards record, and the batch every
loss takes. Images are uint8 (N, C, H, W) on the 8-bit grid; model inputs float32 in [0, 1]."""
from dard.data.arrays import ArrayDataset, Dataset, Splits, to_float
from dard.data.augment import AugmentParams, apply_augment, draw_augment, identity_augment, iterate_batches, num_batches
from dard.data.batch import TrainBatch
from dard.data.presets import FASHION_MNIST_DIR, DatasetNotFoundError
from dard.data.resolve import is_resolved, resolve, resolve_section, source_config
from dard.data.sources import SourceDataset, SourceError, list_source
from dard.data.splits import load_splits

__all__ = ["ArrayDataset", "AugmentParams", "Dataset", "DatasetNotFoundError", "FASHION_MNIST_DIR", "SourceDataset",
           "SourceError", "Splits", "TrainBatch", "apply_augment", "draw_augment", "identity_augment", "is_resolved",
           "iterate_batches", "list_source", "load_splits", "num_batches", "resolve", "resolve_section",
           "source_config", "to_float"]
