"""Ray on this machine: precompute tasks, 2-worker DDP with a killed worker, signals. (Two hosts,
`ray up`, jobs and a lost host: tests/test_two_hosts.py.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HANG_S, REPO, signal_when
from tests.ray_hooks import WeightsLog, register

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_shards(bucket, s3_digits, ray_session, trained_models, tmp_path_factory):
    """Shards built by Ray tasks from a folder of PNGs on the fake S3, written to the bucket: 3 parts
    (not a multiple of 2 workers), the last one shorter (100, 100, 56 samples), which the workers
    stream from the bucket."""
    from cluster.precompute import precompute

    tmp = tmp_path_factory.mktemp("ray-shards")
    cfg = small_train_cfg(tmp, s3_digits)
    result = precompute(cfg, trained_models["teacher"]["model_path"], f"{bucket}/ray-shards", views=2,
                        rows_per_part=100)
    assert result.computed_parts == [0, 1, 2] and result.manifest["rows"] == 512
    assert [p["samples"] for p in result.manifest["parts"]] == [100, 100, 56]
    return f"{bucket}/ray-shards"


def small_train_cfg(tmp_path, source, epochs=3):
    """256 digits of the S3 folder (400 images: test and validation carved from them by seed)."""
    from dard.data import source_config

    return source_config("digits-png", data={"source": source, "limit_train": 256}, attack={"steps": 2},
                         optim={"epochs": epochs, "batch_size": 64, "lr": 0.4},
                         run={"eval_limit": 60, "out_dir": str(tmp_path), "progress": False})


def _loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback
    return (mapped or address).is_loopback


class ListeningSockets:
    """Polls, in a thread, the TCP sockets that this process and its descendants (Ray's daemons,
    the DDP workers) listen on; ``exposed`` collects those bound beyond loopback."""

    def __init__(self):
        import threading

        self.exposed, self.seen, self._stop = set(), set(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
            for c in psutil.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.pid in pids:
                    self.seen.add((c.laddr.ip, c.laddr.port))
                    if not _loopback(c.laddr.ip):
                        self.exposed.add((c.laddr.ip, c.laddr.port, " ".join(psutil.Process(c.pid).cmdline())[:80]))
            self._stop.wait(0.3)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_ddp_two_workers_sync_checkpoint_and_survive_a_killed_worker(ray_shards, s3_digits, tmp_path):
    from cluster.train import train_distributed
    from dard.shards import VERIFICATIONS

    register()
    cfg = small_train_cfg(tmp_path, s3_digits)
    logs = tmp_path / "weights"
    logs.mkdir()
    verified_before = len(VERIFICATIONS)
    with ListeningSockets() as sockets:
        result = train_distributed(cfg, ray_shards, workers=2, name="ddp-fault", max_failures=1,
                                   out=str(tmp_path / "s.pt"),
                                   step_hook=WeightsLog(str(logs), kill_at_epoch=1, marker=str(tmp_path / "killed"),
                                                       run_dir=str(tmp_path / "ray" / "ddp-fault")))
    # a local run listens on loopback only: Ray's daemons, the DDP rendezvous and gloo included
    assert sockets.seen and not sockets.exposed, sockets.exposed
    assert (tmp_path / "killed").exists()  # the worker really died
    # the shards were hashed once, on the driver; no worker (nor the restarted one) hashed them again
    assert len(VERIFICATIONS) - verified_before == 1
    # resumed from the last checkpoint: every planned epoch once, none repeated or lost
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.metrics["world_size"] == 2 and result.metrics["nodes"] == 1 and 0 <= result.metrics["val_pgd_acc"] <= 1
    assert result.metrics["train_steps"] == 4  # 256 samples / 2 ranks / 32 per rank
    assert Path(result.checkpoint_dir, "checkpoint.pt").exists() and Path(result.model_path).exists()
    # Ray keeps the best checkpoint by validation robust accuracy and the latest; the model is the best
    from dard.checkpoint import load_checkpoint

    kept = {load_checkpoint(p)["epoch"] for p in Path(result.run_path).glob("checkpoint_*/checkpoint.pt")}
    score = {h["epoch"]: h["val_robust_acc"] for h in result.history}
    assert 2 in kept and len(kept) <= 2 and max(score[e] for e in kept) == max(score.values())
    assert score[result.metrics["selected_epoch"]] == max(score.values())
    rank0 = [json.loads(l) for l in (logs / "rank0.jsonl").read_text().splitlines()]
    rank1 = [json.loads(l) for l in (logs / "rank1.jsonl").read_text().splitlines()]
    assert len(rank0) == len(rank1) > 12
    assert {r["verified"] for r in rank0 + rank1} == {0}
    assert all(a["digest"] == b["digest"] for a, b in zip(rank0, rank1))  # DDP keeps the weights identical
    epochs = [r["epoch"] for r in rank0]
    assert epochs.count(0) == 4 and epochs.count(2) == 4  # epoch 0 not redone after the restart
    assert epochs.count(1) == 2 + 4  # killed halfway through epoch 1 (step 2 of 4), then redone whole
    # each epoch: the ranks streamed disjoint rows, the same steps each, the epoch's own rows; the
    # epoch redone after the restart read exactly the rows it had started with
    from dard.shards import ShardSet, epoch_batches, rank_plan

    shards = ShardSet.open(ray_shards)
    for epoch in (0, 1, 2):
        done = [[r["rows"] for r in log if r["epoch"] == epoch][-4:] for log in (rank0, rank1)]
        planned = [[b.index.tolist() for b in epoch_batches(rank_plan(
            shards, rank=r, world=2, seed=0, batch_size=32, pool_share=None, window=4), epoch)] for r in (0, 1)]
        assert done == planned
        every = [i for rank in done for step in rank for i in step]
        assert len(every) == len(set(every)) == 256  # 3 uneven parts, 2 ranks: every sample once
    first_try = [r["rows"] for r in rank0 if r["epoch"] == 1][:2]
    assert first_try == [r["rows"] for r in rank0 if r["epoch"] == 1][2:4]
    # The same Ray run (storage, name) started again under another config is refused (the rule `fit`
    # applies), not silently continued; on the driver, before any worker starts (a worker's error
    # would come as RuntimeError "distributed training failed: ...")
    from dard.checkpoint import CheckpointError

    other = small_train_cfg(tmp_path, s3_digits).updated(optim={"lr": 0.05})
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: --resume with a different config \(optim\.lr: 0\.4 "
                                              r"in the checkpoint, 0\.05 now\)"):
        train_distributed(other, ray_shards, workers=2, name="ddp-fault", max_failures=2)
    # a loss that turns NaN under DDP stops every rank at the same step, decided on the reduced gradients
    diverging = small_train_cfg(tmp_path / "nan", s3_digits).updated(optim={"lr": 1e30})
    with pytest.raises(RuntimeError, match="non-finite loss"):
        train_distributed(diverging, ray_shards, workers=2, name="nan", max_failures=2)


def test_wrong_shards_fail_before_workers_start(ray_shards, s3_digits, tmp_path):
    from cluster.train import train_distributed
    from dard.shards import ShardError

    cfg = small_train_cfg(tmp_path, s3_digits).updated(attack={"eps": 0.2, "step_size": 0.05})
    with pytest.raises(ShardError, match="attack.eps"):
        train_distributed(cfg, ray_shards, workers=2)


def test_an_error_a_restart_would_repeat_reaches_the_driver_once(ray_session):
    """What a worker does with an error in its set-up (a resume under another config after a
    restart, a teacher it cannot read): the first message goes to the run's channel and every rank ends."""
    from cluster.fatal import fatal_channel, stop_everywhere

    fatal = fatal_channel(ray_session)
    assert not stop_everywhere(None, 1, 0, fatal) and ray_session.get(fatal.get.remote()) is None
    assert stop_everywhere(ValueError("first\nline two"), 1, 0, fatal)
    assert stop_everywhere(ValueError("second"), 1, 0, fatal)
    assert ray_session.get(fatal.get.remote()) == "first"  # the first, in one line
    ray_session.kill(fatal)


