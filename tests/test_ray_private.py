"""Every private Ray symbol dard relies on (cluster/ray_private.py) still exists in the installed Ray."""
import importlib

import pytest

from cluster.ray_private import SYMBOLS


@pytest.mark.parametrize("name", sorted(SYMBOLS))
def test_each_private_ray_symbol_still_exists(name):
    import ray.tune

    module, _, attr = name.rpartition(".")
    if module == "ray.tune.Tuner":  # an attribute of every Tuner
        assert hasattr(ray.tune.Tuner(lambda config: None), attr), f"{name} is gone: {SYMBOLS[name]}"
        return
    assert hasattr(importlib.import_module(module), attr), f"{name} is gone: {SYMBOLS[name]}"


def test_nothing_else_private_of_ray_is_used():
    """A private Ray name anywhere else in the package is one this module does not watch."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"(from ray[\w.]* import _|ray\._private|\._local_tuner|ray[\w.]*\._[a-z])")
    found = [f"{p.relative_to(repo)}:{i}" for package in ("dard", "cluster", "tuning") for p in (repo / package).rglob("*.py")
             if p.name != "ray_private.py" for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found
