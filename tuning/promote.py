"""Promotion of a sweep's result: which run to register, with which config.

The registry mechanics (register, compare with the champion, move the alias) live in
``dard.tracking`` so that ``dard demo`` can use them too; this module maps sweep trials to them.
"""
from __future__ import annotations

from dard.config import Config, from_dict
from dard.tracking import ALIAS, METRIC, Promotion, absolute_uri, model_name, promote, show

__all__ = ["ALIAS", "METRIC", "Promotion", "model_name", "promote", "show", "sweep_best_config"]


def sweep_best_config(tracking_uri: str, run_id: str) -> Config:
    """The run config a trial ran with (from its params) -- used when promoting from a run id."""
    from mlflow.tracking import MlflowClient

    params = MlflowClient(tracking_uri=absolute_uri(tracking_uri)).get_run(run_id).data.params
    raw: dict = {}
    for key, value in params.items():
        if key.startswith("trial."):
            continue
        section, _, field = key.partition(".")
        raw.setdefault(section, {})[field] = _parse(value)
    return from_dict(raw)


def _parse(text: str):
    import yaml

    if text == "":
        return []
    value = yaml.safe_load(text)
    if isinstance(value, str) and "," in value:  # flattened tuples
        return [yaml.safe_load(v) for v in value.split(",")]
    return value