WORKERS_SPEAK = """
import io, sys, time
from pathlib import Path
from dard import logs
from cluster.ray_session import ensure_ray

logs.setup(verbose=False)
logs.to_file(sys.argv[1])
console = sys.stdout
sys.stdout = seen = io.StringIO()  # Ray's printer writes to the sys.stdout of the moment
ray = ensure_ray()  # joins RAY_ADDRESS, printing what workers write, as `dard train` does

@ray.remote(num_cpus=0.5)
def speak():
    print("epoch 1/1: a line of dard's own", flush=True)
    print("Traceback (most recent call last):\\n  RuntimeError: Graceful shutdown of backend failed",
          file=sys.stderr, flush=True)

ray.get(speak.remote())
log = Path(sys.argv[1]) / "dard.log"
deadline = time.time() + float(sys.argv[2])  # a hang guard: both streams arrive within a second or two
while time.time() < deadline and not ("epoch 1/1" in seen.getvalue()
                                      and "Graceful" in (log.read_text() if log.exists() else "")):
    time.sleep(0.1)
console.write(seen.getvalue())
"""


def test_what_workers_write_to_stderr_goes_to_the_log_file_not_the_console(ray_session, tmp_path):
    """A driver that joins Ray prints its workers' stdout (dard's epoch lines) and writes their
    stderr (library warnings, Ray's own tracebacks as a run stops) to dard.log, not the console."""
    import os

    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-c", WORKERS_SPEAK, str(tmp_path), str(HANG_S)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 1/1: a line of dard's own" in done.stdout
    assert "Graceful" not in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr
    log = (tmp_path / "dard.log").read_text()
    assert "speak pid=" in log and "RuntimeError: Graceful shutdown of backend failed" in log


