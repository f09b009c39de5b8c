"""Shared fixtures: digits splits and small trained models, built once per test session."""
from __future__ import annotations

import os

# Keep any Ray a test starts on loopback and quiet, and job clients on token auth (docs/design.md §5).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
# The demo's teacher cache: one per test session, never the user's ~/.cache.
os.environ.setdefault("DARD_CACHE", __import__("tempfile").mkdtemp(prefix="dard-cache-"))
# Trainings log to MLflow by default: one store per test session, never ./mlflow.db nor the user's server.
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{__import__('tempfile').mkdtemp(prefix='dard-mlflow-')}/mlflow.db"

import pytest
import torch

from dard.config import Config
from dard.data import load_splits, to_float


def digits_config(tmp_path, **sections) -> Config:
    sections.setdefault("run", {})
    sections["run"] = {"out_dir": str(tmp_path), "progress": False, **sections["run"]}
    return Config.for_dataset("digits", **sections)


@pytest.fixture(scope="session")
def digits_splits():
    return load_splits(Config.for_dataset("digits").data)


@pytest.fixture(scope="session")
def digits_test(digits_splits):
    return to_float(digits_splits.test.images), digits_splits.test.labels


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory):
    """cnn_small trained naturally and with TRADES (12 epochs each), and a TRADES cnn_large teacher."""
    from dard.training import fit

    out = {}
    for name, arch, method, epochs in [("natural", "cnn_small", "natural", 12), ("trades", "cnn_small", "trades", 12),
                                       ("teacher", "cnn_large", "trades", 6)]:
        tmp = tmp_path_factory.mktemp(name)
        cfg = digits_config(tmp, model={"arch": arch}, loss={"method": method}, optim={"epochs": epochs})
        out[name] = fit(cfg)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that runs Ray in this process (starting one costs ~10 s)."""
    from cluster.ray_session import ensure_ray

    ray = ensure_ray(num_cpus=2, quiet=True, dashboard=False)  # no test reads this session's dashboard
    yield ray
    ray.shutdown()


def load(path):
    from dard.models import load_model

    return load_model(path)[0]


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    from dard.models import build

    return build("cnn_small", 10, 1).eval()
