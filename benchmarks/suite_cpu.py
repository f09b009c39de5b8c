"""A pytest plugin: each test's wall time and the CPU-seconds the whole machine was busy over it
(/proc/stat: user, nice, system, irq, softirq; run it with nothing else on the machine), so that
where the suite's time goes and how busy the cores are is measured, not guessed; and, for the
whole run, the CPU-seconds a virtual machine's host took for others (steal), which slow every test
alike without showing as busy, and the CPU-seconds by kind of process (``benchmarks.process_cpu``,
in a process beside the suite). Writes ``benchmarks/results/suite-cpu.md`` and ``.json`` (or
``$SUITE_CPU_OUT.md|.json``).

    python -m pytest -q -p benchmarks.suite_cpu                 # the suite, ~11 min on 2 cores
    python -m pytest -q -p benchmarks.suite_cpu -m "not ray"    # the tests that start no Ray, ~3.5 min
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks.process_cpu import busy_cpu_s, stolen_s, table

_ROWS: list[tuple[str, float, float]] = []


_STOLEN_AT_START = stolen_s()
_PROCESSES = {"out": os.path.join(tempfile.mkdtemp(prefix="suite-cpu-"), "processes")}


def pytest_sessionstart(session):
    _PROCESSES["watcher"] = subprocess.Popen([sys.executable, "-m", "benchmarks.process_cpu", "--watch",
                                              _PROCESSES["out"], str(os.getpid())], cwd=session.config.rootpath)


def _processes() -> dict:
    """The watcher's result: CPU-seconds by kind of process over the run."""
    watcher = _PROCESSES["watcher"]
    watcher.terminate()
    if watcher.wait(timeout=60) != 0:
        raise RuntimeError(f"benchmarks.process_cpu ended {watcher.returncode}: its traceback is above")
    result = json.loads(Path(_PROCESSES["out"] + ".json").read_text())
    shutil.rmtree(os.path.dirname(_PROCESSES["out"]))  # the watcher's own folder: its result is in ours now
    return result


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup, call and teardown of one test: fixtures count where they are built."""
    wall, cpu = time.monotonic(), busy_cpu_s()
    yield
    _ROWS.append((item.nodeid, time.monotonic() - wall, busy_cpu_s() - cpu))


def pytest_sessionfinish(session):
    out = os.environ.get("SUITE_CPU_OUT") or str(Path(__file__).parent / "results" / "suite-cpu")
    wall, cpu = sum(r[1] for r in _ROWS), sum(r[2] for r in _ROWS)
    cores = os.cpu_count() or 1
    selected = session.config.option.markexpr  # -m "not ray": a tier of the suite
    threads = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ)
    command = threads + "python -m pytest -q -p benchmarks.suite_cpu" + (f' -m "{selected}"' if selected else "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=session.config.rootpath, capture_output=True,
                            text=True).stdout.strip()
    facts = {"machine": f"{platform.machine()}, {cores} CPUs", "date": time.strftime("%Y-%m-%d"), "commit": commit,
             "tests": len(_ROWS), "wall_s": wall, "cpu_s": cpu, "stolen_s": stolen_s() - _STOLEN_AT_START,
             "command": command}
    processes = _processes()
    record = {"facts": facts, "tests": _ROWS, "processes": processes}
    Path(f"{out}.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# Where the suite's time goes ({facts['date']})", "",
             f"`{facts['command']}` at {commit or 'an unknown commit'} on {facts['machine']}: {len(_ROWS)} tests, {wall:.0f} s, "
             f"{cpu:,.0f} CPU-seconds (the cores {100 * cpu / max(wall, 1e-9) / cores:.0f} % busy; "
             f"{facts['stolen_s']:.0f} CPU-seconds stolen by the hypervisor). Per test, its fixtures "
             "included where they are built; the 20 longest:", "",
             "| test | wall | CPU | cores busy |", "|---|---:|---:|---:|"]
    lines += [f"| `{name}` | {w:.1f} s | {c:.1f} s | {100 * c / max(w, 1e-9) / cores:.0f} % |"
              for name, w, c in sorted(_ROWS, key=lambda r: -r[1])[:20]]
    rest = sorted(_ROWS, key=lambda r: -r[1])[20:]
    lines.append(f"| the other {len(rest)} | {sum(r[1] for r in rest):.1f} s | {sum(r[2] for r in rest):.1f} s | |")
    lines += ["", "## By process", "", *table(processes), "",
              "`ray::Name`: Ray's actors and task workers of that class; \"the run's own process\": pytest, with the "
              "tests in it and the Ray driver of those that use the suite's Ray."]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
