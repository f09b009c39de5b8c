"""Teacher soft labels for one shard part: augmented views, DPGD views, teacher logits on both.

Pure PyTorch: ``cluster/precompute.py`` runs :func:`compute_part` as one Ray task per part; a
test or a notebook can call it directly. Deterministic for a given (seed, part, view): a part
rebuilt after a crash holds the same rows.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from dard.config import AttackConfig, DataConfig
from dard.data import ArrayDataset, apply_augment, draw_augment, to_float
from dard.seeding import part_generator
from dard.shards import rows_to_table
from dard.teacher import forward_logits, quantize_delta, teacher_outputs


def plan_parts(num_samples: int, rows_per_part: int) -> list[np.ndarray]:
    """Sample indices of each part: contiguous ranges of about ``rows_per_part`` samples."""
    if rows_per_part < 1:
        raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
    return [np.arange(s, min(s + rows_per_part, num_samples)) for s in range(0, num_samples, rows_per_part)]


def compute_part(teacher: nn.Module, ds: ArrayDataset, sample_indices: np.ndarray, *, views: int, data: DataConfig,
                 attack: AttackConfig, seed: int, part_id: int, device: torch.device | str = "cpu",
                 batch_size: int = 256, progress=None) -> pa.Table:
    """Rows for ``sample_indices`` x ``views``: uint8 view, int8 DPGD delta, float16 teacher logits.

    The DPGD example is attacked against the teacher with the one-hot label as Dice target
    (:func:`dard.teacher.teacher_outputs`), then stored on the 8-bit grid; ``t_adv`` is the
    teacher's output on exactly the stored x + delta, so the student sees what the logits describe.
    """
    device = torch.device(device)
    teacher = teacher.to(device).eval()
    idx = torch.from_numpy(np.array(sample_indices, dtype=np.int64))  # a copy: Ray hands out read-only arrays
    images, labels = ds.images[idx], ds.labels[idx]
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in
                                           ("index", "view", "label", "crop_dx", "crop_dy", "flip", "x", "delta",
                                            "t_nat", "t_adv")}
    for v in range(views):
        gen = part_generator(seed, part_id, v)
        params = draw_augment(len(idx), data.crop_padding, data.flip, gen)
        views_uint8 = apply_augment(images, params, data.crop_padding)
        for s in range(0, len(idx), batch_size):
            x_u8, y = views_uint8[s:s + batch_size], labels[s:s + batch_size]
            out = teacher_outputs(teacher, to_float(x_u8).to(device), y.to(device), attack, with_adv=True, generator=gen)
            delta = quantize_delta(x_u8, out["x_teacher_adv"], attack.eps)
            x_adv = to_float((x_u8.to(torch.int16) + delta.to(torch.int16)).to(torch.uint8))
            t_adv = forward_logits(teacher, x_adv.to(device))
            chunks["x"].append(x_u8.permute(0, 2, 3, 1).numpy())
            chunks["delta"].append(delta.permute(0, 2, 3, 1).numpy())
            chunks["t_nat"].append(out["teacher_logits"].cpu().numpy().astype(np.float16))
            chunks["t_adv"].append(t_adv.cpu().numpy().astype(np.float16))
            if progress is not None:
                progress(len(y))
        chunks["index"].append(idx.numpy())
        chunks["view"].append(np.full(len(idx), v, dtype=np.int16))
        chunks["label"].append(labels.numpy())
        chunks["crop_dx"].append(params.dx.numpy())
        chunks["crop_dy"].append(params.dy.numpy())
        chunks["flip"].append(params.flip.numpy())
    rows = {k: np.concatenate(v) for k, v in chunks.items()}
    c, h, w = images.shape[1:]
    return rows_to_table(rows, (c, h, w), int(rows["t_nat"].shape[1]))
