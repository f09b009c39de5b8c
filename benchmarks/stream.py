"""Shards that outgrow a machine: a training rank's memory and reads against the total shard size.

Synthetic CIFAR-shaped shards (32x32x3 views and deltas, fp16 logits: 6.2 KB a row) of three sizes
10x apart are written once; then, each in a fresh process (its peak RSS is its own):

- ``stream``: rank 0 of ``--world`` ranks streams one epoch with :mod:`dard.shards.stream` (the
  training path), the window of ``data.shuffle_window`` units, every unit checked;
- ``whole``: the reader this project had before (every rank opened every part: ``pa.concat_tables``
  of each part, memory-mapped locally, ``read_all()`` from object storage) and took its rank's rows
  (timed over its first ``WHOLE_STEPS`` steps: every part is open, and touched, from the start);
- ``raydata``: Ray Data over the same rows as Parquet (Ray Data has no Arrow IPC reader),
  ``streaming_split(world, equal=True)`` and ``iter_torch_batches`` with a local shuffle buffer,
  the way Ray Train feeds ``get_dataset_shard`` (one size; it needs a Ray session). Every split is
  consumed, one thread each (a split waits for all), so its RSS is the process's: all ranks and
  Ray Data's driver side.

Each records peak RSS, rows delivered per second, and bytes read (the process's read() bytes;
not measured for object storage, whose reads are socket reads, nor for Ray Data, which reads in
Ray's workers). Beside them: the rows per second one rank's student
consumes (a SAT PGD-10 step of ResNet-18 and of cnn_small at batch 64 on this CPU). The smallest
size is also streamed from a fake S3 (moto on loopback). Writes ``benchmarks/results/stream.md``
and ``.json``.

    python benchmarks/stream.py                      # 50 MB, 500 MB, 5 GB; about 15 min on 2 cores
    python benchmarks/stream.py --sizes 20,200 --no-raydata --no-s3   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROW_BYTES = 2 * 32 * 32 * 3 + 2 * 2 * 10 + 32  # two images, two fp16 logit vectors, the small columns
WHOLE_STEPS = 300  # the whole-table reader is timed over this many steps (its random takes are slow)


def write_synthetic(out: Path, rows: int, part_samples: int = 4096) -> dict:
    """CIFAR-shaped shards of ``rows`` samples (one view), random content, real manifest and digests."""
    import numpy as np

    from dard.config import Config
    from dard.shards.format import make_manifest, plan_fingerprint, rows_to_batches
    from dard.shards.store import write_manifest, write_part

    cfg = Config.for_dataset("cifar10")
    data, attack = cfg.to_dict()["data"], cfg.to_dict()["attack"]
    rng = np.random.default_rng(0)
    parts = []
    for part_id, start in enumerate(range(0, rows, part_samples)):
        n = min(part_samples, rows - start)
        cols = {"index": np.arange(start, start + n), "view": np.zeros(n), "label": rng.integers(0, 10, n),
                "label_source": np.zeros(n), "confidence": rng.random(n), "crop_dx": np.zeros(n),
                "crop_dy": np.zeros(n), "flip": np.zeros(n, bool),
                "x": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                "delta": rng.integers(-8, 9, (n, 32, 32, 3)).astype(np.int8),
                "t_nat": rng.standard_normal((n, 10)).astype(np.float16),
                "t_adv": rng.standard_normal((n, 10)).astype(np.float16)}
        parts.append(write_part(str(out), part_id, "labeled", n, rows_to_batches(cols, (3, 32, 32), 10)))
    counts = {"labeled": rows, "pool": 0}
    fp = plan_fingerprint(teacher_sha256="synthetic", dataset="cifar10", split="train", data=data, attack=attack,
                          seed=0, views=1, counts=counts, rows_per_part=part_samples)
    manifest = make_manifest(dataset="cifar10", split="train", teacher={"id": "synthetic", "sha256": "synthetic"},
                             attack=attack, data=data, views=1, num_classes=10, class_names=cfg.data.class_names,
                             image_shape=(3, 32, 32), parts=parts, counts=counts, rows_per_part=part_samples, seed=0,
                             plan_fingerprint=fp, source_index=None)
    write_manifest(str(out), manifest)
    return manifest


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _io_bytes() -> int:
    import psutil

    io = psutil.Process().io_counters()
    return io.read_chars


def measure(args) -> dict:
    """One reader over one shard folder, in this (fresh) process: rows/s, peak RSS, bytes read."""
    import numpy as np

    from dard.shards import ShardSet, epoch_batches, rank_plan

    before = _io_bytes()
    started = time.perf_counter()
    rows = 0
    if args.reader == "stream":
        shards = ShardSet.unchecked(args.dir)
        plan = rank_plan(shards, rank=0, world=args.world, seed=0, batch_size=args.batch, pool_share=None,
                         window=args.window)
        for batch in epoch_batches(plan, 0):
            rows += len(batch.index)
    elif args.reader == "whole":
        import pyarrow as pa

        from dard.files import resolve
        from dard.shards import read_manifest

        manifest = read_manifest(args.dir)
        fs, base = resolve(args.dir)
        tables = []
        for p in manifest["parts"]:
            path = f"{base}/{p['file']}"
            if "://" in args.dir:
                with fs.open_input_file(path) as f:
                    tables.append(pa.ipc.open_file(f).read_all())
            else:
                tables.append(pa.ipc.open_file(pa.memory_map(path, "r")).read_all())
        table = pa.concat_tables(tables)
        mapped = sum(p["bytes"] for p in manifest["parts"]) / 1e6  # every part opened (and, taken from, touched)
        order = np.random.default_rng(0).permutation(table.num_rows)[0::args.world]
        stop = min(len(order) - args.batch + 1, WHOLE_STEPS * args.batch)  # its memory is set once it has opened all
        for s in range(0, stop, args.batch):
            t = table.take(pa.array(order[s:s + args.batch]))
            np.frombuffer(t.column("x").combine_chunks().buffers()[1], dtype=np.uint8).sum()  # touch the pixels
            rows += t.num_rows
    else:  # raydata
        import ray

        ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        from concurrent.futures import ThreadPoolExecutor

        ds = ray.data.read_parquet(args.dir)

        def consume(split) -> int:
            n = 0
            for batch in split.iter_torch_batches(batch_size=args.batch, local_shuffle_buffer_size=4 * args.batch,
                                                  dtypes=None, collate_fn=lambda b: b):
                n += len(batch["index"])
            return n

        # every split must be consumed (its coordinator starts an epoch when all have asked), as each
        # of Ray Train's workers would: one thread each here, rank 0's rows counted
        with ThreadPoolExecutor(args.world) as pool:
            rows = list(pool.map(consume, ds.streaming_split(args.world, equal=True)))[0]
    seconds = time.perf_counter() - started
    read = (_io_bytes() - before) / 1e6
    if args.reader == "whole" and "://" not in args.dir:
        read = max(read, mapped)  # memory-mapped: page faults, not read() calls
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "peak_rss_mb": peak_rss_mb(), "read_mb": read}


def to_parquet(src: Path, dst: Path) -> None:
    """The same rows as Parquet files (what Ray Data reads)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dst.mkdir(parents=True, exist_ok=True)
    for part in sorted(src.glob("part-*.arrow")):
        table = pa.ipc.open_file(pa.memory_map(str(part), "r")).read_all()
        pq.write_table(table, dst / part.name.replace(".arrow", ".parquet"), compression="none")


