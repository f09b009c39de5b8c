"""Search spaces as data (YAML-loadable), presets, validation, and the mapping onto a run Config.

A space maps parameter names to distributions::

    temperature: {type: loguniform, low: 1, high: 20}
    w_adv:       {type: uniform, low: 0, high: 1}
    divergence:  {type: choice, values: [kl, dice]}
    lr:          0.05                                 # a plain value is fixed

Loss weights are *normalised*: the sampled w_adv, w_rob, w_nat are divided by their sum, so a
trial's three distillation weights always add up to 1 (w_ce stays as sampled). This removes the
overall scale, which would otherwise act as a second learning rate, and keeps every point valid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dard.config import DIVERGENCES, DPGD_LOSSES, STEP_SCHEDULES, Config, from_dict

# parameter -> (config section, key)
PARAMETERS = {
    "temperature": ("loss", "temperature"), "w_adv": ("loss", "w_adv"), "w_rob": ("loss", "w_rob"),
    "w_nat": ("loss", "w_nat"), "w_ce": ("loss", "w_ce"), "divergence": ("loss", "divergence"),
    "dpgd_loss": ("attack", "dpgd_loss"), "dpgd_schedule": ("attack", "dpgd_schedule"), "lr": ("optim", "lr"),
}
CHOICES = {"divergence": DIVERGENCES, "dpgd_loss": DPGD_LOSSES, "dpgd_schedule": STEP_SCHEDULES}
WEIGHTS = ("w_adv", "w_rob", "w_nat")

PRESETS: dict[str, dict[str, Any]] = {
    # tau, the three weights and the divergence; DPGD as configured.
    "dard-default": {
        "temperature": {"type": "loguniform", "low": 1, "high": 20},
        "w_adv": {"type": "uniform", "low": 0, "high": 1},
        "w_rob": {"type": "uniform", "low": 0, "high": 1},
        "w_nat": {"type": "uniform", "low": 0, "high": 1},
        "divergence": {"type": "choice", "values": ["kl", "dice"]},
    },
    # around RSLAD's point (w_adv 0, w_rob 5/6, w_nat 1/6, tau 1): small adversarial-label weight.
    "rslad-like": {
        "temperature": {"type": "loguniform", "low": 1, "high": 4},
        "w_adv": {"type": "uniform", "low": 0, "high": 0.3},
        "w_rob": {"type": "uniform", "low": 0.5, "high": 1},
        "w_nat": {"type": "uniform", "low": 0, "high": 0.3},
        "divergence": "kl",
    },
    # everything, including the DPGD inner loss and step rule, the hard-label term and lr.
    "wide": {
        "temperature": {"type": "loguniform", "low": 1, "high": 20},
        "w_adv": {"type": "uniform", "low": 0, "high": 1},
        "w_rob": {"type": "uniform", "low": 0, "high": 1},
        "w_nat": {"type": "uniform", "low": 0, "high": 1},
        "w_ce": {"type": "uniform", "low": 0, "high": 1},
        "divergence": {"type": "choice", "values": ["kl", "dice"]},
        "dpgd_loss": {"type": "choice", "values": ["dice", "ce", "dice+ce", "cw"]},
        "dpgd_schedule": {"type": "choice", "values": ["constant", "cosine", "apgd"]},
        "lr": {"type": "loguniform", "low": 0.005, "high": 0.2},
    },
}


class SpaceError(ValueError):
    """An invalid search space; the message names the parameter."""


def load_space(name_or_path: str | Path) -> dict[str, Any]:
    """A preset name or a YAML file; validated."""
    text = str(name_or_path)
    if text in PRESETS:
        return validate_space(PRESETS[text])
    path = Path(text)
    if not path.is_file():
        raise SpaceError(f"unknown search space {text!r}: not a preset ({', '.join(PRESETS)}) nor a YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping of parameter -> distribution")
    return validate_space(raw)


def validate_space(space: dict[str, Any]) -> dict[str, Any]:
    if not space:
        raise SpaceError("the search space is empty")
    for name, spec in space.items():
        if name not in PARAMETERS:
            raise SpaceError(f"{name}: unknown parameter; known: {', '.join(PARAMETERS)}")
        if not isinstance(spec, dict):
            _check_value(name, spec)
            continue
        kind = spec.get("type")
        if kind in ("uniform", "loguniform"):
            low, high = spec.get("low"), spec.get("high")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
                raise SpaceError(f"{name}: {kind} needs numeric low and high, got {spec}")
            if not low < high:
                raise SpaceError(f"{name}: empty range [{low}, {high}] (need low < high)")
            if kind == "loguniform" and low <= 0:
                raise SpaceError(f"{name}: loguniform needs low > 0, got {low}")
            _check_value(name, low)
            _check_value(name, high)
        elif kind == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise SpaceError(f"{name}: choice needs a non-empty list of values")
            for v in values:
                _check_value(name, v)
        else:
            raise SpaceError(f"{name}: unknown distribution type {kind!r}; use uniform, loguniform or choice")
    return space


def _check_value(name: str, value: Any) -> None:
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise SpaceError(f"{name}: {value!r} is not one of {', '.join(CHOICES[name])}")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SpaceError(f"{name}: expected a number, got {value!r}")
    if name in ("temperature", "lr") and value <= 0:
        raise SpaceError(f"{name}: must be > 0, got {value}")
    if name.startswith("w_") and value < 0:
        raise SpaceError(f"{name}: weights must be >= 0, got {value}")


def to_tune(space: dict[str, Any]) -> dict[str, Any]:
    """Ray Tune distributions for the space (fixed values pass through)."""
    from ray import tune

    out = {}
    for name, spec in space.items():
        if not isinstance(spec, dict):
            out[name] = spec
        elif spec["type"] == "uniform":
            out[name] = tune.uniform(spec["low"], spec["high"])
        elif spec["type"] == "loguniform":
            out[name] = tune.loguniform(spec["low"], spec["high"])
        else:
            out[name] = tune.choice(spec["values"])
    return out


def apply(cfg: Config, params: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with the trial's parameters; the three distillation weights normalised to sum 1."""
    raw = cfg.to_dict()
    for name, value in params.items():
        if name in PARAMETERS:
            section, key = PARAMETERS[name]
            raw[section][key] = value
    total = sum(raw["loss"][w] for w in WEIGHTS)
    if total <= 0:
        raw["loss"].update({"w_adv": 0.0, "w_rob": 1.0, "w_nat": 0.0})  # all-zero draw: fall back to w_rob only
    else:
        for w in WEIGHTS:
            raw["loss"][w] = raw["loss"][w] / total
    raw["loss"]["method"] = "dard"
    return from_dict(raw)
