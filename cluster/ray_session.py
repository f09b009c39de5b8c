"""Starting or joining Ray: loopback-only when we start it ourselves (docs/design.md §5, security)."""
from __future__ import annotations

import functools
import os
import sys


def ensure_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = False,
               dashboard: bool = True):
    """Join ``address`` (``auto``, ``ray://host:10001``, ``host:6379``) or start a local Ray bound to 127.0.0.1.

    Returns the ``ray`` module. An already-initialised session is reused. ``dashboard``: start a
    local Ray with its dashboard (on 127.0.0.1; the test suite goes without: ~4 s and a share of
    two cores).
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]  # inside `ray job submit`: join the job's cluster
    if address is None:
        # Without this Ray binds the machine's network address (dashboard included).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # The local Ray's processes inherit these. Train's print patch logs every print a second
        # time (each epoch line twice on the console); its preemption watcher (spot nodes) has
        # nothing to watch on one machine and logs an ERROR line from its actor at every fit.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray's own default for a new local cluster (a token in ~/.ray/auth_token), stated: left
        # unset, Ray warns on the console at every start that it chose it.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return ray
    kwargs = {"log_to_driver": not quiet, "configure_logging": True, "logging_level": "warning"}
    if address is not None:
        ray.init(address=address, **kwargs)
    else:
        # address="local": always a fresh local Ray, never one that a `ray start` left on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 object_store_memory=1_000_000_000,
                 runtime_env={"worker_process_setup_hook": "cluster.ray_session.address_own_cluster"}, **kwargs)
    return ray


def address_own_cluster() -> None:
    """Run in every worker of a local Ray that :func:`ensure_ray` started: Ray's state API (Ray
    Train's placement-group cleaner calls it) looks for *the* Ray of the machine and dies with a
    traceback when it finds two (this one and, say, a ``ray start`` cluster); name ours."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def owns_ray(command):
    """Wrap a CLI command so that a Ray it started is shut down before it returns or raises.

    Then nothing a worker prints (say, on Ctrl-C) is forwarded after the command's last line;
    a Ray that was running before (a test session's, a job's cluster) is left alone.
    """
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        def running():  # without importing Ray for a command that never needs it (precompute --local)
            return "ray" in sys.modules and sys.modules["ray"].is_initialized()

        started_here = not running()
        try:
            return command(*args, **kwargs)
        finally:
            if started_here and running():
                sys.modules["ray"].shutdown()
    return wrapper
