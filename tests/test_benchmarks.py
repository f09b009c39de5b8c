"""The GPU check must run when a GPU is lent: its tiny size on the CPU, and its FLOP counter."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import HANG_S

REPO = Path(__file__).resolve().parents[1]


def test_flop_counter_counts_an_attack_and_its_update():
    from benchmarks.gpu import _Flops

    lin = torch.nn.Linear(8, 4, bias=False)
    x = torch.rand(5, 8, requires_grad=True)
    with _Flops() as counter:
        g, = torch.autograd.grad(lin(x).sum(), x)  # the attack's input gradient: the forward and one backward mm
    assert counter.total == 2 * (2 * 5 * 8 * 4)
    with _Flops() as counter:
        lin(x.detach() + g).sum().backward()  # the update: forward, weight gradient
    assert counter.total == 2 * (2 * 5 * 8 * 4)


def test_gpu_check_tiny_on_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--device", "cpu", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "gpu.json").read_text())
    rows = {(r["arm"].split(" (")[0], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(a, m) for a in ("fp32", "bf16 + channels_last") for m in ("SAT", "DARD")}
    assert all(r["images_per_s"] > 0 and r["ms_per_step"] > 0 for r in rows.values())
    # DARD's step is SAT's plus the student's DPGD views and more passes: more FLOPs per image, same in every arm
    for arm in ("fp32", "bf16 + channels_last"):
        assert rows[arm, "DARD"]["gflops_per_image"] > rows[arm, "SAT"]["gflops_per_image"] > 0
    assert result["precompute_images_per_s"] > 0
    assert "| fp32 | SAT |" in (out / "gpu.md").read_text() and "| fp32 | SAT |" in proc.stdout


def test_process_cpu_counts_each_kind_from_its_first_look(tmp_path, monkeypatch):
    """A command's grandchild that burns half a second counts under its kind; a process that burned
    CPU before the first look counts only what it used after it, and not at all with ``new_only``."""
    from benchmarks import process_cpu
    from benchmarks.process_cpu import RAY_WORKER, kind, main, watching

    assert kind(["ray::TrainController.run"]) == "ray::TrainController" and kind([]) is None
    assert kind(["/v/bin/python", "-m", "dard.cli", "train", "--shards", "s"]) == "dard train"
    assert kind(["/v/bin/python3.11", "-u", "/v/site-packages/ray/_private/log_monitor.py", "--x"]) == "ray log monitor"
    assert kind(["/v/bin/python", "-u", "/v/site-packages/ray/_private/workers/default_worker.py"]) == RAY_WORKER
    assert kind(["/v/bin/python -c import sys; sys.path = ['/v/site-packages']"]) == "python -c"
    monkeypatch.setattr(process_cpu, "INTERVAL_S", 0.1)
    # burn, then live on past a few looks: a process counts what it had used at its last look
    burn = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < {}: pass\nprint(flush=True)\n"
    for name, seconds, then in (("before", 0.3, 30), ("burn", 0.5, 1), ("fresh", 0.1, 0.5)):
        (tmp_path / f"{name}.py").write_text(burn.format(seconds) + f"time.sleep({then})\n")
    before = subprocess.Popen([sys.executable, str(tmp_path / "before.py")], stdout=subprocess.PIPE, text=True)
    try:
        before.stdout.readline()  # its burn is over before the looks start
        outer = f"import subprocess, sys; subprocess.run([sys.executable, {str(tmp_path / 'burn.py')!r}])"
        assert main([str(tmp_path / "cpu"), "--", sys.executable, "-c", outer]) == 0
        with watching(new_only=True) as looks:
            subprocess.run([sys.executable, str(tmp_path / "fresh.py")], check=True)
        fresh = looks.result()["kinds"]
        assert "python fresh.py" in fresh and "python before.py" not in fresh, fresh
    finally:
        before.kill()
    kinds = json.loads((tmp_path / "cpu.json").read_text())["kinds"]
    assert 0.4 <= kinds["python burn.py"]["cpu_s"] <= 1.0 and kinds["python burn.py"]["processes"] == 1, kinds
    assert kinds.get("python before.py", {"cpu_s": 0})["cpu_s"] < 0.1, kinds
    assert "| `python burn.py` |" in (tmp_path / "cpu.md").read_text()
