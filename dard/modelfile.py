"""A model, however it was referenced (a dard model file, a storage URI, ``models:/NAME@ALIAS``),
loaded once into one object that every command takes: the model, its header (architecture, class
names, the input it takes, the config it was trained under, the epoch it holds and that epoch's
numbers), its sha256 and, from the registry, its MLflow run. :func:`config_of` is the one rule that
turns a header into the run's Config."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from torch import nn

from dard.config import PRESETS, Config, ConfigError, from_dict
from dard.data import resolve
from dard.models import arch_kwargs, load_model, save_model


def input_spec(cfg: Config) -> dict[str, Any]:
    """How to call a model trained under ``cfg``: float32 NCHW images of ``shape`` with pixels in
    [0, 1] (normalisation is inside the model), grey or RGB, and the L-inf radius it was trained for."""
    c, h, w = cfg.data.image_shape
    return {"shape": [c, h, w], "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0],
            "channels": "grey" if c == 1 else "RGB",
            "threat_model": {"norm": "Linf", "eps": cfg.attack.eps, "step_size": cfg.attack.step_size}}


def config_of(header: dict[str, Any]) -> Config | None:
    """The Config a model file was trained under (its ``meta.config``), checked; None for a file
    that records none (a bare teacher's state dict, or a model saved outside a run)."""
    raw = (header.get("meta") or {}).get("config")
    return from_dict(raw) if raw else None


@dataclass(frozen=True)
class ModelFile:
    """``model`` in eval mode on the CPU; ``header``: the file's (weights aside), with ``sha256``
    and, for a registry model, ``run_id`` and ``registry``; ``where``: how it was referenced."""

    model: nn.Module
    header: dict[str, Any]
    where: str

    @property
    def arch(self) -> str:
        return self.header["arch"]

    @property
    def dataset(self) -> str | None:
        return self.header.get("dataset")

    @property
    def meta(self) -> dict[str, Any]:
        return self.header.get("meta") or {}

    @property
    def sha256(self) -> str | None:
        return self.header.get("sha256")

    @property
    def method(self) -> str | None:
        return self.meta.get("method") or (self.config.loss.method if self.config else None)

    @cached_property
    def config(self) -> Config | None:
        return config_of(self.header)

    def run_config(self, data_dir: str | None = None) -> Config:
        """The config to evaluate or export the model under: the one it was trained with (a file
        without one: its preset's defaults), ``data_dir`` applied, and a source of your own listed
        again -- one that changed since training is refused by name."""
        cfg = self.config
        if cfg is None:
            if self.dataset not in PRESETS:
                raise ConfigError(f"{self.where}: records neither its training config nor a preset dataset "
                                  f"({self.dataset!r}); evaluate it with a dard model file from a training run")
            cfg = Config.for_dataset(self.dataset)
        if data_dir:
            cfg = cfg.updated(data={"data_dir": data_dir})
        return resolve(cfg)

    @property
    def classes(self) -> list[str]:
        """Class names in output order."""
        if self.header.get("classes"):
            return list(self.header["classes"])
        if self.config is not None:
            return list(self.config.data.class_names)
        return list(PRESETS[self.dataset][0]) if self.dataset in PRESETS else [str(i) for i in range(self.header["num_classes"])]

    @property
    def input(self) -> dict[str, Any]:
        """The input contract (:func:`input_spec`); from the config for files written before it was recorded."""
        if self.header.get("input"):
            return dict(self.header["input"])
        if self.config is not None:
            return input_spec(self.config)
        return {"layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0], "channels": "grey" if
                self.header["in_channels"] == 1 else "RGB"}


def from_file(path: str) -> ModelFile:
    """A dard model file (a path or a storage URI), read weights-only. (A registry reference:
    :func:`dard.registry.load_reference`.)"""
    model, header = load_model(path)
    return ModelFile(model, header, str(path))


def save_for(path, model: nn.Module, cfg: Config, meta: dict | None = None):
    """A model built for ``cfg`` (:func:`dard.models.build_for`) written as a dard model file with
    the same facts, its class names and the input it takes; returns the path."""
    return save_model(path, model, arch=cfg.model.arch, num_classes=cfg.data.num_classes,
                      in_channels=cfg.data.image_shape[0], dataset=cfg.data.dataset,
                      arch_kwargs=arch_kwargs(cfg.model), meta=meta, classes=list(cfg.data.class_names),
                      input=input_spec(cfg))