def consumed_rows_per_s(arch: str, batch: int = 64, steps: int = 2) -> float:
    """Rows per second one rank's student trains on: SAT PGD-10 steps at 32x32x3, this CPU."""
    import torch
    import torch.nn.functional as F

    from dard.attacks.pgd import pgd
    from dard.engine import place_model
    from dard.models import build

    model = place_model(build(arch, 10, 3), torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        x_adv = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=10)
        model.train()
        loss = F.cross_entropy(model(x_adv), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - start)


def fake_s3():
    """moto's S3 server on loopback; returns (server, the environment that reaches it)."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    return server, env


def run_child(reader: str, directory: str, args, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", reader, "--dir", directory, "--world", str(args.world),
           "--batch", str(args.batch), "--window", str(args.window)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="50,500,5000", help="total shard sizes in MB")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="rows per step on one rank")
    p.add_argument("--window", type=int, default=4, help="data.shuffle_window")
    p.add_argument("--work", default=str(REPO / "runs" / "bench-stream"))
    p.add_argument("--no-raydata", action="store_true")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.reader = args.child
        print(json.dumps(measure(args)))
        return 0
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    work = Path(args.work)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {"sizes": {}, "consumed": {}, "s3": {}, "raydata": {}}
    for arch in ("resnet18", "cnn_small"):
        results["consumed"][arch] = consumed_rows_per_s(arch)
        print(f"consumed by one rank's student ({arch}, SAT PGD-10, batch {args.batch}): "
              f"{results['consumed'][arch]:.0f} rows/s", flush=True)
    for mb in sizes:
        rows = int(mb * 1e6 / ROW_BYTES)
        folder = work / f"shards-{mb}mb"
        if not (folder / "manifest.json").exists():
            started = time.time()
            write_synthetic(folder, rows)
            print(f"wrote {folder} ({rows} rows) in {time.time() - started:.0f} s", flush=True)
        total = sum(f.stat().st_size for f in folder.glob("part-*.arrow")) / 1e6
        results["sizes"][mb] = {"rows": rows, "total_mb": total,
                                **{reader: run_child(reader, str(folder), args) for reader in ("stream", "whole")}}
        r = results["sizes"][mb]
        print(f"{total:.0f} MB: stream {r['stream'].get('peak_rss_mb', 0):.0f} MB RSS, "
              f"{r['stream'].get('read_mb', 0):.0f} MB read, {r['stream'].get('rows_per_s', 0):.0f} rows/s | whole "
              f"{r['whole'].get('peak_rss_mb', 0):.0f} MB RSS, {r['whole'].get('read_mb', 0):.0f} MB read", flush=True)
    if not args.no_s3:
        import pyarrow.fs as pafs

        server, env = fake_s3()
        os.environ.update(env)
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        mb = sizes[0]
        fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="test", secret_key="test",
                               region="us-east-1")
        pafs.copy_files(str(work / f"shards-{mb}mb"), f"bench/shards-{mb}mb", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        uri = f"s3://bench/shards-{mb}mb"
        results["s3"][mb] = {reader: run_child(reader, uri, args, env) for reader in ("stream", "whole")}
        print(f"fake S3, {mb} MB: stream {results['s3'][mb]['stream']}", flush=True)
        server.stop()
    if not args.no_raydata:
        mb = sizes[min(1, len(sizes) - 1)]
        parquet = work / f"parquet-{mb}mb"
        if not parquet.exists():
            to_parquet(work / f"shards-{mb}mb", parquet)
        results["raydata"][mb] = run_child("raydata", str(parquet), args)
        print(f"Ray Data, {mb} MB of Parquet: {results['raydata'][mb]}", flush=True)
    write(args, results, t0)
    return 0


def write(args, results: dict, t0: float) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    consumed = results["consumed"]
    lines = ["# Streaming shards: a rank's memory and reads against the total shard size", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {(time.time() - t0) / 60:.0f} min",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, CPU only; each reader in a fresh process",
             f"- command: `python benchmarks/stream.py {' '.join(sys.argv[1:])}`",
             f"- rank 0 of {args.world}, one epoch, batch {args.batch} rows a step, window {args.window} units; synthetic "
             "CIFAR-shaped rows (32x32x3 view and delta, fp16 logits)",
             f"- consumed by one rank's student (SAT PGD-10 at batch {args.batch}, one thread): ResNet-18 "
             f"{consumed['resnet18']:.0f} rows/s, cnn_small {consumed['cnn_small']:.0f} rows/s", "",
             "| shards | reader | peak RSS MB | read MB | rows | rows/s | rows/s / ResNet-18's | rows/s / cnn_small's |",
             "|---|---|---|---|---|---|---|---|"]

    def row(label: str, reader: str, r: dict, read: bool = True) -> str:
        if "error" in r:
            return f"| {label} | {reader} | failed: {r['error']} | | | | | |"
        mb_read = f"{r['read_mb']:.0f}" if read else "—"
        return (f"| {label} | {reader} | {r['peak_rss_mb']:.0f} | {mb_read} | {r['rows']} | "
                f"{r['rows_per_s']:.0f} | "
                f"{r['rows_per_s'] / consumed['resnet18']:.0f}x | {r['rows_per_s'] / consumed['cnn_small']:.1f}x |")

    for mb, r in results["sizes"].items():
        for reader in ("stream", "whole"):
            lines.append(row(f"{r['total_mb']:.0f} MB local", reader, r[reader]))
    for mb, r in results["s3"].items():
        for reader in ("stream", "whole"):
            lines.append(row(f"{mb} MB fake S3", reader, r[reader], read=False))
    for mb, r in results["raydata"].items():
        lines.append(row(f"{mb} MB local Parquet", "Ray Data", r, read=False))
    lines += ["", "read MB: the reader process's read() bytes (Python's own imports included, about 15 MB); "
              "— where the reads are not the process's: sockets to the fake S3, Ray Data's reads in Ray's workers. "
              "Ray Data's RSS is its whole driver process: both ranks' consumers (one thread each: a split waits "
              "for all) and Ray Data's coordination."]
    stream = [r["stream"]["peak_rss_mb"] for r in results["sizes"].values() if "peak_rss_mb" in r["stream"]]
    if len(stream) > 1:
        lines += ["", f"Streaming rank peak RSS over {len(stream)} sizes spanning "
                      f"{max(results['sizes']) / min(results['sizes']):.0f}x: {min(stream):.0f}-{max(stream):.0f} MB "
                      f"(max/min {max(stream) / min(stream):.2f})."]
    (out / "stream.md").write_text("\n".join(lines) + "\n")
    (out / "stream.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
