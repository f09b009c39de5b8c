"""Precompute from a folder of your images: peak memory of the driver and of each Ray task for
sources 10x apart in size, which must stay flat (issue: each task reads only its own slice).

For each size N, a folder of N Fashion-MNIST training images as PNGs (one sub-folder per class)
and a small untrained teacher; then, in a fresh driver process, ``build_shards`` with a Ray task
per job (the checks of every image, then the parts) where each task runs in a fresh worker
(``max_calls=1``), so every task's peak RSS (VmHWM) is its own. Writes
``benchmarks/results/source-memory.md`` and ``.json``.

    python benchmarks/source_memory.py               # 2,000 and 20,000 images, about 10 min on 2 cores
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def make_folder(root: Path, n: int) -> None:
    from dard.config import Config
    from dard.data.presets import _fashion_mnist
    from tests.conftest import write_png_folder

    train, _ = _fashion_mnist(Config.for_dataset("fashion-mnist").data)
    write_png_folder(root, train.images[:n], train.labels[:n])


def child(args) -> dict:
    """The driver: precompute the folder with Ray tasks, each in its own worker process."""
    import ray

    from dard.data import source_config
    from dard.models import build, save_model
    from dard.precompute import build_shards

    cfg = source_config(f"fm{args.n}", data={"source": f"folder:{args.folder}"}, attack={"steps": 2},
                        run={"progress": False})
    teacher = Path(args.work) / "teacher.pt"
    save_model(teacher, build("cnn_small", 10, 1), arch="cnn_small", num_classes=10, in_channels=1, dataset="fm")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
    tasks: list[dict] = []

    def map_jobs(fn, jobs):
        def task(job, *value):
            job = dataclasses.replace(job, teacher_bytes=value[0]) if value else job
            return fn(job), peak_rss_mb(), type(job).__name__

        shared = hasattr(jobs[0], "teacher_bytes")
        ref = [ray.put(jobs[0].teacher_bytes)] if shared else []
        remote = ray.remote(num_cpus=1, max_calls=1)(task)  # a fresh worker process per task
        futures = [remote.remote(dataclasses.replace(j, teacher_bytes=None) if shared else j, *ref) for j in jobs]
        while futures:
            ready, futures = ray.wait(futures, num_returns=1)
            result, rss, kind = ray.get(ready[0])
            tasks.append({"kind": kind, "peak_rss_mb": rss})
            yield result

    started = time.time()
    result = build_shards(cfg, teacher, str(Path(args.work) / "shards"), views=1, rows_per_part=1024,
                          map_jobs=map_jobs)
    return {"n": args.n, "seconds": time.time() - started, "driver_peak_rss_mb": peak_rss_mb(), "tasks": tasks,
            "rows": result.manifest["rows"], "parts": len(result.manifest["parts"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2000,20000")
    p.add_argument("--work", default=str(REPO / "runs" / "bench-source-memory"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    t0 = time.time()
    runs = []
    for n in (int(s) for s in args.sizes.split(",")):
        work = Path(args.work) / f"n{n}"
        folder = work / "images"
        if not folder.exists():
            make_folder(folder, n)
        done = subprocess.run([sys.executable, __file__, "--child", "--n", str(n), "--folder", str(folder), "--work",
                               str(work)], capture_output=True, text=True,
                              env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"{n} images: driver {r['driver_peak_rss_mb']:.0f} MB, tasks up to "
              f"{max(t['peak_rss_mb'] for t in r['tasks']):.0f} MB, {r['seconds']:.0f} s", flush=True)
    lines = ["# Precompute from a folder: peak memory against the source's size", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {(time.time() - t0) / 60:.0f} min",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, CPU only; a local Ray (2 CPUs), each task in a "
             "fresh worker process (max_calls=1), the driver in a fresh process; peak RSS = VmHWM",
             f"- command: `python benchmarks/source_memory.py {' '.join(sys.argv[1:])}`",
             "- Fashion-MNIST training images as 28x28 PNGs in class folders; an untrained cnn_small teacher; "
             "DPGD-2 views, 1 view, 1024 samples a part; the source's images are checked in slices of 2048 first", "",
             "| images | parts | driver peak MB | check tasks: peak MB (max) | part tasks: peak MB (max) | seconds |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        peak = lambda kind: max(t["peak_rss_mb"] for t in r["tasks"] if t["kind"] == kind)  # noqa: E731
        lines.append(f"| {r['n']:,} | {r['parts']} | {r['driver_peak_rss_mb']:.0f} | {peak('IndexJob'):.0f} | "
                     f"{peak('PartJob'):.0f} | {r['seconds']:.0f} |")
    if len(runs) > 1:
        a, b = runs[0], runs[-1]
        ratio = lambda f: f(b) / f(a)  # noqa: E731
        lines += ["", f"From {a['n']:,} to {b['n']:,} images ({b['n'] / a['n']:.0f}x): driver peak x"
                      f"{ratio(lambda r: r['driver_peak_rss_mb']):.2f}, largest task x"
                      f"{ratio(lambda r: max(t['peak_rss_mb'] for t in r['tasks'])):.2f}."]
    out = Path(args.out)
    (out / "source-memory.md").write_text("\n".join(lines) + "\n")
    (out / "source-memory.json").write_text(json.dumps(runs, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
