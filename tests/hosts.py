"""Test hosts: a small private network of "machines" made of Linux network namespaces.

Each host has its own network stack (an address on a bridge the test owns, its own loopback and
ports), its own processes (a PID namespace: Ray finds only its own), its own ``/tmp`` and home
folder (a mount namespace over folders of the test), and can run its own sshd; the file system is
otherwise shared, as with a shared mount. Every command run "on" a host is its own PID namespace
(the first process is its init): a long-lived one such as sshd keeps what it starts alive. Only the network's own
addresses and loopback are ever contacted. Teardown is by the processes inside each namespace
(``ip netns pids``), then the namespaces and the bridges: never ``ray stop``, never a kill by name.
Needs root and iproute2 (``.ci/run`` installs it).
"""
from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import HANG_S

HOME = Path.home()
TMP = Path("/tmp")
# Inside a host, home and /tmp are the host's own folders; what the test needs from the real ones
# (a pyenv Python, the venv, the checkout: CI may clone under /tmp) is bound back in, as it is.
_USED = (sys.base_prefix, sys.prefix, str(Path(__file__).resolve().parents[1]))


def _needed(root: Path) -> str:
    return " ".join(sorted({Path(p).relative_to(root).parts[0] for p in _USED if Path(p).is_relative_to(root)
                            and Path(p) != root}))


_ENTER = r'''
hd=$1; shift
mkdir -p "$hd/tmp" "$hd/home" "$hd/.real-home" "$hd/.real-tmp"
mount --bind "$HOME_DIR" "$hd/.real-home"
mount --bind /tmp "$hd/.real-tmp"
mount --bind "$hd/home" "$HOME_DIR"
mount --bind "$hd/tmp" /tmp
for p in $NEEDED_HOME; do mkdir -p "$HOME_DIR/$p" && mount --bind "$hd/.real-home/$p" "$HOME_DIR/$p"; done
for p in $NEEDED_TMP; do mkdir -p "/tmp/$p" && mount --bind "$hd/.real-tmp/$p" "/tmp/$p"; done
exec "$@"
'''


class HostsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, or no iproute2)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Host:
    name: str
    ns: str
    address: str
    folder: Path
    network: "Network" = field(repr=False)

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` as run on this host: its network namespace, its own /tmp and home."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                "--mount-proc", "--",
                "env", f"HOME_DIR={HOME}", f"NEEDED_HOME={_needed(HOME)}", f"NEEDED_TMP={_needed(TMP)}",
                "sh", "-c", _ENTER, "sh", str(self.folder), *argv]

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(argv), **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), **kw)

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.ns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, timeout: float = 20) -> None:
        """SIGKILL every process of this host until none is left (the host "loses power")."""
        deadline = time.time() + timeout
        while (pids := self.pids()) and time.time() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if self.pids():
            raise RuntimeError(f"host {self.name}: processes {self.pids()} survived SIGKILL")

    def listening(self) -> list[tuple[str, int, str]]:
        """(address, port, process) of every TCP socket listening on this host."""
        out = _ip("netns", "exec", self.ns, "ss", "-ltnpH").stdout
        found = []
        for line in out.splitlines():
            cols = line.split()
            address, port = cols[3].rsplit(":", 1)
            process = cols[5].split('"')[1] if len(cols) > 5 and '"' in cols[5] else "?"
            found.append((address.strip("[]").removeprefix("::ffff:"), int(port), process))
        return sorted(set(found))

    def start_sshd(self, key: Path) -> None:
        """sshd on this host's address, port 22, key-only root login with ``key`` (made by the test)."""
        d = self.folder / "sshd"
        d.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
        shutil.copy(f"{key}.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"ListenAddress {self.address}:22\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
            f"PidFile {d / 'sshd.pid'}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL,
                   stderr=open(d / "sshd.log", "w"), start_new_session=True)
        probe = f"import socket; socket.create_connection(('{self.address}', 22), 1)"
        deadline = time.time() + HANG_S
        while (probed := self.run([sys.executable, "-c", probe])).returncode != 0:
            if time.time() > deadline:
                raise RuntimeError(f"host {self.name}: sshd not reachable ({probed.stderr.strip()[-300:]}); "
                                   f"its log: {(d / 'sshd.log').read_text()[-300:]}")
            time.sleep(0.2)


class Network:
    """Hosts on a /24 of their own (a bridge), and optionally "outside" hosts on a second /24 that
    reach the first only through a router host."""

    def __init__(self, folder: Path):
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise HostsUnavailable("the two-host tests need root and iproute2's `ip` to make network namespaces "
                                   f"(euid {os.geteuid()}, ip {'found' if shutil.which('ip') else 'missing'})")
        self.folder = folder
        self.tag = f"{os.getpid() % 100000:05d}"
        taken = {ipaddress.ip_interface(a).network for a in _ip("-o", "-4", "addr", "show").stdout.split()
                 if "/" in a and a[0].isdigit()}
        free = [n for n in range(100, 250) if ipaddress.ip_network(f"10.77.{n}.0/24") not in taken
                and ipaddress.ip_network(f"10.78.{n}.0/24") not in taken]
        n = random.Random(os.getpid()).choice(free)
        self.cidr, self.outside_cidr = f"10.77.{n}.0/24", f"10.78.{n}.0/24"
        self.bridges: list[str] = []
        self.hosts: dict[str, Host] = {}

    def _bridge(self, suffix: str) -> str:
        name = f"dh{self.tag}{suffix}"
        _ip("link", "add", name, "type", "bridge")
        self.bridges.append(name)
        _ip("link", "set", name, "up")
        return name

    def _host(self, name: str, links: list[tuple[str, str]], gateway: str | None) -> Host:
        ns = f"dard-{self.tag}-{name}"
        try:
            _ip("netns", "add", ns)
        except subprocess.CalledProcessError as err:
            raise HostsUnavailable(f"cannot make network namespace {ns}: {err.stderr.strip()}") from err
        host = Host(name, ns, links[0][1].split("/")[0], self.folder / name, self)
        host.folder.mkdir(parents=True)
        self.hosts[name] = host
        _ip("-n", ns, "link", "set", "lo", "up")
        for i, (bridge, address) in enumerate(links):
            veth = f"dv{self.tag}{name[:3]}{i}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", f"eth{i}", "netns", ns)
            _ip("link", "set", veth, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", address, "dev", f"eth{i}")
            _ip("-n", ns, "link", "set", f"eth{i}", "up")
        if gateway:
            _ip("-n", ns, "route", "add", "default", "via", gateway)
        return host

    def make(self, names: list[str], outside: list[str] = ()) -> dict[str, Host]:
        """``names`` on the cluster network (.1, .2, ...), ``outside`` on a second network (.1, ...)
        whose only way in is a router host (.254 on both, forwarding between them)."""
        net, out = ipaddress.ip_network(self.cidr), ipaddress.ip_network(self.outside_cidr)
        inside_bridge = self._bridge("c")
        outside_bridge = self._bridge("o") if outside else None
        gateway, outside_gateway = str(net[254]), str(out[254])
        for i, name in enumerate(names, start=1):
            self._host(name, [(inside_bridge, f"{net[i]}/24")], gateway)
        router = self._host("router", [(inside_bridge, f"{gateway}/24")] +
                            ([(outside_bridge, f"{outside_gateway}/24")] if outside else []), None)
        if outside:
            router.run(["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"], check=True)  # in its namespace only
        for i, name in enumerate(outside, start=1):
            self._host(name, [(outside_bridge, f"{out[i]}/24")], outside_gateway)
        return self.hosts

    def teardown(self) -> list[str]:
        """Every process of every host, then the namespaces, then the bridges; returns what was left."""
        left = []
        for host in self.hosts.values():
            try:
                host.kill_all()
            except RuntimeError as err:
                left.append(str(err))
        for host in self.hosts.values():
            if _ip("netns", "del", host.ns, check=False).returncode != 0:
                left.append(f"namespace {host.ns}")
        for bridge in self.bridges:
            if _ip("link", "del", bridge, check=False).returncode != 0:
                left.append(f"bridge {bridge}")
        names = _ip("netns", "list").stdout + _ip("link", "show").stdout
        left += [f"still present: {x}" for x in [h.ns for h in self.hosts.values()] + self.bridges if x in names]
        return left
