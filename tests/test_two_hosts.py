"""Two hosts for real: `ray up` with the shipped cluster/local.yaml from a client host, DDP across
two hosts, one host killed mid-training, and what the cluster exposes on its network.

Hosts are network namespaces on a bridge (tests/hosts.py): A (head), B (worker), C (the client
that runs `ray up`, `ray dashboard` and `ray job submit`), a router, and D on another subnet that
reaches the cluster network only through the router. Each host has its own address, ports, /tmp
and home (its own Ray token, its own ~/dard copy); shards, checkpoints, the MLflow store and the
models live in a folder every host sees, as a shared mount would be. The test prints every timing
(README, "Tests").
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import HANG_S
from tests.ray_hooks import committed_epoch

pytestmark = [pytest.mark.ray, pytest.mark.cluster_ssh]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUNTIME = json.dumps({"excludes": [".venv", ".git", "runs", "*.db", "mlruns"]})


def _cluster_yaml(net, hosts, key: Path) -> dict:
    """The shipped cluster/local.yaml for these hosts: its commands, addresses and network replaced."""
    cfg = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    firewall, install = cfg["setup_commands"]
    assert "firewall.sh 10.0.0.0/24" in firewall and "pip install" in install
    assert cfg["file_mounts"] == {"~/dard": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    venv = str(BIN.parent)
    # Test only, as Ray's own cluster_utils does: the head's autoscaler looks every second, not every
    # 5 s (at 5 s it launches the worker at its second look, 10 s after the head started)
    head = [c.replace("~/dard-venv", venv) for c in cfg["head_start_ray_commands"]]
    assert head[0].startswith("export ")
    head[0] = head[0].replace("export ", "export AUTOSCALER_UPDATE_INTERVAL_S=1 ", 1)
    cfg.update({
        "cluster_name": f"dard-2h-{net.tag}",
        "provider": {"type": "local", "head_ip": hosts["a"].address, "worker_ips": [hosts["b"].address]},
        "auth": {"ssh_user": "root", "ssh_private_key": str(key)},
        "file_mounts": {"~/dard": str(REPO), "~/.ray/auth_token": "~/.ray/auth_token"},
        # Test only: the shipped install (pip into ~/dard-venv) is replaced by this session's venv,
        # which every host sees; the firewall line is the shipped one, for this network.
        "setup_commands": [firewall.replace("10.0.0.0/24", net.cidr),
                           f"{venv}/bin/python -c 'import dard, cluster' && test -f ~/dard/pyproject.toml"],
        "head_start_ray_commands": head,
        "worker_start_ray_commands": [c.replace("~/dard-venv", venv) for c in cfg["worker_start_ray_commands"]],
    })
    return cfg


def _probe(host, address: str, ports: list[int]) -> list[int]:
    """The ``ports`` of ``address`` that accept a TCP connection from ``host`` (1 s each, in parallel)."""
    script = ("import socket, sys, concurrent.futures as f\n"
              "def ok(p):\n"
              "    try:\n"
              f"        socket.create_connection(({address!r}, p), 1).close(); return p\n"
              "    except OSError: return None\n"
              "ports = [int(p) for p in sys.argv[1:]]\n"
              "with f.ThreadPoolExecutor(32) as ex: print(' '.join(str(p) for p in ex.map(ok, ports) if p))\n")
    out = host.run([sys.executable, "-c", script, *map(str, ports)], timeout=HANG_S)
    assert out.returncode == 0, out.stderr
    return [int(p) for p in out.stdout.split()]


# Polls the cluster from the client host until a condition holds, in one process: Ray's job and
# state SDKs through the forwarded dashboard, as `ray job status` and `ray list nodes` call them;
# each of those commands pays Ray's import again, about 1.9 CPU-seconds a poll on this machine.
_AWAIT = """\
import json, sys, time
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_nodes

deadline, what, arg = time.time() + float(sys.argv[1]), sys.argv[2], sys.argv[3]
seen, done, client = {}, False, None
while not done and time.time() < deadline:
    try:
        if what == "nodes":  # until every IP=STATE of arg holds
            seen = {n.node_ip: n.state for n in list_nodes(detail=True)}
            done = all(seen.get(ip) == state for ip, state in (p.split("=") for p in arg.split(",")))
        else:  # until the job arg ends
            client = client or JobSubmissionClient()
            seen = {"status": str(client.get_job_status(arg))}
            done = seen["status"] in ("SUCCEEDED", "FAILED", "STOPPED")
    except Exception as err:  # the forward or the job agent not up yet
        seen = {"error": repr(err)}
    at = time.time()
    time.sleep(0 if done else 0.5)