def test_a_part_altered_under_the_workers_stops_the_run_naming_it(ray_shards, s3_digits, tmp_path):
    """Checked by the driver, then altered before the workers read it: the rank that meets it says
    which unit, every rank stops at the same step, and nothing is written as if an epoch finished."""
    import pyarrow.fs as pafs

    from cluster.train import train_distributed
    from dard.files import read_bytes, write_bytes
    from dard.shards import ShardSet

    copy = f"{ray_shards}-altered"
    fs, base = pafs.FileSystem.from_uri(ray_shards)
    pafs.copy_files(base, copy.split("://", 1)[1], source_filesystem=fs, destination_filesystem=fs)
    shards = ShardSet.open(copy)
    data = bytearray(read_bytes(f"{copy}/part-00001.arrow"))
    data[len(data) // 3] ^= 0xFF
    write_bytes(f"{copy}/part-00001.arrow", bytes(data))
    cfg = small_train_cfg(tmp_path, s3_digits)
    with pytest.raises(RuntimeError, match=r"part-00001.arrow \(record batch .\): its content differs"):
        train_distributed(cfg, shards, workers=2, name="altered", max_failures=2, out=str(tmp_path / "s.pt"))
    assert not list((tmp_path / "ray" / "altered").glob("checkpoint_*")) and not (tmp_path / "s.pt").exists()


def test_signals_keep_their_promise_on_the_ray_paths(ray_shards, s3_digits, trained_models, tmp_path, capsys):
    """Ctrl-C (SIGINT to the process group) on `dard train`: exit 130 and one line, the MLflow run
    closed KILLED, the Ray run's checkpoints kept; the rerun finishes with every epoch in MLflow
    exactly once. SIGTERM (what a scheduler sends) to `dard precompute` on Ray: exit 143 and one
    line, finished parts kept, and the rerun completes the rest. (SIGTERM on training takes the
    same path as Ctrl-C, the fit running off the main thread: tests/test_bad_inputs.py sends it to
    a training, tests/test_sweep.py to a sweep on Ray.)"""
    import re
    import signal as signals

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "run" / "ray" / "sig"
    # The signal goes within 0.3 s of the first checkpoint showing; 5 epochs of ~1 s each are left then
    epochs = 6
    argv = ["train", "--shards", ray_shards, "--source", s3_digits, "--limit-train", "256", "--steps", "2",
            "--epochs", str(epochs), "--workers", "1", "--name", "sig", "--run-dir", str(tmp_path / "run"),
            "--out", str(tmp_path / "s.pt"), "--tracking-uri", uri, "--set", "run.eval_limit=30",
            "--set", "optim.steps_per_epoch=24"]
    client = MlflowClient(tracking_uri=uri)

    def runs():
        return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]

    code, err, timeline = signal_when(argv, signals.SIGINT, lambda out: any(storage.glob("checkpoint_*/")), group=True)
    assert code == 130, timeline
    assert err.strip().splitlines()[-1].startswith("dard train: interrupted:") and "Traceback" not in err, timeline
    assert [r.info.status for r in runs()] == ["KILLED"]
    assert any(storage.glob("checkpoint_*/checkpoint.pt")) and not (tmp_path / "s.pt").exists()
    # a rerun under another config: one line, exit 2, before MLflow or Ray; the interrupted run stays as it was
    from dard.cli import main

    assert main([*argv, "--set", "optim.lr=0.0123"]) == 2
    assert "0.0123 now" in capsys.readouterr().err.splitlines()[-1]
    assert [r.info.status for r in runs()] == ["KILLED"]
    # the reruns in this process, on the session's Ray (a process of their own costs ~5 CPU-seconds of imports)
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    (run,) = runs()
    assert run.info.status == "FINISHED" and (tmp_path / "s.pt").exists()
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert steps == list(range(epochs)), steps  # every epoch once: none lost to the signal, none twice

    shards = tmp_path / "sh"
    argv = ["precompute", "--teacher", trained_models["teacher"]["model_path"], "--out", str(shards), "--views", "4",
            "--rows-per-part", "16", "--steps", "2", "--no-progress"]
    code, err, timeline = signal_when(argv, signals.SIGTERM, lambda out: any(shards.glob("part-*.json")))
    assert code == 143, timeline
    assert err.strip().splitlines()[-1].startswith("dard precompute: terminated:") and "Traceback" not in err, timeline
    kept = len(list(shards.glob("part-*.json")))
    assert kept >= 1 and not (shards / "manifest.json").exists()
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    printed = capsys.readouterr().out
    # parts a worker was finishing when the driver stopped may land too: at least those counted are kept
    assert int(re.search(r"kept (\d+) finished ones", printed).group(1)) >= kept, printed
    assert (shards / "manifest.json").exists()


