"""A shard directory checked once where a run starts (:meth:`ShardSet.open`), then passed down as
it is -- to ``fit``, to every Ray Train worker, to every sweep trial -- which open their units
without checking the directory again (each unit read is still checked against its digest:
:mod:`dard.shards.stream`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dard.data import AugmentParams, apply_augment
from dard.files import absolute, join, resolve
from dard.shards.format import KINDS, PINNED_ATTACK, PINNED_DATA, TEACHER_LABEL, TRUE_LABEL, ShardError, plain
from dard.shards.store import check_fingerprint, check_unit, read_manifest, verify

VERIFICATIONS: list[str] = []  # every full verification of a directory, by path (tests count them)


@dataclass(frozen=True)
class Unit:
    """One record batch: rows of one view of one part (``part``: its index in the manifest)."""

    part: int
    batch: int
    rows: int


@dataclass(frozen=True)
class ShardSet:
    """A shard directory, its manifest, and how much of it was checked (``full``: every part's size
    and unit digests; else the manifest and part sizes)."""

    directory: str
    manifest: dict[str, Any]
    full: bool

    @classmethod
    def open(cls, directory: str, full: bool = True) -> "ShardSet":
        """Read the manifest and check every part: sizes, and with ``full`` schemas, units and digests."""
        directory = absolute(directory)  # ranks and trials run in other directories
        manifest = verify(directory, full=full)
        if full:
            VERIFICATIONS.append(directory)
        return cls(directory, manifest, full)

    @classmethod
    def unchecked(cls, directory: str) -> "ShardSet":
        directory = absolute(directory)
        return cls(directory, read_manifest(directory), False)

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def samples(self, kind: str) -> int:
        return int(self.manifest["samples"].get(kind, 0))

    def units(self, kinds: tuple[str, ...], view: int) -> list[Unit]:
        """The units of ``view`` in the parts of ``kinds``, in manifest order."""
        return [Unit(p, i, u["rows"]) for p, entry in enumerate(self.manifest["parts"]) if entry["kind"] in kinds
                for i, u in enumerate(entry["units"]) if u["view"] == view]

    def path(self, part: int) -> str:
        return join(resolve(self.directory)[1] if "://" not in self.directory else self.directory,
                    self.manifest["parts"][part]["file"])

    def check_compatible(self, *, dataset: str, num_classes: int, teacher_sha256: str | None = None,
                         data: dict | None = None, attack: dict | None = None) -> None:
        """Refuse shards that do not fit the run, naming each mismatch: ``data``/``attack`` are the
        run's config sections (``to_dict(cfg)``); every field the rows depend on is compared
        (``PINNED_DATA``, ``PINNED_ATTACK``): the split (another ``split_seed`` or fraction would put
        the run's validation or test samples into training), the source and its fingerprint, the
        labeled subset and pool, the augmentation, and the attack that made the teacher's views."""
        m = self.manifest
        problems = []
        if m["dataset"] != dataset:
            problems.append(f"dataset {m['dataset']!r} (run: {dataset!r})")
        if int(m["num_classes"]) != num_classes:
            problems.append(f"num_classes {m['num_classes']} (run: {num_classes})")
        for section, keys, run in (("data", PINNED_DATA, data), ("attack", PINNED_ATTACK, attack)):
            for key in keys if run is not None else ():
                built, wanted = plain((m.get(section) or {}).get(key)), plain(run.get(key))
                if built != wanted and not (isinstance(built, float) and isinstance(wanted, float)
                                            and abs(built - wanted) <= 1e-9):
                    problems.append(f"{section}.{key} {built!r} (run: {wanted!r})")
        built, wanted = (m.get("data") or {}).get("fingerprint"), (data or {}).get("fingerprint")
        if data is not None and built and wanted and built != wanted and plain((m.get("data") or {}).get("source")) == \
                plain(data.get("source")):
            named = ", ".join(filter(None, (data.get("source"), data.get("test_source"), data.get("pool"))))
            raise ShardError(f"{self.directory}: {named} changed since these shards were built (a file added, removed, "
                             "renamed, resized or relabelled); rebuild them with `dard precompute`, or restore the files")
        if teacher_sha256 is not None and m["teacher"].get("sha256") != teacher_sha256:
            problems.append(f"teacher sha256 {str(m['teacher'].get('sha256'))[:12]}... (given teacher: {teacher_sha256[:12]}...)")
        if problems:
            raise ShardError(f"{self.directory}: shards do not match the run: " + "; ".join(problems)
                             + ". Precompute shards for this run with `dard precompute`.")

    def read_unit(self, unit: Unit, reader: pa.ipc.RecordBatchFileReader) -> pa.RecordBatch:
        """Unit ``unit`` from an open ``reader`` of its part, checked (rows, view, digest)."""
        try:
            batch = reader.get_batch(unit.batch)
        except (pa.ArrowInvalid, OSError) as err:
            raise ShardError(f"{self.path(unit.part)}: record batch {unit.batch} cannot be read ({err}); re-run "
                             f"`dard precompute --out {self.directory}` to rebuild it") from err
        check_unit(self.directory, self.manifest["parts"][unit.part], unit.batch, batch)
        return batch

    def check_rows(self, splits, split: str, padding: int) -> None:
        """Refuse rows that are not the run's own samples, whatever the manifest claims (presets,
        whose splits are in memory): a labeled row's natural view must be the image of
        ``splits.<split>`` at its index under the row's crop/flip, and its label that image's label;
        a pool row's view must be ``splits.pool``'s image (its label is the teacher's). The rows'
        real split (another of the run's, or none: another dataset, split seed or fraction) is named."""
        if not self._match("labeled", getattr(splits, split), padding):
            actual = next((name for name in ("train", "val", "test") if name != split
                           and self._match("labeled", getattr(splits, name), padding)), None)
            claimed = f"the manifest says {self.manifest['split']!r}"
            raise ShardError(f"{self.directory}: its rows are not the run's {split} samples ("
                             + (f"they are its {actual!r} split; {claimed}" if actual else
                                f"they match none of the run's splits: another dataset, split seed or fraction; {claimed}")
                             + "). Precompute shards for this run with `dard precompute`.")
        if self.samples("pool") and not self._match("pool", splits.pool, padding):
            raise ShardError(f"{self.directory}: its pool rows are not the run's pool (another labeled subset, split "
                             "seed or pool source). Precompute shards for this run with `dard precompute`.")

    def _match(self, kind: str, ds, padding: int) -> bool:
        """Whether every row of ``kind`` is the sample of ``ds`` it names."""

        expected = TRUE_LABEL if kind == "labeled" else TEACHER_LABEL
        for p, entry in enumerate(self.manifest["parts"]):
            if entry["kind"] != kind:
                continue
            fs, path = resolve(self.path(p))
            with fs.open_input_file(path) as f:
                reader = pa.ipc.open_file(f)
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i)  # digests were checked when the set was opened
                    cols = {name: batch.column(name) for name in batch.schema.names}
                    index = cols["index"].to_numpy().copy()
                    if ds is None or len(index) == 0 or index.min() < 0 or index.max() >= len(ds) \
                            or (cols["label_source"].to_numpy() != expected).any():
                        return False
                    params = AugmentParams(*(torch.from_numpy(cols[c].to_numpy(zero_copy_only=False).astype(a))
                                             for c, a in (("crop_dx", np.int64), ("crop_dy", np.int64), ("flip", np.bool_))))
                    if kind == "labeled" and not torch.equal(torch.from_numpy(cols["label"].to_numpy().astype(np.int64)),
                                                             ds.labels[torch.from_numpy(index)]):
                        return False
                    if not torch.equal(_pixels(cols["x"], self.image_shape, np.uint8),
                                       apply_augment(ds.read(index), params, padding)):
                        return False
        return True

    def check_claims(self, splits, split: str, padding: int) -> None:
        """What the manifest claims, checked: the rows (:meth:`check_rows`), then its fingerprint
        against its own fields (an edited teacher, attack, plan...)."""
        self.check_rows(splits, split, padding)
        check_fingerprint(self.directory, self.manifest)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        total = sum(p["bytes"] for p in m["parts"])
        return {"directory": self.directory, "dataset": m["dataset"], "split": m["split"], "teacher": m["teacher"],
                "views": self.views, "samples": m["samples"], "rows": m["rows"], "bytes": total,
                "parts": len(m["parts"]), "bytes_per_row": total / max(m["rows"], 1), "attack": m.get("attack"),
                "classes": m.get("classes"), "created": m.get("created"), "package_version": m.get("package_version")}


def _pixels(column: pa.Array, image_shape: tuple[int, int, int], dtype) -> torch.Tensor:
    """A fixed-size binary column of HWC images -> (N, C, H, W) tensor of ``dtype`` (a copy)."""
    c, h, w = image_shape
    n = len(column)
    buf = np.frombuffer(column.buffers()[1], dtype=np.uint8, count=n * c * h * w, offset=column.offset * c * h * w)
    return torch.from_numpy(buf.view(dtype).reshape(n, h, w, c).transpose(0, 3, 1, 2).copy())


def open_reader(path: str) -> tuple[Any, pa.ipc.RecordBatchFileReader]:
    """(the open file, a reader of the part at ``path``): each unit asked for is read on its own (a
    ranged read from object storage), into memory the rank frees once it has trained on it. (Not
    memory-mapped: a mapping keeps every page it touched resident while the part stays open.)"""
    fs, local = resolve(path)
    source = fs.open_input_file(local)
    return source, pa.ipc.open_file(source)

__all__ = ["ShardSet", "Unit", "VERIFICATIONS", "KINDS", "open_reader"]
