"""Starting or joining Ray: loopback-only when we start it ourselves (docs/design.md §5, security)."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading

from dard.logs import one_line


def ensure_auth_mode() -> None:
    """Token authentication, as every cluster dard starts or documents runs it (a client, such as
    a job submission, reads ``~/.ray/auth_token``); set before Ray is imported."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")


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
        # Train's controller polls its workers every 2 s by default, and a run's start, each restart
        # and its end wait for a poll: a few seconds of every short local run (measured: a 1-epoch
        # run 18.5 s -> 14.2 s). Polling a local process five times a second costs nothing.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        # Ray's own default for a new local cluster (a token in ~/.ray/auth_token), stated: left
        # unset, Ray warns on the console at every start that it chose it.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    # Ray's "(RayTrainWorker pid=...)" before each forwarded line: the epoch lines are dard's own.
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    import ray

    if ray.is_initialized():
        return ray
    kwargs = {"log_to_driver": not quiet, "configure_logging": True, "logging_level": "warning"}
    with _signals_after_init():
        if address is not None:
            ray.init(address=address, **kwargs)
        else:
            # address="local": always a fresh local Ray, never one that a `ray start` left on this machine
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                     object_store_memory=1_000_000_000,
                     runtime_env={"worker_process_setup_hook": "cluster.ray_session.address_own_cluster"}, **kwargs)
    if not quiet:
        from cluster.ray_private import worker_stderr_to

        worker_stderr_to(log_worker_stderr)
    return ray


def log_worker_stderr(data: dict) -> None:
    """What Ray's workers write to stderr -- library warnings, Ray's own tracebacks as a run stops
    (Ray Train's "Graceful shutdown of backend failed" when a signal meets a stopping trial) -- is
    chatter for the log file (``dard.log``; the console with ``--verbose``). A worker's error that
    ends the run reaches the console as the run's one error line."""
    source = f"{data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')}"
    for line in data.get("lines", ()):
        _WORKERS.warning("%s: %s", source, line)


# not under "ray": ray.init gives that logger a console handler of its own and stops propagation
_WORKERS = logging.getLogger("ray_workers")


@contextlib.contextmanager
def _signals_after_init():
    """Ctrl-C while ``ray.init`` starts Ray's processes leaves a half-started Ray whose teardown
    crashes the interpreter (SIGSEGV instead of exit 130): hold SIGINT until init returns, then
    deliver it. And ray.init replaces the process's SIGTERM handler with ``sys.exit``, which tears
    Ray down under a running call (a native abort, exit 134) before dard can close its runs: the
    handler the process had is put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pending:
        signal.raise_signal(pending[0])  # now, to the handler the process had


def address_own_cluster() -> None:
    """Run in every worker of a local Ray that :func:`ensure_ray` started: Ray's state API (Ray
    Train's placement-group cleaner calls it) looks for *the* Ray of the machine and dies with a
    traceback when it finds two (this one and, say, a ``ray start`` cluster); name ours."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0

RAY_ERRORS = {"RayError", "RayTaskError", "RayActorError", "TrainingFailedError", "WorkerGroupError", "TuneError"}


class RayRunError(RuntimeError):
    """A Ray task, actor, training or tuning run failed; the message is the failing worker's own."""


def error_line(err: BaseException) -> str:
    """The line a person needs from a Ray error. Ray wraps a worker's error (WorkerGroupError,
    RayTaskError, TrainingFailedError) in a remote traceback: the worker's own error instead."""

    failures = getattr(err, "worker_failures", None)  # Ray Train's WorkerGroupError: rank -> error
    if failures:
        return error_line(next(iter(failures.values())))
    cause = getattr(err, "cause", None) or err.__cause__
    if _is_ray_error(err) and cause is not None and cause is not err:
        return error_line(cause)
    return one_line(err)


def _is_ray_error(err: BaseException) -> bool:
    return bool({c.__name__ for c in type(err).__mro__} & RAY_ERRORS)


def owns_ray(command):
    """Wrap a CLI command that uses Ray: a Ray it started is shut down before it returns or raises,
    and Ray's errors come out as :class:`RayRunError` with the failing worker's message.

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
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM: Ray is left up (why, and what ends it: dard.cli.run)
            started_here = False
            raise
        except Exception as err:
            if _is_ray_error(err):
                raise RayRunError(error_line(err)) from err
            raise
        finally:
            if started_here and running():
                sys.modules["ray"].shutdown()
    return wrapper
