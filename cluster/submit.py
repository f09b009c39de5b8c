"""`dard submit`: a Ray job from this checkout, its package checked before Ray builds it.

``ray job submit --working-dir .`` zips the working directory (less what ``.gitignore``,
``.rayignore`` and ``excludes`` leave out) and refuses a package over 512 MiB only after building
it. :func:`check_package` walks the directory as Ray does and refuses first, naming the largest
files and how to leave them out; :func:`submit` then hands the job to Ray's job SDK.
"""
from __future__ import annotations

import shlex

from cluster.ray_session import ensure_auth_mode


class PackageTooLarge(ValueError):
    """A job's working directory would exceed what Ray uploads; the message names the largest files."""


def check_package(working_dir: str, excludes: list[str] | None = None, limit: int | None = None) -> tuple[int, int]:
    """(files, bytes) Ray would package from ``working_dir``; :class:`PackageTooLarge` when the
    files alone reach Ray's limit (the zip is no smaller for shards, models and images)."""
    from cluster.ray_private import package_files, package_limit  # imports Ray

    files = package_files(working_dir, excludes)
    total = sum(size for _, size in files)
    limit = package_limit() if limit is None else limit
    if total >= limit:
        largest = sorted(files, key=lambda f: -f[1])[:3]
        named = ", ".join(f"{path} ({size / 2**20:.0f} MiB)" for path, size in largest)
        raise PackageTooLarge(f"the job's working directory {working_dir} holds {total / 2**20:.0f} MiB for Ray to "
                              f"upload, over its {limit / 2**20:.0f} MiB limit; the largest: {named}. Leave them out "
                              "(.rayignore, or --exclude) and pass their storage URIs instead")
    return len(files), total


def submit(entrypoint: list[str], *, address: str, working_dir: str = ".", excludes: list[str] | None = None,
           wait: bool = False) -> str:
    """Submit ``entrypoint`` (e.g. ``python -m cluster.jobs.train ...``) as a Ray job from
    ``working_dir``, after :func:`check_package`; returns the job id (and with ``wait``, its logs
    follow until it ends)."""
    check_package(working_dir, excludes)
    ensure_auth_mode()
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=shlex.join(entrypoint),
                               runtime_env={"working_dir": working_dir, "excludes": excludes or []})
    if wait:
        import asyncio

        async def follow() -> None:
            async for lines in client.tail_job_logs(job_id):
                print(lines, end="", flush=True)

        asyncio.run(follow())
    return job_id
