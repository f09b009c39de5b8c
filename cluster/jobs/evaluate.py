"""`ray job submit ... -- python -m cluster.jobs.evaluate [flags of `dard evaluate`]`."""
from cluster.jobs import run

if __name__ == "__main__":
    run("evaluate")