def test_ddp_on_labeled_and_pool_shards_trains_pool_rows_on_the_teachers_labels(ray_session, tmp_path):
    """2 workers on labeled + pool shards, half of every batch pool rows: a pool row's hard label is
    the teacher's (here an untrained teacher, wrong on most rows), never the hidden true one."""
    import numpy as np
    import torch

    from cluster.precompute import precompute
    from cluster.train import train_distributed
    from dard.config import Config
    from dard.data import load_splits
    from dard.data.splits import labeled_positions
    from dard.models import build, load_model, save_model

    register()
    teacher = save_model(tmp_path / "t.pt", build("cnn_small", 10, 1), arch="cnn_small", num_classes=10, in_channels=1,
                         dataset="digits")
    cfg = Config.for_dataset("digits", data={"limit_train": 256, "labeled": 96, "pool_share": 0.5},
                             attack={"steps": 1}, optim={"epochs": 1, "batch_size": 64},
                             run={"eval_limit": 30, "out_dir": str(tmp_path), "progress": False})
    precompute(cfg, teacher, str(tmp_path / "s"), views=1, rows_per_part=64, use_ray=False)
    logs = tmp_path / "log"
    logs.mkdir()
    train_distributed(cfg, str(tmp_path / "s"), workers=2, name="pool", step_hook=WeightsLog(str(logs)))
    # the hidden labels and the teacher's, by pool position
    full = load_splits(cfg.updated(data={"labeled": None, "pool_share": None}).data).train
    hidden = np.setdiff1d(np.arange(len(full)), labeled_positions(full.labels, 96, 0))
    true = full.labels[hidden]
    with torch.no_grad():
        taught = load_model(teacher)[0](full.images[hidden].float() / 255).argmax(1)
    steps = [json.loads(line) for rank in (0, 1) for line in (logs / f"rank{rank}.jsonl").read_text().splitlines()]
    assert len(steps) == 2 * ((96 + 160) // 64)
    pool_rows = [(i, y) for s in steps for i, y, p in zip(s["rows"], s["labels"], s["pooled"]) if p]
    assert all(sum(s["pooled"]) == 16 for s in steps)  # pool_share 0.5 of 32 rows per rank
    assert all(y == int(taught[i]) for i, y in pool_rows)
    assert sum(y != int(true[i]) for i, y in pool_rows) > len(pool_rows) / 2  # wrong labels, used as the teacher's
