"""Every private Ray symbol dard relies on, named once, each with why (Ray 2.60, the version tested:
``pyproject.toml`` bounds it). ``tests/test_ray_private.py`` checks that each still exists, so an
upgrade that moves one fails there, by name, and not in a training run.

Ray Train's names are imported on first use (module ``__getattr__``): importing Ray Train fixes
its auth mode, so only once Ray is set up (:func:`cluster.ray_session.ensure_ray`), and it costs
~1.2 CPU-seconds more than torch and Ray alone, which a command without Ray Train (precompute)
need not pay.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

# DDP rendezvous through a file and gloo on loopback on a local cluster, and the node's cluster
# interface across machines (cluster/rendezvous.py): Ray Train's TorchConfig has no hook for either,
# so its backend is subclassed and its process-group setup called with our init method.
_TORCH_CONFIG = {"TorchBackend": "_TorchBackend", "setup_torch_process_group": "_setup_torch_process_group",
                 "set_torch_distributed_env_vars": "_set_torch_distributed_env_vars"}


def __getattr__(name: str):
    if name in _TORCH_CONFIG:
        from ray.train.torch import config

        return getattr(config, _TORCH_CONFIG[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# name -> why; what tests/test_ray_private.py checks
SYMBOLS = {
    "ray.train.torch.config._TorchBackend": "subclassed for the loopback / node-interface rendezvous",
    "ray.train.torch.config._setup_torch_process_group": "called with a file:// init method on one machine",
    "ray.train.torch.config._set_torch_distributed_env_vars": "the env vars a rank needs, set as Ray Train does",
    "ray.tune.Tuner._local_tuner": "Tuner.restore takes no RunConfig: the restored sweep's callbacks are set on it",
    "ray.autoscaler._private.util.prepare_config": "validates the cluster YAMLs against Ray's schema (tests)",
    "ray.autoscaler._private.util.validate_config": "validates the cluster YAMLs against Ray's schema (tests)",
    "ray._private.runtime_env.packaging._dir_travel": "walks a job's working dir as Ray packages it (dard submit)",
    "ray._private.runtime_env.packaging._get_excludes": "the runtime_env 'excludes' patterns, as Ray applies them",
    "ray._private.runtime_env.packaging.GCS_STORAGE_MAX_SIZE": "the largest package Ray uploads",
    "ray._private.ray_logging.global_worker_stdstream_dispatcher": "what workers write to stderr goes to the log file",
}


def restored_run_config(tuner) -> Any:
    """The RunConfig of a ``Tuner.restore``d sweep, whose callbacks and verbosity a resume sets."""
    return tuner._local_tuner.get_run_config()


def validate_cluster_config(raw: dict) -> None:
    """Ray's own schema check of a ``ray up`` YAML (``ray up`` runs the same)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(raw))


def package_files(working_dir: str, excludes: list[str] | None = None) -> list[tuple[str, int]]:
    """The files Ray would put in a job's ``working_dir`` package -- its own walk, ``.gitignore`` and
    ``.rayignore`` files and ``excludes`` patterns -- as (path relative to it, bytes), without
    building the package. Also the largest package Ray accepts: :func:`package_limit`."""
    from pathlib import Path

    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(working_dir).absolute()
    found: list[tuple[str, int]] = []

    def handler(path: Path) -> None:
        if path.is_file():
            found.append((str(path.relative_to(root)), path.stat().st_size))

    quiet = logging.getLogger("dard.packaging")  # Ray logs every ignore file it meets at INFO
    quiet.setLevel(logging.WARNING)
    _dir_travel(root, [_get_excludes(root, excludes or [])], handler, include_gitignore=True, logger=quiet)
    return found


def worker_stderr_to(sink: Callable[[dict], None]) -> None:
    """Ray's driver prints what every worker writes (``log_to_driver``): keep its printing of their
    stdout (dard's epoch lines) and hand each batch of their stderr to ``sink`` instead. ``sink``
    gets Ray's dict: ``lines`` (list of str), ``pid``, ``actor_name``, ``task_name``, ``is_err``.
    Called once, right after ``ray.init`` (which installs the printer; ``ray.shutdown`` removes it)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printers = [handler for name, handler in dispatcher.handlers if name == _PRINTER]
    if not printers:  # log_to_driver off: nothing is printed, nothing to split
        return
    printer = printers[0]

    def split(data: dict) -> None:
        (sink if data.get("is_err") else printer)(data)

    dispatcher.remove_handler(_PRINTER)
    dispatcher.add_handler(_PRINTER, split)


_PRINTER = "ray_print_logs"  # the name ray.init gives its handler when log_to_driver is on


def package_limit() -> int:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return GCS_STORAGE_MAX_SIZE
