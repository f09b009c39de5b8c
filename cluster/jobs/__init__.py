"""Entrypoints for `ray job submit --working-dir . -- python -m cluster.jobs.<name> [dard flags]`.

Each is the matching `dard` subcommand, so a job and the CLI run the same code: e.g.
`python -m cluster.jobs.train --config run.yaml --shards s3://bucket/shards --workers 8`.
Inside a job Ray is joined through RAY_ADDRESS, which the job supervisor sets.
"""
import sys

from cluster.commands import register
from dard.cli import main


def run(command: str) -> None:
    """The `dard` subcommand ``command`` with this process's arguments. Its registrar is named
    here, not found through installed entry points: a job's working directory need not be installed."""
    sys.exit(main([command, *sys.argv[1:]], registrars=[register]))
