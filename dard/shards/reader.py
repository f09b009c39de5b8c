"""Reading shards: a memory-mapped reader that serves each DDP rank its batches of an epoch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from dard.data import AugmentParams, Splits, TrainBatch, apply_augment
from dard.files import join, resolve
from dard.seeding import shard_order
from dard.shards.format import PINNED_ATTACK, PINNED_DATA, ShardError, plain
from dard.shards.store import read_manifest
from dard.shards.verify import check_fingerprint, open_table, verify

@dataclass
class ShardBatch:
    """A decoded batch. x: uint8 (B, C, H, W); delta: int8 (B, C, H, W); logits float32 (B, K)."""

    index: torch.Tensor
    label: torch.Tensor
    x: torch.Tensor
    delta: torch.Tensor
    t_nat: torch.Tensor
    t_adv: torch.Tensor
    view: torch.Tensor

    def to_train_batch(self) -> TrainBatch:
        x = self.x.float() / 255
        x_adv = (self.x.to(torch.int16) + self.delta.to(torch.int16)).float() / 255
        return TrainBatch(x, self.label.long(), teacher_logits=self.t_nat, x_teacher_adv=x_adv,
                          teacher_logits_adv=self.t_adv)


class ShardReader:
    """Memory-mapped reader over a verified shard directory.

    ``check``: ``full`` (sha256 of every part, default), ``fast`` (sizes, schema, rows) or ``none``.
    """

    def __init__(self, directory: str, check: str = "full"):
        self.directory = str(directory)
        if check not in ("full", "fast", "none"):
            raise ValueError("check must be full, fast or none")
        self.manifest = read_manifest(self.directory)
        if check != "none":
            verify(self.directory, full=check == "full")
        fs, base = resolve(self.directory)
        tables = [open_table(fs, join(base, p["file"])) for p in self.manifest["parts"]]
        if not tables:
            raise ShardError(f"{self.directory}: manifest lists no parts")
        self.table = pa.concat_tables(tables)
        self.views = int(self.manifest["views"])
        self.image_shape = tuple(self.manifest["image_shape"])
        self.num_classes = int(self.manifest["num_classes"])
        index = self.table.column("index").to_numpy()
        view = self.table.column("view").to_numpy()
        # rows_by_view[v][k]: table row of the k-th sample (sorted by sample index) in view v
        self.rows_by_view = []
        for v in range(self.views):
            rows = np.flatnonzero(view == v)
            self.rows_by_view.append(rows[np.argsort(index[rows], kind="stable")])
        counts = {len(r) for r in self.rows_by_view}
        if len(counts) != 1:
            raise ShardError(f"{self.directory}: views hold different numbers of rows {sorted(counts)}; re-run precompute")
        self.num_samples = counts.pop()

    def __len__(self) -> int:
        return self.num_samples

    def rank_rows(self, epoch: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> np.ndarray:
        """Table rows for this rank in this epoch: view ``epoch mod V``, a seeded shuffle of the samples,
        every ``world_size``-th from position ``rank``. Disjoint across ranks; their union is every sample."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        rows = self.rows_by_view[epoch % self.views]
        perm = shard_order(seed, epoch, len(rows))
        return rows[perm[rank::world_size]]

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Equal on every rank (DDP needs the same number of steps): full local batches of the smallest rank."""
        return (self.num_samples // world_size) // batch_size

    def take(self, rows: np.ndarray) -> ShardBatch:
        t = self.table.take(pa.array(rows, type=pa.int64()))
        c, h, w = self.image_shape
        n = t.num_rows

        def pixels(name: str, dtype) -> torch.Tensor:
            col = t.column(name).combine_chunks()
            buf = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=n * c * h * w, offset=col.offset * c * h * w)
            return torch.from_numpy(buf.view(dtype).reshape(n, h, w, c).transpose(0, 3, 1, 2).copy())

        def logits(name: str) -> torch.Tensor:
            col = t.column(name).combine_chunks()
            values = col.values.to_numpy(zero_copy_only=False)[col.offset * self.num_classes:(col.offset + n) * self.num_classes]
            return torch.from_numpy(values.astype(np.float32).reshape(n, self.num_classes))

        return ShardBatch(index=torch.from_numpy(t.column("index").to_numpy().copy()),
                          label=torch.from_numpy(t.column("label").to_numpy().astype(np.int64)),
                          x=pixels("x", np.uint8), delta=pixels("delta", np.int8),
                          t_nat=logits("t_nat"), t_adv=logits("t_adv"),
                          view=torch.from_numpy(t.column("view").to_numpy().astype(np.int64)))

    def batches(self, epoch: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                drop_last: bool = True) -> Iterator[ShardBatch]:
        """This rank's batches for ``epoch``; with ``drop_last`` every rank yields :meth:`steps_per_epoch`."""
        rows = self.rank_rows(epoch, rank, world_size, seed)
        steps = self.steps_per_epoch(batch_size, world_size) if drop_last else -(-len(rows) // batch_size)
        for s in range(steps):
            yield self.take(rows[s * batch_size:(s + 1) * batch_size])

    def check_compatible(self, *, dataset: str, num_classes: int, eps: float | None = None,
                         teacher_sha256: str | None = None, data: dict | None = None,
                         attack: dict | None = None) -> None:
        """Refuse shards that do not fit the run, naming each mismatch.

        ``data``/``attack``: the run's config sections (``to_dict(cfg)``). Every field the rows
        depend on is compared (``PINNED_DATA``, ``PINNED_ATTACK``): the split (a different
        ``split_seed`` or fraction would put the run's validation or test samples into training),
        the augmentation, and the attack that made the teacher's DPGD views.
        """
        m = self.manifest
        problems = []
        if m["dataset"] != dataset:
            problems.append(f"dataset {m['dataset']!r} (run: {dataset!r})")
        if int(m["num_classes"]) != num_classes:
            problems.append(f"num_classes {m['num_classes']} (run: {num_classes})")
        if eps is not None and abs(float(m["attack"]["eps"]) - eps) > 1e-9:
            problems.append(f"attack eps {m['attack']['eps']:.6g} (run: {eps:.6g})")
        for section, keys, run in (("data", PINNED_DATA, data), ("attack", PINNED_ATTACK, attack)):
            for key in keys if run is not None else ():
                if section == "attack" and key == "eps" and eps is not None:
                    continue  # compared above
                built, wanted = plain(m.get(section, {}).get(key)), plain(run.get(key))
                if built != wanted and not (isinstance(built, float) and isinstance(wanted, float)
                                            and abs(built - wanted) <= 1e-9):
                    problems.append(f"{section}.{key} {built!r} (run: {wanted!r})")
        if teacher_sha256 is not None and m["teacher"].get("sha256") != teacher_sha256:
            problems.append(f"teacher sha256 {str(m['teacher'].get('sha256'))[:12]}... (given teacher: {teacher_sha256[:12]}...)")
        if problems:
            raise ShardError(f"{self.directory}: shards do not match the run: " + "; ".join(problems)
                             + ". Precompute shards for this run with `dard precompute`.")

    def check_rows(self, splits: Splits, split: str, padding: int, chunk: int = 4096) -> None:
        """Refuse rows that are not the run's own ``split`` samples, whatever the manifest claims:
        each row's natural view must equal ``splits.<split>`` image at its index under the row's
        stored crop/flip, and its label that sample's label. The rows' real split (another of the
        run's splits, or none: another dataset, split seed or fraction) is named in the error."""
        index = self.table.column("index").to_numpy()

        def matches(name: str) -> bool:
            ds = getattr(splits, name)
            if len(index) == 0 or index.min() < 0 or index.max() >= len(ds):
                return False
            for start in range(0, self.table.num_rows, chunk):
                rows = np.arange(start, min(start + chunk, self.table.num_rows))
                batch, t = self.take(rows), self.table.slice(start, len(rows))
                params = AugmentParams(*(torch.from_numpy(t.column(c).to_numpy().astype(a)) for c, a in (
                    ("crop_dx", np.int64), ("crop_dy", np.int64), ("flip", np.bool_))))
                if not torch.equal(batch.label, ds.labels[batch.index]) or not torch.equal(
                        batch.x, apply_augment(ds.images[batch.index], params, padding)):
                    return False
            return True

        if matches(split):
            return
        actual = next((name for name in ("train", "val", "test") if name != split and matches(name)), None)
        claimed = f"the manifest says {self.manifest['split']!r}"
        raise ShardError(f"{self.directory}: its rows are not the run's {split} samples ("
                         + (f"they are its {actual!r} split; {claimed}" if actual else
                            f"they match none of the run's splits: another dataset, split seed or fraction; {claimed}")
                         + "). Precompute shards for this run with `dard precompute`.")

    def check_claims(self, splits: Splits, split: str, padding: int) -> None:
        """What the manifest claims, checked: the rows first (:meth:`check_rows`: they name the split
        they really are), then its fingerprint against its own fields (an edited teacher, attack, ...)."""
        self.check_rows(splits, split, padding)
        check_fingerprint(self.directory, self.manifest)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {"directory": self.directory, "dataset": m["dataset"], "split": m["split"], "teacher": m["teacher"],
                "views": self.views, "samples": self.num_samples, "rows": self.table.num_rows,
                "bytes": sum(p["bytes"] for p in m["parts"]), "parts": len(m["parts"]),
                "bytes_per_row": sum(p["bytes"] for p in m["parts"]) / max(self.table.num_rows, 1),
                "attack": m.get("attack"), "created": m.get("created"), "package_version": m.get("package_version")}


