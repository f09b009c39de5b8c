"""Lineage: what a model was made from, recorded where it is trained (walked back from the
registry by :func:`dard.registry.walk`, ``dard lineage models:/NAME@ALIAS``): student -> its
MLflow run -> the training data and the shards it read -> the teacher that made them -> the
teacher's own run.

A run records it when its model is logged (:func:`dard.tracking.log_model`): as tags
(``dard.teacher.*``, ``dard.shards.*``, ``dard.data.digest``) and as MLflow dataset inputs whose
digests are the data's: the training split's content (a preset's images, a source's listing
fingerprint and the split that carves it) and the shards' (the digest of their units' digests).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from dard.config import Config, to_dict
from dard.shards import PINNED_DATA, ShardSet

TEACHER_RUN_TAG = "dard.model_sha256"  # a run that logged a model file carries its sha256 (dard.tracking)
VALIDATION_DATA_TAG = "dard.data.validation"  # "N samples DIGEST": the validation images a run is scored on


def data_record(cfg: Config, train, val=None) -> dict[str, Any]:
    """The training split a run learns from: its name, where it lives, its size and a digest of its
    content (a preset's images and labels, hashed; a source's listing fingerprint and the pinned
    fields that carve the split from it: decoding a large source again would cost a pass over it).
    ``val``: the validation samples it is scored on (already decoded), recorded as their count and a
    digest of their images and labels (``validation``): two runs' scores compare only if these match."""
    d = cfg.data
    h = hashlib.sha256(json.dumps({k: to_dict(cfg)["data"].get(k) for k in PINNED_DATA}, sort_keys=True).encode())
    if d.preset:
        h.update(train.images.numpy().tobytes())
        h.update(train.labels.numpy().tobytes())
    location = d.source or (d.data_dir or ("sklearn.datasets.load_digits" if d.dataset == "digits" else d.dataset))
    record = {"name": f"{d.dataset}-train", "location": location, "samples": len(train), "digest": h.hexdigest()[:32]}
    if val is not None:
        v = hashlib.sha256(val.images.numpy().tobytes())
        v.update(val.labels.numpy().tobytes())
        record["validation"] = {"samples": len(val), "digest": v.hexdigest()[:16]}
    return record


def shards_record(shards: ShardSet) -> dict[str, Any]:
    """Shards a run reads: where, their plan's fingerprint, and a digest of their content (of every
    unit's digest, as the manifest lists them)."""
    h = hashlib.sha256()
    for part in shards.manifest["parts"]:
        for unit in part["units"]:
            h.update(unit["sha256"].encode())
    return {"directory": shards.directory, "fingerprint": shards.manifest.get("fingerprint"),
            "digest": h.hexdigest()[:32], "samples": shards.manifest["samples"], "views": shards.views}


def tags(meta: dict[str, Any]) -> dict[str, str]:
    """MLflow tags of a model file's lineage (its meta: ``teacher``, ``shards``, ``data``)."""
    out = {}
    for key, value in (meta.get("teacher") or {}).items():
        if value is not None:
            out[f"dard.teacher.{key}"] = str(value)
    for key in ("directory", "fingerprint", "digest"):
        if (meta.get("shards") or {}).get(key):
            out[f"dard.shards.{key}"] = str(meta["shards"][key])
    if (meta.get("data") or {}).get("digest"):
        out["dard.data.digest"] = meta["data"]["digest"]
    validation = (meta.get("data") or {}).get("validation")
    if validation:
        out[VALIDATION_DATA_TAG] = f"{validation['samples']} samples {validation['digest']}"
    return out


def inputs(meta: dict[str, Any]) -> list:
    """MLflow dataset inputs of a model file's lineage: the training split and the shards, each with
    its content digest (metadata only: the images stay where they are)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    out = []
    data, shards = meta.get("data") or {}, meta.get("shards") or {}
    if data:
        source = CodeDatasetSource({"location": str(data.get("location")), "samples": str(data.get("samples"))})
        out.append(DatasetInput(MetaDataset(source, name=data["name"], digest=data["digest"])._to_mlflow_entity(),
                                tags=[InputTag("mlflow.data.context", "training")]))
    if shards.get("digest"):
        source = CodeDatasetSource({"location": str(shards["directory"]), "fingerprint": str(shards.get("fingerprint"))})
        name = f"{(meta.get('config') or {}).get('data', {}).get('dataset', 'data')}-shards"
        out.append(DatasetInput(MetaDataset(source, name=name, digest=shards["digest"])._to_mlflow_entity(),
                                tags=[InputTag("mlflow.data.context", "teacher soft labels")]))
    return out
