"""Model files: save with metadata, load safely (``weights_only=True``), clear errors.

A dard model file is a dict of plain values and tensors::

    {"format": "dard-model/1", "arch": str, "num_classes": int, "in_channels": int,
     "arch_kwargs": dict, "dataset": str, "classes": [names], "input": {...}, "state_dict": {...},
     "meta": {...}}

``classes`` (class names in output order) and ``input`` (shape, layout, dtype, the [0, 1] range,
channels, the L-inf eps the model was trained for) say how to call the model; files written before
them get both from their config (:mod:`dard.modelfile`).

``load_teacher`` also accepts a bare state dict or ``{"state_dict": ...}`` as RobustBench and
most research repos save them (a ``module.`` prefix from DataParallel is stripped).
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dard.files import atomic_write, exists, is_uri, read_bytes, sha256 as file_sha256
from dard.models.registry import build, unwrap

FORMAT = "dard-model/1"


class ModelFileError(ValueError):
    """A model file is missing, unreadable, or does not fit the requested architecture."""


class NonFiniteWeightsError(FloatingPointError):
    """Weights hold NaN/Inf: never written to a file, never evaluated."""


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first tensors of ``state`` holding NaN/Inf."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteWeightsError(f"{what}: {len(bad)} tensors hold NaN/Inf (first: {bad[:3]}); refusing to use them. "
                                    "Training diverged: lower optim.lr or optim.weight_decay, or enable optim.grad_clip.")


def save_model(path: str | Path, model: nn.Module, *, arch: str, num_classes: int, in_channels: int,
               dataset: str, arch_kwargs: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
               classes: list[str] | None = None, input: dict[str, Any] | None = None) -> Path | str:
    """Write a dard model file to ``path`` (a local path, returned as a Path, or a storage URI)."""
    path = path if is_uri(path) else Path(path)
    model = unwrap(model)
    check_finite(model.state_dict(), f"model for {path}")
    if classes is not None and len(classes) != num_classes:
        raise ModelFileError(f"{path}: {len(classes)} class names for {num_classes} outputs")
    payload = {"format": FORMAT, "arch": arch, "num_classes": num_classes, "in_channels": in_channels,
               "arch_kwargs": dict(arch_kwargs or {}), "dataset": dataset,
               **({"classes": list(classes)} if classes is not None else {}), **({"input": dict(input)} if input else {}),
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
               "meta": dict(meta or {})}
    atomic_write(path, lambda f: torch.save(payload, f))  # a crash never leaves a half-written model file
    return path


def read_file(path: str | Path, data: bytes | None = None) -> Any:
    """torch.load with weights_only=True (never unpickles arbitrary objects). ``data``: the file's
    bytes, already read (a Ray task gets the teacher from the object store); ``path`` then names it.
    ``path`` may be a storage URI."""
    if data is None and is_uri(path):
        if not exists(path):
            raise ModelFileError(f"model file not found: {path}")
        data = read_bytes(path)
    path = path if is_uri(path) else Path(path)
    if data is None and not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        return torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt zip, pickled classes, truncated file
        raise ModelFileError(f"{path}: cannot be read as a weights-only PyTorch file ({refusal(err)}). "
                             "Save models with torch.save(model.state_dict(), path) or `dard train-teacher`.") from err


def refusal(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words: torch's own message
    goes on to advise loading it with ``weights_only=False`` or allow-listing its classes, which
    would run code from the file."""
    text = str(err)
    pickled = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if pickled:
        return f"it holds a pickled {pickled.group(1)}, which dard never unpickles"
    unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if unpickler:  # e.g. "Unsupported operand 123": not a PyTorch file at all (JSON, ONNX, ...)
        return f"not a PyTorch file: {unpickler.group(1).strip()}"
    return f"{type(err).__name__}: {text.strip().splitlines()[0] if text.strip() else 'unreadable'}"


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A dard model file -> (model in eval mode, its header without the state dict, plus the
    file's ``sha256``)."""
    model, header = _dard_model(read_file(path), path, map_location)
    return model, {**header, "sha256": file_sha256(path)}


def _dard_model(payload: Any, path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT):
        raise ModelFileError(f"{path}: not a dard model file (no '{FORMAT}' header). For a bare state dict "
                             "(e.g. a RobustBench checkpoint) use load_teacher(path, arch, num_classes) or "
                             "`dard distill --teacher PATH --teacher-arch ARCH`.")
    missing = [k for k in ("arch", "num_classes", "in_channels", "arch_kwargs", "state_dict") if k not in payload]
    if missing:
        raise ModelFileError(f"{path}: the model header lacks {missing}; re-export it with `dard registry load` or train it again")
    model = build(payload["arch"], payload["num_classes"], payload["in_channels"], **payload["arch_kwargs"])
    _load_state(model, payload["state_dict"], path, payload["arch"], payload["num_classes"])
    header = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.to(map_location).eval(), header


def load_teacher(path: str | Path, arch: str | None = None, num_classes: int | None = None, in_channels: int | None = None,
                 *, data: bytes | None = None, **arch_kwargs) -> tuple[nn.Module, dict[str, Any]]:
    """Load a teacher and check it is what the run expects.

    ``arch``/``num_classes``/``in_channels`` None means "whatever the file says" (dard files only).
    ``data``: the file's bytes when already read (see :func:`read_file`). Returns (model in eval
    mode, header). Raises :class:`ModelFileError` naming the mismatch.
    """
    payload = read_file(path, data)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        expected = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels}
        for key, want in expected.items():
            if want is not None and payload[key] != want:
                raise ModelFileError(f"{path}: holds a {payload['arch']} with {payload['num_classes']} classes and "
                                     f"{payload['in_channels']} input channels (dataset {payload['dataset']}), but the run "
                                     f"expects {key}={want!r}.")
        return _dard_model(payload, path)
    if arch is None or num_classes is None:
        raise ModelFileError(f"{path}: a bare state dict; name its architecture and class count "
                             "(--teacher-arch, and the dataset gives the classes).")
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: expected a state dict of tensors (or {{'state_dict': ...}}).")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("sub_block1.") for k in state):
        arch_kwargs.setdefault("sub_block1", True)
    model = build(arch, num_classes, in_channels or 3, **arch_kwargs)
    _load_state(model, state, path, arch, num_classes)
    header = {"format": "state_dict", "arch": arch, "num_classes": num_classes, "in_channels": in_channels or 3,
              "arch_kwargs": arch_kwargs, "dataset": None, "meta": {}}
    return model.eval(), header


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Any, arch: str, num_classes: int) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:3]})")
        if wrong:
            k, got, want = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (first: {k} is {got} in the file, {want} in {arch})")
        hint = ""
        fc = [w for w in wrong if w[0].endswith(("fc.weight", "linear.weight"))]
        if fc:
            hint = f" The classifier has {fc[0][1][0]} outputs in the file but the run expects {num_classes} classes."
        raise ModelFileError(f"{path}: weights do not fit architecture {arch!r} with {num_classes} classes: "
                             + "; ".join(parts) + "." + hint)
    check_finite(state, str(path))
    model.load_state_dict(state, strict=True)
