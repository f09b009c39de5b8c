"""Shared fixtures: digits splits and small trained models, built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

# Keep any Ray a test starts on loopback and quiet, and job clients on token auth (docs/design.md §5).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
# The demo's teacher cache: one per test session, never the user's ~/.cache.
os.environ.setdefault("DARD_CACHE", __import__("tempfile").mkdtemp(prefix="dard-cache-"))
# How long a test waits on a subprocess or a condition before calling it a hang: a bound that no
# loaded machine reaches (the suite's waits are on work; pyproject's pytest timeout guards the rest).
HANG_S = 1200
REPO = Path(__file__).resolve().parents[1]
# Trainings log to MLflow by default: one store per test session, never ./mlflow.db nor the user's server.
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{__import__('tempfile').mkdtemp(prefix='dard-mlflow-')}/mlflow.db"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A fake S3 (moto's server on loopback, started by the ``bucket`` fixture) for the storage-URI tests
# and for shards streamed to Ray workers. Its address is set before any Ray starts, so every worker
# reaches it through AWS_ENDPOINT_URL; forced, so a test never reaches a real object store.
S3_PORT = _free_port()
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "test",
                   "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})

import signal

# A suite started in the background of a script (`nohup`, `&` without job control) inherits SIGINT
# ignored, and so would every process it starts: the tests that send Ctrl-C to a command (as a
# terminal does) need it delivered, so the suite takes Python's own handler back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest
import torch

from dard.config import Config
from dard.data import load_splits, to_float


def digits_config(tmp_path, **sections) -> Config:
    sections.setdefault("run", {})
    sections["run"] = {"out_dir": str(tmp_path), "progress": False, **sections["run"]}
    return Config.for_dataset("digits", **sections)


@pytest.fixture(scope="session")
def digits_splits():
    return load_splits(Config.for_dataset("digits").data)


@pytest.fixture(scope="session")
def digits_test(digits_splits):
    return to_float(digits_splits.test.images), digits_splits.test.labels


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory):
    """cnn_small trained naturally and with TRADES (12 epochs each), and a TRADES cnn_medium teacher
    (8x the student's parameters; as robust as cnn_large here at half its cost: benchmarks/results/suite-teacher.md)."""
    from dard.training import fit

    out = {}
    for name, arch, method, epochs in [("natural", "cnn_small", "natural", 12), ("trades", "cnn_small", "trades", 12),
                                       ("teacher", "cnn_medium", "trades", 6)]:
        tmp = tmp_path_factory.mktemp(name)
        cfg = digits_config(tmp, model={"arch": arch}, loss={"method": method}, optim={"epochs": epochs})
        out[name] = fit(cfg)
    return out


@pytest.fixture(scope="session")
def bucket():
    """``s3://dard`` on the fake S3, reached through pyarrow and boto3 as a real bucket would be."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket="dard")
    yield "s3://dard"
    server.stop()


def write_png_folder(root, images, labels, names=None, fmt="PNG"):
    """``images`` uint8 (N, C, H, W) as one file per image, ``<root>/<class>/<index>.png`` (the
    index zero-padded: listed by name, the files keep this order)."""
    import io
    from pathlib import Path

    from PIL import Image

    files = {}
    for i, (image, label) in enumerate(zip(images.numpy(), labels.tolist())):
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        files[f"{names[label] if names else label}/{i:05d}.{fmt.lower()}"] = buffer.getvalue()
    if root is not None:
        for rel, data in files.items():
            (Path(root) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(root) / rel).write_bytes(data)
    return files


@pytest.fixture(scope="session")
def digits_png(tmp_path_factory):
    """scikit-learn's 1797 digits as a folder of PNG files, one sub-folder per class, in the order
    of the digits preset: the same images through the folder source."""
    from dard.data.presets import _digits

    full = _digits(Config.for_dataset("digits").data)
    root = tmp_path_factory.mktemp("digits-png") / "digits-png"
    write_png_folder(root, full.images, full.labels)
    return root


@pytest.fixture(scope="session")
def s3_digits(bucket):
    """The first 400 digits as a PNG folder on the fake S3: ``folder:s3://dard/digits-png``."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    from dard.data.presets import _digits

    full = _digits(Config.for_dataset("digits").data)
    files = write_png_folder(None, full.images[:400], full.labels[:400])
    s3 = boto3.client("s3")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket="dard", Key=f"digits-png/{kv[0]}", Body=kv[1]), files.items()))
    return f"folder:{bucket}/digits-png"


def signal_when(argv, sig, ready, *, group=False, timeout=HANG_S):
    """Run ``dard ARGV`` in its own process group on the session's Ray; send ``sig`` once
    ``ready(its stdout so far)`` holds (to the whole group with ``group``: what Ctrl-C in a terminal
    does). Returns (exit code, stderr, a timeline of the output for a failure's message: each
    line's time from the start, and when the signal went). The output is read as it comes: a child
    that fills a pipe nobody reads stops at its next write."""
    import subprocess
    import sys
    import threading
    import time

    import ray

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "dard.cli", *argv], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: dict[str, list] = {"out": [], "err": []}

    def read(stream, into):
        for line in stream:
            into.append((time.time() - start, line))

    readers = [threading.Thread(target=read, args=(stream, lines[name]), daemon=True)
               for name, stream in (("out", proc.stdout), ("err", proc.stderr))]
    for reader in readers:
        reader.start()
    deadline = start + timeout
    while not ready("".join(line for _, line in lines["out"])) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
    alive = proc.poll() is None
    sent = time.time() - start
    if alive:
        (os.killpg if group else os.kill)(proc.pid, sig)
    proc.wait(timeout=HANG_S)
    for reader in readers:
        reader.join(timeout=HANG_S)
    timeline = "".join(f"{t:6.1f}s {name}: {line}" for name in ("out", "err") for t, line in lines[name][-40:])
    timeline += f"signal {'sent' if alive else 'not sent: the run had ended'} at {sent:.1f}s; exit {proc.returncode}"
    return proc.returncode, "".join(line for _, line in lines["err"]), timeline


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that runs Ray in this process (starting one costs ~10 s)."""
    from cluster.ray_session import ensure_ray

    ray = ensure_ray(num_cpus=2, quiet=True, dashboard=False)  # no test reads this session's dashboard
    yield ray
    ray.shutdown()


def load(path):
    from dard.models import load_model

    return load_model(path)[0]


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    from dard.models import build

    return build("cnn_small", 10, 1).eval()
