"""Where a run starts: a data section naming a source is listed once and its facts pinned.

:func:`resolve_section` fills ``source``/``test_source`` (a folder with ``train/`` and ``test/`` is
split into both), ``classes``, ``shape`` and ``fingerprint`` (the digest of every source the
config names: the training, test and pool listings). A config that already carries them (a model
file's, a shard manifest's, a YAML a run wrote) must find the same source: a changed one is refused
naming what changed. Presets need nothing, unless they take a pool of your images.
"""
from __future__ import annotations

import hashlib
from typing import Any

from dard.config import Config, ConfigError, DataConfig, from_dict, teacher_config, to_dict
from dard.data.sources import SourceError, first_shape, list_source, split_folders


def resolve(cfg: Config) -> Config:
    """``cfg`` with its data section resolved (:func:`resolve_section`); presets unchanged."""
    data = to_dict(cfg)["data"]
    resolved = resolve_section(data)
    return cfg if resolved == data else cfg.updated(data=resolved)


def is_resolved(cfg: DataConfig) -> bool:
    return (cfg.preset and (cfg.pool is None or cfg.fingerprint is not None)) or (
        cfg.classes != () and cfg.shape is not None and cfg.fingerprint is not None)


def resolve_section(data: dict[str, Any]) -> dict[str, Any]:
    """A ``data`` section (plain values) with its source's facts filled and checked."""
    data = dict(data)
    columns = {"image_column": data.get("image_column", "image"), "label_column": data.get("label_column", "label")}
    source, test_source, pool = data.get("source"), data.get("test_source"), data.get("pool")
    if source is None and pool is None:
        return data
    listings = []
    if source is not None:
        if test_source is None and (pair := split_folders(source)) is not None:
            source, test_source = pair
        train = list_source(source, **columns)
        listings.append(train)
        if test_source is not None:
            listings.append(list_source(test_source, classes=train.classes, **columns))
        given = tuple(data.get("classes") or ())
        if given and given != train.classes:
            raise SourceError(f"data.classes: {source} holds the classes {', '.join(train.classes)}; the config says "
                              f"{', '.join(given)} (a model or shards of another class list)")
        size = tuple(data["image_size"]) if data.get("image_size") else None
        shape = first_shape(train, size, data.get("channels"))
        if data.get("shape") and tuple(data["shape"]) != shape:
            raise SourceError(f"data.shape: {source}'s images are stored as {list(shape)} (channels, height, width); "
                              f"the config says {list(data['shape'])}")
        data.update(source=source, test_source=test_source, classes=list(train.classes), shape=list(shape))
    if pool is not None:
        listings.append(list_source(pool, labeled=False, **columns))
    digest = fingerprint(listings)
    if data.get("fingerprint") and data["fingerprint"] != digest:
        named = ", ".join(filter(None, (source, test_source, pool)))
        raise SourceError(f"data.fingerprint: {named} changed since this config was pinned (a file added, removed, "
                          f"renamed, resized or relabelled); recorded {data['fingerprint'][:12]}..., now "
                          f"{digest[:12]}...: rebuild what was made from it, or restore the files")
    data["fingerprint"] = digest
    return data


def fingerprint(listings) -> str:
    h = hashlib.sha256()
    for listing in listings:
        h.update(f"{listing.spec}\n{listing.digest()}\n".encode())
    return h.hexdigest()[:32]


def source_config(dataset: str, teacher: bool = False, **sections: dict[str, Any]) -> Config:
    """A config for your own images: ``sections["data"]`` names the source; it is listed, its facts
    pinned, and the defaults of :func:`dard.config.source_defaults` (the teacher's with ``teacher``)
    applied under ``sections``."""

    data = resolve_section({"dataset": dataset, **(sections.get("data") or {})})
    sections = {**sections, "data": data}
    try:
        return teacher_config(dataset, **sections) if teacher else Config.for_dataset(dataset, **sections)
    except ConfigError:
        raise
    except (KeyError, TypeError) as err:  # a malformed section: let from_dict say which field
        raise ConfigError(str(err)) from err

__all__ = ["resolve", "resolve_section", "is_resolved", "source_config", "fingerprint", "from_dict"]
