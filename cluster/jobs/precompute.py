"""`ray job submit ... -- python -m cluster.jobs.precompute [flags of `dard precompute`]`."""
from cluster.jobs import run

if __name__ == "__main__":
    run("precompute")
