"""CPU-seconds by kind of process over a run: the tests themselves, each of Ray's actors and daemons,
the commands the tests start. Where the suite's CPU goes, per process rather than per test.

A process of its own looks at /proc every ``INTERVAL_S`` and keeps, per process, the CPU time it
used from its first look to its last (what a process used before the run is not the run's). A
process that lives between two looks, the last half-second of one that ends, and the kernel's own
threads are missed: the table says what share of the machine's busy CPU-seconds it accounts for.

    python -m benchmarks.process_cpu OUT -- COMMAND ...    # while COMMAND runs: OUT.json, OUT.md

The suite_cpu plugin runs it beside the suite (the second table of ``suite-cpu.md``).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

INTERVAL_S = 0.5
_HZ = os.sysconf("SC_CLK_TCK")
ROOT = "the run's own process"  # under the suite_cpu plugin: pytest, the tests that run in it
IDLE = "ray::IDLE"  # a pool worker Ray started and has not given work yet: its later title says whose it was
RAY_WORKER = "a Ray worker before it named itself"  # its script, until it takes a title ray::Name
_WORKER_SCRIPTS = ("/default_worker.py", "/setup_worker.py")
# Ray's daemons, by the script they run (the actors and workers name themselves: ray::Name.method)
_SCRIPTS = {"log_monitor.py": "ray log monitor", "dashboard/dashboard.py": "ray dashboard",
            "autoscaler/_private/monitor.py": "ray autoscaler", "bin/ray": "ray command",
            "bin/mlflow": "mlflow command"}


def kind(argv: list[str], is_root: bool = False) -> str | None:
    """The name a process counts under, from its command line; None for a kernel thread."""
    if not argv:
        return None
    if " " in argv[0] and not argv[0].startswith("ray::"):  # a title set as one string: its words
        argv = argv[0].split() + argv[1:]
    if is_root:
        return ROOT
    if argv[0].startswith("ray::"):
        return argv[0].split(".")[0]
    name = os.path.basename(argv[0])
    if name in ("raylet", "gcs_server", "sshd"):
        return name
    if "python" not in name:
        return name
    args = argv[1:]
    while args and args[0].startswith("-") and args[0] not in ("-m", "-c"):  # interpreter flags: -u, -B, -W ignore
        args = args[2:] if args[0] in ("-W", "-X") else args[1:]
    if not args:
        return name
    if args[0] == "-m" and len(args) > 1:
        return f"dard {args[2]}" if args[1] == "dard.cli" and len(args) > 2 else f"python -m {args[1]}"
    if args[0] == "-c" or any(c in args[0] for c in " '\";"):  # code given as an argument
        return "python -c"
    if args[0].endswith(_WORKER_SCRIPTS):
        return RAY_WORKER
    return next((label for script, label in _SCRIPTS.items() if args[0].endswith(script)),
                f"python {os.path.basename(args[0])}")


def _ticks() -> list[int]:
    """/proc/stat's first line: user, nice, system, idle, iowait, irq, softirq, steal, ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def busy_cpu_s() -> float:
    """CPU-seconds the whole machine has been busy (user, nice, system, irq, softirq): run with
    nothing else on it."""
    ticks = _ticks()
    return (sum(ticks[:7]) - ticks[3] - ticks[4]) / _HZ


def stolen_s() -> float:
    """CPU-seconds the hypervisor gave to other machines while this one wanted them (steal)."""
    return _ticks()[7] / _HZ


