"""Soft-label shards: the format (``format``), writing, reading back and checking (``store``), the
checked handle a run passes down (``shardset``) and each rank's stream of rows (``stream``).

A shard directory (docs/design.md §4)::

    manifest.json       format version, dataset + split, classes, teacher (id, arch, sha256), the pinned
                        data and attack config, views, samples of each kind (labeled, pool), the plan,
                        parts (file, kind, samples, rows, bytes, sha256, units: view, rows, digest),
                        fingerprint, creation time, package version
    part-00000.arrow    Arrow IPC file: record batches of <= 1024 rows of one view each (the units)
    source-index.json   a source of your own: every image checked (name, sha256, pixel digest)

Row: ``index`` int64 (sample in its split), ``view`` int16, ``label`` int16 (a pool row's: the
teacher's argmax), ``label_source`` int8 (0 true, 1 teacher), ``confidence`` float32 (the
teacher's largest probability), ``crop_dx``/``crop_dy`` int8, ``flip`` bool, ``x`` natural view
uint8 HWC (fixed-size binary), ``delta`` int8 HWC (DPGD perturbation on the 8-bit grid,
x_d = x + delta), ``t_nat``/``t_adv`` float16 logits (fixed-size lists). Directories may be local
paths or pyarrow filesystem URIs (``s3://...``, ``gs://...``).
"""
from dard.shards.format import (FORMAT_VERSION, KINDS, MANIFEST, PINNED_ATTACK, PINNED_DATA, UNIT_ROWS, ShardError,
                                make_manifest, manifest_fingerprint, part_name, plan_fingerprint, plan_parts,
                                rows_to_batches, schema)
from dard.shards.shardset import VERIFICATIONS, ShardSet, Unit
from dard.shards.store import (check_fingerprint, check_part, finished_part, read_manifest, verify, write_manifest,
                               write_part, write_part_record)
from dard.shards.stream import PeerShardError, RankPlan, ShardBatch, agreed, epoch_batches, rank_plan

__all__ = ["FORMAT_VERSION", "KINDS", "MANIFEST", "PINNED_ATTACK", "PINNED_DATA", "PeerShardError", "RankPlan",
           "ShardBatch", "ShardError", "ShardSet", "UNIT_ROWS", "Unit", "VERIFICATIONS", "agreed", "check_fingerprint",
           "check_part", "epoch_batches", "finished_part", "make_manifest", "manifest_fingerprint", "part_name",
           "plan_fingerprint", "plan_parts", "rank_plan", "read_manifest", "rows_to_batches", "schema", "verify",
           "write_manifest", "write_part", "write_part_record"]
