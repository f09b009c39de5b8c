"""Synthetic images as a source of yours: a Parquet table of random PNGs (benchmarks that need
data of a given shape without a download, e.g. CIFAR-shaped 3x32x32)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def synthetic_table(path: str | Path, samples: int, shape: tuple[int, int, int] = (3, 32, 32), classes: int = 10,
                    seed: int = 0) -> str:
    """Write ``samples`` random PNGs of ``shape`` (C, H, W; C 1 or 3) with labels ``0..classes-1``
    (each class about as often) to the Parquet file ``path``; returns its source spec ``table:PATH``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    c, h, w = shape
    images = []
    for _ in range(samples):
        pixels = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels[..., 0] if c == 1 else pixels, "L" if c == 1 else "RGB").save(buf, "PNG")
        images.append(buf.getvalue())
    labels = rng.permutation(np.arange(samples) % classes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())}), path)
    return f"table:{path}"
