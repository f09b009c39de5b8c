"""Models found by name (timm-style): ``build("resnet18", num_classes=10, in_channels=3)``."""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from dard.errors import unknown

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper; the model itself otherwise.

    Attacks, validation and saving use the bare module: through DDP an input-only backward
    pass would arm the gradient reducer without ever firing it."""
    return getattr(model, "module", model)


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def knobs(name: str) -> dict[str, Any]:
    """An architecture's own keyword arguments (``model.kwargs``) and their defaults."""
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    return {p.name: p.default for p in params if p.name not in ("num_classes", "in_channels")
            and p.kind is p.POSITIONAL_OR_KEYWORD}


def knob_problems(name: str, kwargs: dict[str, Any]) -> list[str]:
    """What is wrong with ``model.arch``/``model.kwargs`` (``arch: why``, ``kwargs.KEY: why``): an
    unknown architecture or knob, a value of another type than the knob's default, and the
    architecture's own rule (its builder's ``check`` attribute: ``check(**kwargs) -> [why]``)."""
    if name not in _REGISTRY:
        return [f"arch: {unknown(name, available(), 'architecture')}"]
    known = knobs(name)
    out = [f"kwargs.{k}: {name} has no such knob; its knobs: {', '.join(known) or 'none'}"
           + (" (model.kwargs belong to one architecture: --set model.kwargs={} clears them)" if not known else "")
           for k in kwargs if k not in known]
    for k, v in kwargs.items():
        default = known.get(k)
        if k in known and default is not None and not _same_kind(v, default):
            out.append(f"kwargs.{k}: expected {type(default).__name__} like {default!r}, got {v!r}")
    check = getattr(_REGISTRY[name], "check", None)
    if not out and check is not None:
        out += [f"kwargs.{p}" for p in check(**kwargs)]
    return out


def _same_kind(value: Any, default: Any) -> bool:
    """``value`` may stand where ``default`` does (an int for a float, never a bool for a number)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    return isinstance(value, (int, float)) if isinstance(default, float) else isinstance(value, type(default))


def build(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """A fresh model. Input: (B, in_channels, H, W) float in [0, 1]; output: logits (B, num_classes).
    ``kwargs``: the architecture's knobs (:func:`knobs`); ValueError names what is wrong."""
    problems = knob_problems(name, kwargs)
    if problems:
        raise ValueError("; ".join(f"model.{p}" for p in problems))
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


class Normalize(nn.Module):
    """(x - mean) / std per channel, inside the model so attacks work on [0, 1] pixels.

    Buffers are non-persistent: state-dict keys stay those of the bare architecture, so
    checkpoints from other codebases (RobustBench) load unchanged.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# Per-dataset statistics, [0, 1] scale. Identity for unknown channel counts.
DATASET_STATS = {
    1: ((0.30,), (0.40,)),  # digits, measured on the train split (rounded)
    3: ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),  # CIFAR-10 train
}


def default_normalize(in_channels: int) -> Normalize:
    mean, std = DATASET_STATS.get(in_channels, ((0.0,) * in_channels, (1.0,) * in_channels))
    return Normalize(mean, std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
