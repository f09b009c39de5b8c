"""Training checkpoints: everything to resume exactly, written atomically, read weights-only.

Layout: ``{"epoch", "model", "optimizer", "scheduler", "config",
"history", "extra"}`` -- tensors and plain values only, so ``torch.load(weights_only=True)``
reads it and nothing is ever unpickled.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dard.files import atomic_write, is_uri, read_bytes
from dard.models.io import check_finite, refusal
from dard.models.registry import unwrap


class CheckpointError(ValueError):
    pass


def checkpoint_state(model: nn.Module, optimizer, scheduler, epoch: int, config: dict, history: list,
                     extra: dict | None = None) -> dict[str, Any]:
    """``epoch`` is the last *finished* epoch (0-based); resume starts at epoch + 1."""
    return {
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "config": config,
        "history": history,
        "extra": dict(extra or {}),
    }


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path | str:
    """Atomic write; refuses a state whose model weights hold NaN/Inf (the previous checkpoint stays)."""

    path = path if is_uri(path) else Path(path)
    check_finite(state["model"], f"checkpoint {path}")
    atomic_write(path, lambda f: torch.save(state, f))  # a crash mid-write leaves the previous checkpoint intact
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file (a path or storage URI), read weights-only."""
    path = path if is_uri(path) else Path(path)
    try:
        state = torch.load(io.BytesIO(read_bytes(path)) if is_uri(path) else path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({refusal(err)}); delete it to restart "
                              "from scratch") from err
    for key in ("epoch", "model", "optimizer"):
        if key not in state:
            raise CheckpointError(f"{path}: not a dard checkpoint (no {key!r})")
    return state

# Fields a resumed run may change: where it runs and what it prints, not what it computes.
RESUMABLE_CHANGES = {("run", "progress"), ("run", "device"), ("run", "out_dir"), ("data", "data_dir")}


def check_resumable(state: dict[str, Any], config: dict, path: str | Path) -> None:
    """Refuse to resume a checkpoint written by another run config (method, epochs, lr, ...):
    the history and schedule would silently mix two runs. Names the first differing fields."""
    saved = state.get("config") or {}
    diffs = [f"{section}.{key}: {saved[section].get(key)!r} in the checkpoint, {value!r} now"
             for section, values in config.items() if isinstance(values, dict) and section in saved
             for key, value in values.items()
             if (section, key) not in RESUMABLE_CHANGES and saved[section].get(key) != value]
    if diffs:
        raise CheckpointError(f"{path}: --resume with a different config ({'; '.join(diffs[:3])}). Resume with the "
                              "same settings, or start anew elsewhere (another --out; `dard train`: another --name)"
                              " or delete the checkpoint.")


def selection_metric(method: str) -> str:
    """What selects a run's model: validation robust accuracy (samples surviving PGD and CW), or
    natural accuracy for a natural (non-robust) baseline."""
    return "val_natural_acc" if method == "natural" else "val_robust_acc"


def note_best(best: dict | None, epoch: int, metrics: dict, model: nn.Module, metric: str) -> dict | None:
    """The checkpoint's ``best`` record after ``epoch``: ``{"epoch", "metric", "score", "model"}``
    (weights on the CPU), replaced when this epoch's ``metric`` is at least as good (a later epoch
    wins a tie). Epochs without validation leave it as it was."""
    score = metrics.get(metric)
    if score is None or (best is not None and score < best["score"]):
        return best
    return {"epoch": epoch, "metric": metric, "score": score,
            "model": {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}}


def selected(state: dict[str, Any]) -> tuple[dict, int]:
    """(weights, epoch) of the model a run ships: the epoch of the best selection metric
    (:func:`selection_metric`; adversarial training overfits robustly, so the last epoch is often
    not the best), else the last."""
    best = (state.get("extra") or {}).get("best")
    return (best["model"], int(best["epoch"])) if best else (state["model"], int(state["epoch"]))


def restore(state: dict[str, Any], model: nn.Module, optimizer=None, scheduler=None) -> int:
    """Load a checkpoint into live objects; returns the epoch to start from. (No RNG state: the
    epoch loop seeds every epoch from (seed, rank, epoch), so a resumed epoch replays exactly.)"""
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]) + 1
