"""`ray job submit ... -- python -m cluster.jobs.train [flags of `dard train`]`."""
from cluster.jobs import run

if __name__ == "__main__":
    run("train")
