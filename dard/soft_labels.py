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

from dard.attacks.dpgd import dpgd_from_config
from dard.config import AttackConfig, DataConfig
from dard.data import Dataset, apply_augment, draw_augment, to_float
from dard.seeding import part_generator
from dard.shards.format import TEACHER_LABEL, TRUE_LABEL, rows_to_batches
from dard.teacher import forward_logits, quantize_delta


def compute_part(teacher: nn.Module, samples: Dataset, positions: np.ndarray, *, pooled: bool, views: int,
                 data: DataConfig, attack: AttackConfig, seed: int, part_id: int, device: torch.device | str = "cpu",
                 batch_size: int = 256, progress=None) -> list[pa.RecordBatch]:
    """Rows for ``samples`` (the part's, whose positions in their split are ``positions``) x
    ``views``: uint8 view, int8 DPGD delta, float16 teacher logits, the teacher's confidence.

    A labeled row keeps its label; a ``pooled`` row (an image without one) gets the teacher's argmax
    on its natural view (``label_source`` teacher), which is also its DPGD target. The DPGD example
    is attacked against the teacher with that one-hot label as Dice target, then stored on the
    8-bit grid; ``t_adv`` is the teacher's output on exactly the stored x + delta, so the student
    sees what the logits describe.
    """
    device = torch.device(device)
    teacher = teacher.to(device).eval()
    images = samples.images
    labels = samples.labels
    n = len(positions)
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("index", "view", "label", "label_source", "confidence",
                                                          "crop_dx", "crop_dy", "flip", "x", "delta", "t_nat", "t_adv")}
    for v in range(views):
        gen = part_generator(seed, part_id, v)
        params = draw_augment(n, data.crop_padding, data.flip, gen)
        views_uint8 = apply_augment(images, params, data.crop_padding)
        for s in range(0, n, batch_size):
            x_u8 = views_uint8[s:s + batch_size]
            x = to_float(x_u8).to(device)
            t_nat = forward_logits(teacher, x)
            y = t_nat.argmax(1) if pooled else labels[s:s + batch_size].to(device)
            x_adv = dpgd_from_config(teacher, x, y, attack, generator=gen)
            delta = quantize_delta(x_u8, x_adv, attack.eps)
            stored = to_float((x_u8.to(torch.int16) + delta.to(torch.int16)).to(torch.uint8))
            t_adv = forward_logits(teacher, stored.to(device))
            chunks["label"].append(y.cpu().numpy())
            chunks["confidence"].append(torch.softmax(t_nat, 1).max(1).values.cpu().numpy())
            chunks["x"].append(x_u8.permute(0, 2, 3, 1).numpy())
            chunks["delta"].append(delta.permute(0, 2, 3, 1).numpy())
            chunks["t_nat"].append(t_nat.cpu().numpy().astype(np.float16))
            chunks["t_adv"].append(t_adv.cpu().numpy().astype(np.float16))
            if progress is not None:
                progress(len(x_u8))
        chunks["index"].append(np.asarray(positions, dtype=np.int64))
        chunks["view"].append(np.full(n, v, dtype=np.int16))
        chunks["label_source"].append(np.full(n, TEACHER_LABEL if pooled else TRUE_LABEL, dtype=np.int8))
        chunks["crop_dx"].append(params.dx.numpy())
        chunks["crop_dy"].append(params.dy.numpy())
        chunks["flip"].append(params.flip.numpy())
    rows = {k: np.concatenate(v) for k, v in chunks.items()}
    return rows_to_batches(rows, tuple(images.shape[1:]), int(rows["t_nat"].shape[1]))