def _look(pid: str) -> tuple[str, float, list[str]] | None:
    """(start time, CPU-seconds so far, command line) of one process; None once it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "(comm)", which may hold spaces
    return fields[19], (int(fields[11]) + int(fields[12])) / _HZ, argv


class Sampler:
    """Looks at every process; :meth:`result` sums what each kind used between the first look and now.
    ``new_only``: only the processes started after the first look."""

    def __init__(self, root: int | None = None, new_only: bool = False):
        self.root, self.me, self.new_only = root, os.getpid(), new_only
        self.before: set[tuple[str, str]] = set()
        self.seen: dict[tuple[str, str], list] = {}  # (pid, start) -> [kind, CPU at first look, CPU at last]
        self.started, self.busy_at_start = time.monotonic(), busy_cpu_s()
        self.first, self.looks_cpu_s = True, 0.0  # what the looks cost: in no kind

    def look(self) -> None:
        started = time.thread_time()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == self.me:
                continue
            found = _look(pid)
            if found is None:
                continue
            start, cpu, argv = found
            if self.first and self.new_only or (pid, start) in self.before:
                self.before.add((pid, start))  # there before the first look: not counted
                continue
            name = kind(argv, int(pid) == self.root)
            entry = self.seen.setdefault((pid, start), [name, cpu if self.first else 0.0, cpu])
            entry[2] = cpu
            if entry[0] in (None, IDLE) or name not in (None, IDLE) and name.startswith("ray::"):
                entry[0] = name  # the title a process of Ray's takes says whose it is
        self.first = False
        self.looks_cpu_s += time.thread_time() - started

    def result(self) -> dict:
        kinds: dict[str, dict] = defaultdict(lambda: {"cpu_s": 0.0, "processes": 0})
        for name, first, last in self.seen.values():
            if name is not None and last > first:
                kinds[name]["cpu_s"] += last - first
                kinds[name]["processes"] += 1
        return {"seconds": time.monotonic() - self.started, "busy_cpu_s": busy_cpu_s() - self.busy_at_start,
                "sampler_cpu_s": self.looks_cpu_s,
                "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["cpu_s"]))}


def table(result: dict, rows: int = 25) -> list[str]:
    """Markdown lines: the kinds by CPU-seconds, and what the looks did not see."""
    kinds = list(result["kinds"].items())
    seen = sum(k["cpu_s"] for _, k in kinds)
    busy, seconds = result["busy_cpu_s"], result["seconds"]
    lines = [f"{seen:,.0f} of the machine's {busy:,.0f} busy CPU-seconds over {seconds:.0f} s "
             f"are seen in a process (the looks themselves: {result['sampler_cpu_s']:.0f}), by kind:", "",
             "| process | CPU-seconds | processes |", "|---|---:|---:|"]
    lines += [f"| `{name}` | {k['cpu_s']:.1f} | {k['processes']} |" for name, k in kinds[:rows]]
    rest = kinds[rows:]
    if rest:
        lines.append(f"| {len(rest)} other kinds | {sum(k['cpu_s'] for _, k in rest):.1f} | "
                     f"{sum(k['processes'] for _, k in rest)} |")
    return lines


@contextlib.contextmanager
def watching(root: int | None = None, new_only: bool = False):
    """A :class:`Sampler` looking from a thread while in the block (call its ``result()`` after)."""
    sampler, stop = Sampler(root, new_only), threading.Event()
    sampler.look()  # before the block starts anything

    def looks():
        while not stop.wait(INTERVAL_S):
            sampler.look()

    thread = threading.Thread(target=looks, daemon=True)
    thread.start()
    try:
        yield sampler
    finally:
        stop.set()
        thread.join()
        sampler.look()


def watch(out: str, root: int | None = None, until=lambda: False) -> dict:
    """Look until SIGTERM or ``until()``; write ``out``.json and return the result."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    with watching(root) as sampler:
        while not stop and not until():
            time.sleep(INTERVAL_S)
    result = sampler.result()
    Path(f"{out}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 1 or len(argv) < 3:
        print("usage: python -m benchmarks.process_cpu OUT -- COMMAND ...", file=sys.stderr)
        return 2
    out, command = argv[0], argv[2:]
    try:
        child = subprocess.Popen(command)
    except OSError as err:
        print(f"process_cpu: cannot run {command[0]}: {err.strerror}", file=sys.stderr)
        return 2
    result = watch(out, child.pid, until=lambda: child.poll() is not None)
    Path(f"{out}.md").write_text("\n".join([f"# CPU by process: `{' '.join(command)}`", "", *table(result)]) + "\n")
    return child.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--watch"]:  # the suite_cpu plugin's: ``--watch OUT ROOT_PID``, until SIGTERM or its end
        watch(sys.argv[2], int(sys.argv[3]), until=lambda: not os.path.exists(f"/proc/{sys.argv[3]}"))
    else:
        sys.exit(main(sys.argv[1:]))