if client is not None:
    seen["logs"] = client.get_job_logs(arg)
print(json.dumps({"seen": seen, "at": at}))
"""


def _await(host, env: dict, what: str, arg: str) -> tuple[dict, float]:
    """What ``host`` last saw of the cluster when ``what`` ("nodes", or "job") met ``arg`` (IP=STATE,...
    or a job id), or HANG_S passed, and when (``time.time()``)."""
    out = host.run([sys.executable, "-c", _AWAIT, str(HANG_S), what, arg], env=env, timeout=2 * HANG_S, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.splitlines()[-1])
    return found["seen"], found["at"]


def test_two_hosts_ray_up_ddp_lose_a_host_and_expose_nothing_off_network(trained_models):
    from tests.hosts import HostsUnavailable, Network

    folder = Path(tempfile.mkdtemp(prefix="dard-hosts-", dir="/var/tmp"))  # not /tmp: each host has its own
    shared = folder / "shared"
    shared.mkdir()
    try:
        net = Network(folder)
        hosts = net.make(["a", "b", "c"], outside=["d"])
    except HostsUnavailable as err:
        pytest.fail(str(err))
    a, b, c, d = hosts["a"], hosts["b"], hosts["c"], hosts["d"]
    timings: dict[str, float] = {}
    env = {"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1"}
    dashboard = None
    try:
        key = folder / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        for host in (a, b):
            host.start_sshd(key)
        # the client's token, shipped to every node by the file's file_mounts
        assert c.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env).returncode == 0
        (folder / "cluster.yaml").write_text(yaml.safe_dump(_cluster_yaml(net, hosts, key)))

        started = time.time()
        up = c.run([str(BIN / "ray"), "up", "-y", "--no-config-cache", str(folder / "cluster.yaml")], env=env,
                   timeout=HANG_S, cwd=REPO)
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        timings["ray up (head)"] = time.time() - started
        # `ray dashboard`: the dashboard and job API stay on the head's loopback; the client reaches
        # them through SSH port forwarding, as Ray documents for a remote cluster
        dashboard = c.popen([str(BIN / "ray"), "dashboard", "--port", "8265", str(folder / "cluster.yaml")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        jobs = {**env, "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:8265"}

        def ray(*args: str, job_env=jobs) -> subprocess.CompletedProcess:
            return c.run([str(BIN / "ray"), *args], env=job_env, timeout=HANG_S, cwd=REPO)

        nodes, _ = _await(c, jobs, "nodes", f"{a.address}=ALIVE,{b.address}=ALIVE")
        monitor = sorted((a.folder / "tmp").glob("ray/session_2*/logs/monitor.*"))
        assert nodes == {a.address: "ALIVE", b.address: "ALIVE"}, (
            nodes, "\n".join(p.read_text()[-3000:] for p in monitor))
        timings["worker joined (from ray up)"] = time.time() - started
        for host in (a, b):  # the checkout reached each host's own home, without what .gitignore lists
            copy = host.folder / "home" / "dard"
            assert (copy / "pyproject.toml").is_file() and not (copy / ".venv").exists()
            assert (host.folder / "home" / ".ray" / "auth_token").read_text() == \
                (c.folder / "home" / ".ray" / "auth_token").read_text()

        # network exposure, measured: what listens on the head, and what a host off the cluster
        # network (D, routed in through the router) and the client can reach of it
        listening = a.listening()
        print("\nhead listens on:\n  " + "\n  ".join(f"{addr}:{port} {proc}" for addr, port, proc in listening))
        assert all(addr in ("127.0.0.1", "::1") for addr, port, _ in listening if port == 8265)
        ports = sorted({port for _, port, _ in listening})
        assert _probe(d, a.address, ports) == [22]  # from another subnet: SSH alone
        reachable = _probe(c, a.address, ports)
        assert 6379 in reachable and 8265 not in reachable  # the cluster network has Ray; nobody has the dashboard

        # a client without the token is refused
        refused = ray("job", "submit", "--", "python", "-c", "pass", job_env={**jobs, "RAY_AUTH_MODE": "disabled"})
        assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

        def submit(*args: str) -> str:
            for _ in range(20):  # the head's job agent comes up a few seconds after its API
                job = ray("job", "submit", "--no-wait", "--working-dir", str(REPO), "--runtime-env-json", RUNTIME,
                          "--", "python", "-m", *args)
                if job.returncode == 0:
                    return re.search(r"raysubmit_[A-Za-z0-9]+", job.stdout).group()
                time.sleep(3)
            raise AssertionError(job.stdout[-2000:] + job.stderr[-2000:])

        def wait(job_id: str) -> tuple[str, str]:
            """(SUCCEEDED, FAILED, STOPPED, or what it was when HANG_S passed; the job's logs)."""
            seen, _ = _await(c, jobs, "job", job_id)
            return seen.get("status", str(seen)), seen.get("logs", "")

        teacher, shards = shared / "teacher.pt", shared / "shards"
        shutil.copy(trained_models["teacher"]["model_path"], teacher)
        common = ["--limit-train", "512", "--steps", "2", "--no-progress"]
        t = time.time()
        status, logs = wait(submit("cluster.jobs.precompute", *common, "--teacher", str(teacher), "--out", str(shards),
                                   "--rows-per-part", "128"))
        assert status == "SUCCEEDED", logs[-3000:]
        timings["precompute job"] = time.time() - t

        uri, storage, student = f"sqlite:///{shared / 'mlflow.db'}", shared / "ray", shared / "student.pt"
        epochs = 5
        t = time.time()
        train = submit("cluster.jobs.train", *common, "--shards", str(shards), "--workers", "2", "--placement",
                       "spread", "--epochs", str(epochs), "--tracking-uri", uri, "--storage-path", str(storage),
                       "--name", "two-hosts", "--out", str(student), "--max-failures", "2",
                       "--set", "run.eval_limit=60")
        # host B dies mid-training: once Ray Train has committed epoch 1's checkpoint (every worker's
        # report of it arrived: its snapshot in the storage says so), every process of B is killed
        deadline = time.time() + HANG_S
        run_dir = str(storage / "two-hosts")
        while committed_epoch(run_dir) < 1 and time.time() < deadline:
            time.sleep(0.2)
        assert committed_epoch(run_dir) >= 1, ray("job", "logs", train).stdout[-3000:]
        killed_after = committed_epoch(run_dir)
        killed = time.time()
        b.kill_all()
        nodes, noticed = _await(c, jobs, "nodes", f"{b.address}=DEAD")
        timings["Ray noticed the lost host"] = noticed - killed
        assert nodes.get(b.address) == "DEAD", nodes
        status, logs = wait(train)
        timings[f"training job ({epochs} epochs, host B killed after epoch {killed_after})"] = time.time() - t
        assert status == "SUCCEEDED", logs[-4000:]

        # every epoch once: in the run's checkpoint history and in MLflow (resumed, not restarted)
        from mlflow.tracking import MlflowClient

        from dard.checkpoint import load_checkpoint
        from dard.models import load_model

        model, header = load_model(student)  # finite, or it would not load
        assert header["meta"]["last_metrics"]["epoch"] == epochs - 1
        snapshot = json.loads((storage / "two-hosts" / "checkpoint_manager_snapshot.json").read_text())
        state = load_checkpoint(storage / "two-hosts" / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
                                / "checkpoint.pt")
        assert [h["epoch"] for h in state["history"]] == list(range(epochs))
        ips = {h["epoch"]: h["node_ips"] for h in state["history"]}
        assert ips[0] == ",".join(sorted([a.address, b.address])) and ips[epochs - 1] == a.address  # 2 hosts, then A
        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("dard").experiment_id])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(epochs)), steps  # no epoch lost, none logged twice
        nodes = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "nodes")}
        assert nodes[0] == 2 and nodes[epochs - 1] == 1
        assert logs.count(f"epoch 1/{epochs}:") == 1  # the restart resumed after epoch {killed_after}, not from 0
        # the student evaluates
        import torch

        from dard.config import Config
        from dard.data import load_splits, to_float

        test = load_splits(Config.for_dataset("digits").data).test
        with torch.no_grad():
            accuracy = (model(to_float(test.images)).argmax(1) == test.labels).float().mean().item()
        assert accuracy > 0.5
    finally:
        if dashboard is not None:
            dashboard.kill()
        left = []
        if os.environ.get("DARD_KEEP_HOSTS"):  # debugging: leave everything up, say where
            print(f"\nkept: {folder}, namespaces {[h.ns for h in hosts.values()]}, bridges {net.bridges}")
        else:
            t = time.time()
            left = net.teardown()
            timings["teardown"] = time.time() - t
            shutil.rmtree(folder, ignore_errors=True)
        print("\ntwo hosts: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    assert not left, left
