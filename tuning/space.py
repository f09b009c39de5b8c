"""Search spaces as data (YAML-loadable), presets, validation, and the mapping onto a run Config.

A space maps parameter names to distributions::

    temperature: {type: loguniform, low: 1, high: 20}
    w_adv:       {type: uniform, low: 0, high: 1}
    divergence:  {type: choice, values: [kl, dice]}
    lr:          0.05                                 # a plain value is fixed

For DARD with a teacher robustness target (``teacher_nat``/``teacher_adv``) the loss weights are
*normalised*: the sampled w_adv, w_rob, w_nat are divided by their sum, so a trial's three
distillation weights add up to 1 (w_ce, w_ce_adv stay as sampled). This removes the overall
scale, which would otherwise act as a second learning rate. With ``rob_target: self`` the TRADES
pair (w_ce = 1, w_rob * trades_beta), with ``label`` SAT's CE at x_s sets the scale, so weights
stay as sampled.

``method`` is a parameter too: the baseline presets (``sat``, ``trades``, ``ard``, ``rslad``) fix
it and search lr plus that method's own knobs, so every method gets the same tuning budget.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dard.config import Config, ConfigError, check_value, field_hints, from_dict, load_strict
from dard.losses import ROBUST_TERMS

# parameter -> (config section, key)
PARAMETERS = {
    "temperature": ("loss", "temperature"), "w_adv": ("loss", "w_adv"), "w_rob": ("loss", "w_rob"),
    "w_nat": ("loss", "w_nat"), "w_ce": ("loss", "w_ce"), "divergence": ("loss", "divergence"),
    "dpgd_loss": ("attack", "dpgd_loss"), "dpgd_schedule": ("attack", "dpgd_schedule"), "lr": ("optim", "lr"),
    "w_ce_adv": ("loss", "w_ce_adv"), "rob_target": ("loss", "rob_target"), "method": ("loss", "method"),
    "trades_beta": ("loss", "trades_beta"), "ard_alpha": ("loss", "ard_alpha"),
    "ard_temperature": ("loss", "ard_temperature"), "weight_decay": ("optim", "weight_decay"),
}
LR_RANGE = {"type": "loguniform", "low": 0.02, "high": 0.8}
WEIGHTS = ("w_adv", "w_rob", "w_nat")

PRESETS: dict[str, dict[str, Any]] = {
    # tau, the three weights and the divergence; DPGD as configured.
    "dard-default": {
        "method": "dard", "rob_target": "teacher_nat",
        "temperature": {"type": "loguniform", "low": 1, "high": 20},
        "w_adv": {"type": "uniform", "low": 0, "high": 1},
        "w_rob": {"type": "uniform", "low": 0, "high": 1},
        "w_nat": {"type": "uniform", "low": 0, "high": 1},
        "divergence": {"type": "choice", "values": ["kl", "dice"]},
    },
    # around RSLAD's point (w_adv 0, w_rob 5/6, w_nat 1/6, tau 1): small adversarial-label weight.
    "rslad-like": {
        "method": "dard", "rob_target": "teacher_nat",
        "temperature": {"type": "loguniform", "low": 1, "high": 4},
        "w_adv": {"type": "uniform", "low": 0, "high": 0.3},
        "w_rob": {"type": "uniform", "low": 0.5, "high": 1},
        "w_nat": {"type": "uniform", "low": 0, "high": 0.3},
        "divergence": "kl",
    },
    # everything the shards do not fix: the weights, the hard-label terms and lr. (The DPGD loss and
    # schedule shape the shards' teacher views: sweep them by building shards per choice.)
    "wide": {
        "method": "dard", "rob_target": "teacher_nat",
        "temperature": {"type": "loguniform", "low": 1, "high": 20},
        "w_adv": {"type": "uniform", "low": 0, "high": 1},
        "w_rob": {"type": "uniform", "low": 0, "high": 1},
        "w_nat": {"type": "uniform", "low": 0, "high": 1},
        "w_ce": {"type": "uniform", "low": 0, "high": 1},
        "w_ce_adv": {"type": "uniform", "low": 0, "high": 1},
        "divergence": {"type": "choice", "values": ["kl", "dice"]},
        "lr": {"type": "loguniform", "low": 0.005, "high": 0.2},
    },
    # DARD on a TRADES backbone: the student's own robustness term plus the teacher's precomputed
    # soft labels on its DPGD views (w_adv) and on natural views (w_nat).
    "dard-trades": {
        "method": "dard", "rob_target": "self", "w_rob": 1.0, "w_ce": 1.0, "lr": LR_RANGE,
        "trades_beta": {"type": "uniform", "low": 2, "high": 8},
        "w_adv": {"type": "uniform", "low": 0, "high": 2},
        "w_nat": {"type": "uniform", "low": 0, "high": 0.5},
    },
    # DARD on a SAT backbone (the digits default, benchmarks/results/grid-digits.md): CE at the
    # student's own PGD example plus the teacher's soft labels on its DPGD views and natural views.
    "dard-sat": {
        "method": "dard", "rob_target": "label", "w_rob": 1.0, "w_ce": 0.0, "lr": LR_RANGE,
        "w_adv": {"type": "uniform", "low": 0, "high": 2},
        "w_nat": {"type": "uniform", "low": 0, "high": 0.5},
    },
    # Baselines, each with lr and its own knobs (benchmarks/tune_methods.py gives each the same trials).
    "sat": {"method": "sat", "lr": LR_RANGE},
    "trades": {"method": "trades", "lr": LR_RANGE, "trades_beta": {"type": "uniform", "low": 2, "high": 8}},
    "ard": {"method": "ard", "lr": LR_RANGE, "ard_temperature": {"type": "loguniform", "low": 1, "high": 30},
            "ard_alpha": {"type": "uniform", "low": 0.5, "high": 1}},
    "rslad": {"method": "rslad", "lr": LR_RANGE},
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
        raw = load_strict(path.read_text(), str(path))  # a parameter given twice is refused, not overwritten
    except ConfigError as err:
        raise SpaceError(str(err)) from err
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
    """The config field's own type, choices and bounds (``dard.config``), named as the space names it."""
    section, key = PARAMETERS[name]
    problems = check_value(name, value, field_hints(type(getattr(Config(), section)))[key])[1]
    if problems:
        raise SpaceError(problems[0])


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
    """A copy of ``cfg`` with the trial's parameters (DARD weights normalised as the module says)."""
    raw = cfg.to_dict()
    for name, value in params.items():
        if name in PARAMETERS:
            section, key = PARAMETERS[name]
            raw[section][key] = value
    loss = raw["loss"]
    if loss["method"] == "dard" and not ROBUST_TERMS[loss["rob_target"]].hard_label_scaled:
        total = sum(loss[w] for w in WEIGHTS)
        if total <= 0:
            loss.update({"w_adv": 0.0, "w_rob": 1.0, "w_nat": 0.0})  # all-zero draw: fall back to w_rob only
        else:
            for w in WEIGHTS:
                loss[w] = loss[w] / total
    return from_dict(raw)
