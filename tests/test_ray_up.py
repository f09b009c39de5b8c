"""`ray up cluster/local.yaml` for real: SSH to this machine on loopback, jobs, teardown.

The test runs its own sshd on 127.0.0.1:22 (a key made for the test, its own host key and
config in a temporary folder; nothing of ``~/.ssh`` is read or written), brings the head up with
the shipped file's start commands (its ports swapped for free ones, its paths for the test's),
submits `cluster.jobs.precompute` and then `cluster.jobs.train` with `ray job submit`, checks
that a client without the token is refused, and tears down by the processes it started: never
`ray stop`/`ray down`, which stop every Ray process of the user, this test session's included.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.cluster_ssh]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
MARK = "DARD_TEST_RAY_UP"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _non_loopback_listeners() -> list[str]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    bad = []
    for line in out.splitlines():
        local = line.split()[3]
        addr = local.rsplit(":", 1)[0].strip("[]").split("%")[0]
        ip = ipaddress.ip_address(addr) if addr != "*" else ipaddress.ip_address("0.0.0.0")
        if getattr(ip, "ipv4_mapped", None):
            ip = ip.ipv4_mapped
        if not ip.is_loopback:
            bad.append(local)
    return bad


def _start_sshd(d: Path) -> subprocess.Popen:
    """sshd on 127.0.0.1:22 only, key-only root login with a key made here; returns the process."""
    if _listening(HOST, 22):
        pytest.fail(f"{HOST}:22 is already taken (an sshd of this machine?); this test runs its own sshd there")
    for key in ("id_ed25519", "host_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dard-test", "-f", str(d / key)],
                       check=True)
    shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
    (d / "sshd_config").write_text(
        f"ListenAddress {HOST}:22\nHostKey {d / 'host_ed25519'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nStrictModes no\nUsePAM no\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder (the package's service makes it)
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "w"), start_new_session=True)
    deadline = time.time() + 20
    while not _listening(HOST, 22):
        assert sshd.poll() is None and time.time() < deadline, (d / "sshd.log").read_text()
        time.sleep(0.2)
    return sshd


def _cluster_yaml(d: Path, remote: Path, temp_dir: str, ports: dict[str, int]) -> dict:
    """The shipped cluster/local.yaml, pointed at this machine: same commands, the test's ports and paths."""
    cfg = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    (head_start,) = cfg["head_start_ray_commands"]
    assert "ray stop" not in head_start and "RAY_AUTH_MODE=token" in head_start
    for flag, port in ports.items():
        head_start, n = re.subn(rf"--{flag}=\d+", f"--{flag}={port}", head_start)
        assert n == 1, f"the shipped head start command has no --{flag}"
    head_start = head_start.replace("~/dard-venv", str(BIN.parent)) + f" --temp-dir={temp_dir} --num-cpus=2"
    # Test only: keep every Ray daemon on loopback (a real head must be reachable from its workers)
    # and mark the head's processes, which inherit the variable, for the teardown.
    head_start = f"export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 {MARK}={d} && {head_start}"
    cfg.update({
        "cluster_name": f"dard-test-{os.getpid()}",
        "provider": {"type": "local", "head_ip": HOST, "worker_ips": []},
        "auth": {"ssh_user": "root", "ssh_private_key": str(d / "id_ed25519")},
        "file_mounts": {str(remote): str(REPO)},
        # The shipped setup installs the package into ~/dard-venv; this "host" is the test's own
        # machine, whose venv already has it (installing the copy would repoint the test's venv).
        "setup_commands": [f"{BIN / 'python'} -c 'import dard, cluster' && test -f {remote}/pyproject.toml"],
        "head_start_ray_commands": [head_start],
        "worker_start_ray_commands": [],
    })
    return cfg


def _processes_of(d: Path, exclude: set[int]) -> set[psutil.Process]:
    """The head's processes and their children, and ray up's SSH connections.

    The head's daemons carry ``MARK=d`` in their environment; the processes Ray renames (e.g.
    ``ray::DashboardAgent``) overwrite that memory with their title, but they are children of a
    marked one while the head lives. ray up's SSH masters name the test's key."""
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] in exclude:
                continue
            if p.environ().get(MARK) == str(d) or str(d / "id_ed25519") in " ".join(p.info["cmdline"] or []):
                found |= {p, *p.children(recursive=True)}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _kill(procs) -> None:
    procs = list(procs)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=5)


