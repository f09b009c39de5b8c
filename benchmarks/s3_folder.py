"""Reading a folder of your images from object storage: every file of a folder of N PNGs on a fake
S3 (moto on loopback), read through ``Listing.read_bytes`` as precompute reads them (listing and
checks, then parts), against the former ``read_bytes`` (each file's path taken from a filesystem
built for its own URI, then the same 8 reader threads), side by side in one run. moto answers a GET far slower than a
real S3 endpoint does, so the per-file cost of building a client is understated here, not
overstated. Writes ``benchmarks/results/s3-folder.md`` and ``.json``.

    python benchmarks/s3_folder.py                  # 400 and 2,000 images, about 2 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="400,2000", help="images per folder, comma-separated")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "s3-folder"))
    args = parser.parse_args()

    from benchmarks.stream import fake_s3
    from tests.conftest import write_png_folder  # before the environment below: it sets the suite's own S3's

    server, env = fake_s3()
    os.environ.update(env)
    import boto3
    import pyarrow.fs as pafs

    from dard.config import Config
    from dard.data.presets import _digits
    from dard.data.sources import list_source

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench")
    digits = _digits(Config.for_dataset("digits").data)
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            index = [i % len(digits.labels) for i in range(n)]
            files = write_png_folder(None, digits.images[index], digits.labels[index])
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda kv: s3.put_object(Bucket="bench", Key=f"f{n}/{kv[0]}", Body=kv[1]), files.items()))
            listing = list_source(f"folder:s3://bench/f{n}")
            start = time.perf_counter()
            read = listing.read_bytes(range(n))
            per_bucket = time.perf_counter() - start

            def fetch(path: str) -> bytes:
                with fs.open_input_stream(path) as f:
                    return f.read()

            start = time.perf_counter()  # the former read_bytes: each file's path from its own URI, then 8 readers
            fs = pafs.FileSystem.from_uri(f"s3://bench/f{n}")[0]
            paths = [pafs.FileSystem.from_uri(f"s3://bench/f{n}/{key}")[1] for key in listing.keys]
            with ThreadPoolExecutor(8) as pool:
                again = list(pool.map(fetch, paths))
            per_file_s = time.perf_counter() - start
            assert again == read and sorted(read) == sorted(files.values())
            rows.append({"images": n, "one_filesystem_per_bucket_s": per_bucket, "a_filesystem_per_file_s": per_file_s})
            print(rows[-1], flush=True)
    finally:
        server.stop()
    import pyarrow

    facts = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "pyarrow": pyarrow.__version__,
             "command": "python benchmarks/s3_folder.py"}
    Path(f"{args.out}.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1) + "\n")
    lines = [f"# A folder of images on object storage ({time.strftime('%Y-%m-%d')})", "",
             f"`{facts['command']}` on {facts['machine']}, pyarrow {facts['pyarrow']}, nothing else running; "
             "digits as 8x8 PNGs on moto's S3 server on loopback, every file read once by 8 threads.", "",
             "| images | one filesystem per bucket (now) | a filesystem per file (before) | ratio |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['images']:,} | {r['one_filesystem_per_bucket_s']:.1f} s | {r['a_filesystem_per_file_s']:.1f} s | "
              f"{r['a_filesystem_per_file_s'] / r['one_filesystem_per_bucket_s']:.1f}x |" for r in rows]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(Path(f"{args.out}.md").read_text())


if __name__ == "__main__":
    main()
