"""Soft-label shards: the format (``format``), writing and the manifest (``store``), verification
(``verify``) and the memory-mapped reader (``reader``).

A shard directory (docs/design.md §4)::

    manifest.json       format version, dataset + split, teacher (id, arch, sha256), attack config,
                        views per sample, classes, image shape, augmentation, parts (file, rows,
                        bytes, sha256), creation time, package version
    part-00000.arrow    Arrow IPC file, record batches of <= 4096 rows

Row: ``index`` int64 (sample in the split), ``view`` int16, ``label`` int16, ``crop_dx``/``crop_dy``
int8, ``flip`` bool, ``x`` natural view uint8 HWC (fixed-size binary), ``delta`` int8 HWC (DPGD
perturbation on the 8-bit grid, x_d = x + delta), ``t_nat``/``t_adv`` float16 logits (fixed-size
lists). Epoch e reads view ``e mod V``; each DDP rank gets a disjoint slice of a seeded shuffle.
Directories may be local paths or pyarrow filesystem URIs (``s3://...``, ``gs://...``); local
files are memory-mapped (zero copy).
"""
from dard.shards.format import (FORMAT_VERSION, MANIFEST, PINNED_ATTACK, PINNED_DATA, ShardError, fingerprint,
                                make_manifest, manifest_fingerprint, part_name, plan_fingerprint, rows_to_table,
                                schema)
from dard.shards.reader import ShardBatch, ShardReader
from dard.shards.store import finished_part, read_manifest, write_manifest, write_part, write_part_record
from dard.shards.verify import check_fingerprint, check_part, verify

__all__ = ["FORMAT_VERSION", "MANIFEST", "PINNED_ATTACK", "PINNED_DATA", "ShardBatch", "ShardError", "ShardReader",
           "check_fingerprint", "check_part", "finished_part", "fingerprint", "make_manifest", "manifest_fingerprint", "part_name",
           "plan_fingerprint", "read_manifest",
           "rows_to_table", "schema", "verify", "write_manifest", "write_part", "write_part_record"]