def test_ray_up_over_ssh_runs_jobs_and_tears_down(trained_models, tmp_path):
    d = Path(tempfile.mkdtemp(prefix="dard-up-", dir="/tmp"))  # short: Ray's unix socket paths must fit 107 bytes
    temp_dir, remote = str(d / "ray"), d / "dard"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    ports = {k: _free_port() for k in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                       "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
                                       "ray-client-server-port")}
    home = Path.home()
    bootstrap = [home / "ray_bootstrap_config.yaml", home / "ray_bootstrap_key.pem"]
    bootstrap_before = {p: p.exists() for p in bootstrap}
    exposed_before = set(_non_loopback_listeners())  # the machine's own services, if any
    me = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    started = time.time()
    sshd = _start_sshd(d)
    head: set[psutil.Process] = set()
    try:
        (d / "cluster.yaml").write_text(yaml.safe_dump(_cluster_yaml(d, remote, temp_dir, ports)))
        up = subprocess.run([str(BIN / "ray"), "up", "-y", "--no-config-cache", str(d / "cluster.yaml")], env=env,
                            capture_output=True, text=True, timeout=240)
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        assert (remote / "pyproject.toml").exists() and not (remote / ".venv").exists()  # rsync_filter: .gitignore
        head = _processes_of(d, me)  # while the head lives, its renamed daemons are still its children
        assert set(_non_loopback_listeners()) <= exposed_before  # sshd and the whole head: loopback only

        env["RAY_API_SERVER_ADDRESS"] = f"http://{HOST}:{ports['dashboard-port']}"
        shards, student = tmp_path / "shards", tmp_path / "student.pt"
        runtime = json.dumps({"excludes": [".venv", ".git", "runs", "*.db", "mlruns"]})

        def submit(*args: str, job_env=env) -> subprocess.CompletedProcess:
            command = [str(BIN / "ray"), "job", "submit", "--working-dir", str(REPO), "--runtime-env-json", runtime,
                       "--", "python", "-m", *args]
            for _ in range(20):  # the head's job agent comes up a few seconds after its API
                job = subprocess.run(command, env=job_env, capture_output=True, text=True, timeout=300)
                if "No available agent" not in job.stderr:
                    return job
                time.sleep(3)
            return job

        refused = submit("cluster.jobs.train", "--help", job_env={**env, "RAY_AUTH_MODE": "disabled"})
        assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()

        # `python` resolves to the venv: the start command put it first on the head's PATH
        job = submit("cluster.jobs.precompute", "--teacher", trained_models["teacher"]["model_path"],
                     "--out", str(shards), "--limit-train", "256", "--steps", "2", "--no-progress")
        assert job.returncode == 0 and "succeeded" in (job.stdout + job.stderr).lower(), job.stdout[-3000:]
        job = submit("cluster.jobs.train", "--shards", str(shards), "--limit-train", "256", "--steps", "2",
                     "--epochs", "1", "--workers", "2", "--no-tracking", "--no-progress", "--out", str(student),
                     "--run-dir", str(tmp_path / "run"), "--name", "up-test")
        assert job.returncode == 0 and "succeeded" in (job.stdout + job.stderr).lower(), job.stdout[-3000:]

        from dard.config import Config
        from dard.models import load_model
        from dard.training import open_shards

        cfg = Config.for_dataset("digits", data={"limit_train": 256}, attack={"steps": 2})
        assert len(open_shards(str(shards), cfg, check="full")) == 256  # every part's checksum verified
        assert list((tmp_path / "run" / "ray" / "up-test").glob("checkpoint_*/checkpoint.pt"))
        _, header = load_model(student)
        assert header["meta"]["method"] == "dard" and header["meta"]["final_metrics"]["world_size"] == 2
    finally:
        _kill(head | _processes_of(d, me))
        _kill([psutil.Process(sshd.pid), *psutil.Process(sshd.pid).children(recursive=True)]
              if sshd.poll() is None else [])
        for p in bootstrap:  # ray up writes these on the head, i.e. into this machine's home
            if not bootstrap_before[p]:
                p.unlink(missing_ok=True)
        left = [p for p in head | _processes_of(d, me) if p.is_running()]
        shutil.rmtree(d, ignore_errors=True)
    assert not left, [p.cmdline() for p in left]
    assert not _listening(HOST, 22) and not _listening(HOST, ports["dashboard-port"])
    print(f"ray up + 2 jobs + teardown: {time.time() - started:.0f} s")
