"""What a short Ray Train run pays before its first step, on a warm local Ray (the test suite's:
2 CPUs, no dashboard): a bare ``TorchTrainer`` whose train function does nothing, and
``train_distributed`` (dard's DDP worker: shards, model, DDP) for one epoch of 256 digits, each
with 1 and 2 workers, ``--repeats`` times after one warm-up fit. Writes
``benchmarks/results/ray-train-startup.md`` and ``.json``.

    python benchmarks/ray_train_startup.py          # about 3 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.process_cpu import busy_cpu_s, watching  # noqa: E402 (the repo on the path first)


def _entered(config):  # the bare train function: the time it starts
    Path(config["marker"]).write_text(str(time.time()))


class FirstStep:
    """A dard step hook: the time of the first optimizer step, per rank."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, *, rank: int, step: int, **_) -> None:
        path = Path(f"{self.marker}.{rank}")
        if not path.exists():
            path.write_text(str(time.time()))


def bare_fit(tmp: Path, workers: int, i: int) -> tuple[float, float, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.rendezvous import LoopbackTorchConfig

    marker = tmp / f"bare-{workers}-{i}"
    started, cpu = time.time(), busy_cpu_s()
    TorchTrainer(_entered, train_loop_config={"marker": str(marker)}, torch_config=LoopbackTorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name=marker.name, storage_path=str(tmp / "ray"))).fit()
    return float(marker.read_text()) - started, time.time() - started, busy_cpu_s() - cpu


def dard_fit(tmp: Path, cfg, shards: str, workers: int, i: int) -> tuple[float, float, float]:
    from cluster.train import train_distributed

    marker = tmp / f"dard-{workers}-{i}"
    started, cpu = time.time(), busy_cpu_s()
    train_distributed(cfg, shards, workers=workers, name=marker.name, step_hook=FirstStep(str(marker)))
    first = max(float(Path(f"{marker}.{r}").read_text()) for r in range(workers))
    return first - started, time.time() - started, busy_cpu_s() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ray-train-startup"))
    args = parser.parse_args()

    from cluster.precompute import precompute
    from cluster.ray_session import ensure_ray
    from dard.config import Config
    from dard.models import build, save_model

    ensure_ray(num_cpus=2, quiet=True, dashboard=False)
    tmp = Path(tempfile.mkdtemp(prefix="ray-train-startup-"))
    teacher = save_model(tmp / "t.pt", build("cnn_small", 10, 1), arch="cnn_small", num_classes=10, in_channels=1,
                         dataset="digits")
    cfg = Config.for_dataset("digits", data={"limit_train": 256}, attack={"steps": 1},
                             optim={"epochs": 1, "batch_size": 64}, run={"eval_limit": 30, "out_dir": str(tmp)})
    precompute(cfg, teacher, str(tmp / "shards"), views=1, rows_per_part=64, use_ray=False)
    bare_fit(tmp, 1, -1)  # warm-up: the first fit of a session also starts Ray's own helper actors
    rows = []
    for kind in ("bare TorchTrainer", "dard train_distributed"):
        for workers in (1, 2):
            times = [bare_fit(tmp, workers, i) if kind.startswith("bare") else
                     dard_fit(tmp, cfg, str(tmp / "shards"), workers, i) for i in range(args.repeats)]
            rows.append({"fit": kind, "workers": workers,
                         "to_first_step_s": statistics.median(t[0] for t in times),
                         "total_s": statistics.median(t[1] for t in times),
                         "cpu_s": statistics.median(t[2] for t in times), "runs": times})
            print(rows[-1], flush=True)
    with watching(new_only=True) as new:  # what one bare 2-worker fit starts, and what each costs
        bare_fit(tmp, 2, args.repeats)
    processes = new.result()["kinds"]
    import ray
    import torch

    facts = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU", "ray": ray.__version__,
             "torch": torch.__version__, "repeats": args.repeats,
             "command": "python benchmarks/ray_train_startup.py"}
    Path(f"{args.out}.json").write_text(json.dumps({"facts": facts, "rows": rows, "processes": processes}, indent=1)
                                        + "\n")
    lines = [f"# A short Ray Train run's start-up ({time.strftime('%Y-%m-%d')})", "",
             f"`{facts['command']}` on {facts['machine']}, Ray {facts['ray']}, torch {facts['torch']}; a warm local "
             "Ray (2 CPUs, no dashboard, as the test suite runs it); median of "
             f"{args.repeats} fits after one warm-up. *To first step*: from the call to the train function's "
             "start (bare) or every rank's first optimizer step (dard: shards opened, model built, DDP set up). "
             "*CPU*: the CPU-seconds the machine was busy over the whole run (/proc/stat).", "",
             "| fit | workers | to first step | whole run | CPU |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['fit']} | {r['workers']} | {r['to_first_step_s']:.1f} s | {r['total_s']:.1f} s | "
              f"{r['cpu_s']:.1f} s |" for r in rows]
    lines += ["", "The processes one bare 2-worker fit starts (each a Python that imports Ray Train), and their "
              "CPU-seconds:", "", "| process | count | CPU |", "|---|---:|---:|"]
    lines += [f"| `{name}` | {k['processes']} | {k['cpu_s']:.1f} s |" for name, k in processes.items()]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(Path(f"{args.out}.md").read_text())


if __name__ == "__main__":
    main()
