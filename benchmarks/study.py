"""One controlled study: arms x student widths x one varied setting, lr chosen on validation, seeds on test.

The protocol of ``method_grid.py`` (equal lr grid per arm at seed 0, selection by validation
robust accuracy, more seeds of the selected point, AutoAttack on the whole test split), over
the dimensions a question needs, in a process pool without Ray or MLflow:

- ``--arms``: training recipes from ``ARMS`` (students: SAT, TRADES, DARD on a SAT or a TRADES
  backbone, ARD, RSLAD; teachers: ``T-...``);
- ``--widths``: ``model.kwargs.width`` of the cnn_* students (capacity);
- ``--vary section.key=v1,v2``: one setting with several values (``data.crop_padding=0,1``);
- ``--set section.key=v``: fixed overrides for every run.

Each (arm, width, varied value) gets every lr of ``--lrs`` at seed 0; the best on validation
then runs seeds 1..``--seeds``-1. Distillation arms read shards of ``--teacher`` made once per
varied value (shards pin the augmentation and attack they were made with). The teacher itself is
evaluated with the same attacks, for the headroom line. Writes ``<out>/<name>.md``, ``.json``
and, with more than one width, ``<name>.png`` (AutoAttack vs student parameters).

    python benchmarks/study.py --name augment-digits --arms SAT,TRADES --vary data.crop_padding=0,1 \\
        --lrs 0.05,0.2 --seeds 3
    python benchmarks/study.py --name capacity-digits --arms SAT,TRADES,DARD-SAT,DARD-TRADES \\
        --widths 0.25,0.5,1 --lrs 0.1,0.2,0.4,0.8 --seeds 3 --teacher teacher.pt
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.method_grid import DARD_SAT, DARD_TRADES, REPORTED, _init_worker, _stats, run_job  # noqa: E402
from dard.config import deep_merge  # noqa: E402

# name -> (kind, overrides of the dataset's student defaults, or of its teacher recipe for teachers)
ARMS = {
    "SAT": ("student", {"loss": {"method": "sat"}}),
    "TRADES": ("student", {"loss": {"method": "trades", "trades_beta": 6.0}}),
    "DARD-SAT": ("student", {"loss": DARD_SAT}),
    "DARD-TRADES": ("student", {"loss": DARD_TRADES}),
    "ARD": ("student", {"loss": {"method": "ard", "ard_temperature": 30.0, "ard_alpha": 1.0}}),
    "RSLAD": ("student", {"loss": {"method": "rslad"}}),
    "T-large-SAT": ("teacher", {"model": {"arch": "cnn_large"}, "loss": {"method": "sat"}}),
    "T-large-TRADES": ("teacher", {"model": {"arch": "cnn_large"}, "loss": {"method": "trades", "trades_beta": 6.0}}),
    "T-medium-SAT": ("teacher", {"model": {"arch": "cnn_medium"}, "loss": {"method": "sat"}}),
    "T-small-SAT": ("teacher", {"model": {"arch": "cnn_small"}, "loss": {"method": "sat"}}),
    "T-resnet18-SAT": ("teacher", {"model": {"arch": "resnet18"}, "loss": {"method": "sat"}}),
}
NEEDS_SHARDS = {"DARD-SAT", "DARD-TRADES", "ARD", "RSLAD"}


def parse_assign(text: str) -> tuple[list[str], list]:
    """``section.key=v1,v2`` -> (["section", "key"], [v1, v2]) with YAML-typed values."""
    key, _, values = text.partition("=")
    if not values or key.count(".") != 1:
        raise SystemExit(f"expected section.key=value[,value...], got {text!r}")
    return key.split("."), [yaml.safe_load(v) for v in values.split(",")]


def nested(path: list[str], value) -> dict:
    return {path[0]: {path[1]: value}}


def shards_job(job: dict) -> dict:
    from dard.config import Config
    from dard.precompute import build_shards

    started = time.time()
    cfg = Config.for_dataset(job["dataset"], **job["raw"])
    build_shards(cfg, job["teacher"], job["out"], views=job["views"], rows_per_part=4096)
    return {**job, "ok": True, "seconds": round(time.time() - started, 1)}


def teacher_eval_job(job: dict) -> dict:
    from benchmarks.method_grid import _evaluate
    from dard.config import Config
    from dard.models import load_model

    cfg = Config.for_dataset(job["dataset"], **job["raw"])
    _, header = load_model(job["teacher"])
    accuracy, _ = _evaluate(job["teacher"], cfg, job["aa_limit"], 0, False, job["test_limit"])
    return {**job, "ok": True, "accuracy": accuracy, "arch": header["arch"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="results file stem, e.g. capacity-digits")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--arms", required=True, help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--widths", default="1", help="model.kwargs.width values (cnn_* only)")
    p.add_argument("--lrs", default="0.05,0.1,0.2,0.4,0.8", help="the lr grid at seed 0")
    p.add_argument("--vary", help="section.key=v1,v2: one setting varied as a dimension of the study")
    p.add_argument("--set", action="append", default=[], help="section.key=value for every run (repeat)")
    p.add_argument("--epochs", type=int, help="default: the dataset's (students) / its teacher recipe's")
    p.add_argument("--seeds", type=int, default=3, help="seeds of each selected point (0 is the grid's)")
    p.add_argument("--teacher", help="model file the distillation arms learn from (and the headroom line)")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--aa-limit", type=int, help="AutoAttack on the first N test samples (default: all)")
    p.add_argument("--test-limit", type=int, help="the other attacks on the first N test samples (default: all)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--work", default=str(REPO / "runs" / "bench-study"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown or (NEEDS_SHARDS & set(arms) and not args.teacher):
        raise SystemExit(f"unknown arms {unknown}" if unknown else "distillation arms need --teacher FILE")
    widths = [float(w) for w in args.widths.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    vary_key, vary_values = parse_assign(args.vary) if args.vary else (None, [None])
    fixed: dict = {}
    for text in args.set:
        key, values = parse_assign(text)
        fixed = deep_merge(fixed, nested(key, values[0]))
    if args.epochs:
        fixed = deep_merge(fixed, {"optim": {"epochs": args.epochs}})
    t0 = time.time()
    work, out = Path(args.work) / args.name, Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker)
    pending: dict = {}
    runs: list[dict] = []
    shards: dict = {}
    teacher_row: dict = {}

    def point_raw(arm: str, width: float, value) -> dict:
        raw = deep_merge(ARMS[arm][1], fixed)
        if ARMS[arm][0] == "student":
            raw = deep_merge(raw, {"model": {"kwargs": {"width": width}}})
        return deep_merge(raw, nested(vary_key, value)) if vary_key else raw

    def submit(arm: str, width: float, value, lr: float, seed: int, phase: str) -> None:
        label = f"{arm} w{width:g} {vary_key[1] + '=' + str(value) if vary_key else ''} lr{lr:g} s{seed}"
        raw = deep_merge(point_raw(arm, width, value), {"optim": {"lr": lr}, "run": {
            "seed": seed, "progress": False, "out_dir": str(work / label.replace(" ", "_").replace("=", ""))}})
        job = {"dataset": args.dataset, "aa_limit": args.aa_limit, "test_limit": args.test_limit, "kind": ARMS[arm][0],
               "name": arm, "raw": raw, "seed": seed, "phase": phase, "deadline": t0 + 10 * 86400,
               "point": [arm, width, value], "lr": lr}
        if arm in NEEDS_SHARDS:
            job.update(shards=shards[json.dumps(value)], teacher=args.teacher)
        pending[pool.submit(run_job, job)] = job

    def drain() -> None:
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for f in done:
            job = pending.pop(f)
            r = f.result()
            if job["kind"] == "shards":
                shards[json.dumps(job["value"])] = job["out"]
            elif job["kind"] == "teacher-eval":
                teacher_row.update(r)
            else:
                runs.append(r)
                print(f"[{(time.time() - t0) / 60:5.1f} min] {r['name']} {r['point'][1:]} lr {r['lr']:g} seed {r['seed']}: "
                      + (", ".join(f"{a} {100 * r['accuracy'][a]:.1f}" for a in REPORTED)
                         + f" | val {100 * r['val']['val_robust_acc']:.1f} | {r['train_seconds']:.0f}+{r['eval_seconds']:.0f} s"
                         if r["ok"] else "FAILED " + r["error"]), flush=True)
                write(args, runs, teacher_row, vary_key, t0, out, final=False)

    if args.teacher:
        base = deep_merge(fixed, nested(vary_key, vary_values[0])) if vary_key else fixed
        job = {"kind": "teacher-eval", "dataset": args.dataset, "raw": base, "teacher": args.teacher,
               "aa_limit": args.aa_limit, "test_limit": args.test_limit}
        pending[pool.submit(teacher_eval_job, job)] = job
        if NEEDS_SHARDS & set(arms):
            for value in vary_values:
                raw = deep_merge(fixed, nested(vary_key, value)) if vary_key else fixed
                job = {"kind": "shards", "dataset": args.dataset, "raw": raw, "teacher": args.teacher, "views": args.views,
                       "out": str(work / f"shards-{value}"), "value": value}
                pending[pool.submit(shards_job, job)] = job
            while len(shards) < len(vary_values):
                drain()
    points = [(a, w if ARMS[a][0] == "student" else 1.0, v) for a in arms for w in widths for v in vary_values]
    points = list(dict.fromkeys(points))
    for arm, width, value in points:
        for lr in lrs:
            submit(arm, width, value, lr, 0, "grid")
    while any(j.get("phase") == "grid" for j in pending.values()):
        drain()
    for arm, width, value in points:
        grid = [r for r in runs if r["ok"] and r["point"] == [arm, width, value] and r["phase"] == "grid"]
        if grid:
            best = max(grid, key=lambda r: r["val"]["val_robust_acc"])
            best["selected"] = True
            for seed in range(1, args.seeds):
                submit(arm, width, value, best["lr"], seed, "seeds")
    while pending:
        drain()
    write(args, runs, teacher_row, vary_key, t0, out, final=True)
    pool.shutdown()
    return 0


def write(args, runs: list[dict], teacher: dict, vary_key, t0: float, out: Path, final: bool) -> None:
    import torch

    from dard.config import Config, teacher_config
    from dard.models import build_for, count_parameters

    ok = [r for r in runs if r["ok"]]
    selected = {json.dumps(r["point"]): r["lr"] for r in ok if r.get("selected")}
    vary = f" x {'.'.join(vary_key)}" if vary_key else ""
    lines = [f"# {args.name}: arms x widths{vary}, lr selected on validation, seeds on test (accuracy %)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall time {(time.time() - t0) / 60:.1f} min"
             f"{'' if final else ' (in progress)'}",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, "
             f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}, "
             f"{args.jobs} jobs in parallel (1 torch thread each); torch {torch.__version__}",
             f"- command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`",
             f"- lr grid {args.lrs} at seed 0, the best by validation robust accuracy (PGD-10 and CW-10 on the "
             f"validation split) then seeds 1..{args.seeds - 1}; test: natural, PGD-20, CW-20 on "
             f"{'the first ' + str(args.test_limit) if args.test_limit else 'all'} test samples, AutoAttack standard on "
             f"{'the first ' + str(args.aa_limit) if args.aa_limit else 'all'}", ""]
    if teacher:
        lines += [f"Teacher `{args.teacher}` ({teacher['arch']}): " + ", ".join(
            f"{a} {100 * teacher['accuracy'][a]:.1f}" for a in REPORTED), ""]
    head = "| arm | width | params |" + (f" {vary_key[1]} |" if vary_key else "")
    lines += ["## Selected points (mean ± std over seeds)", "",
              head + " lr | val robust | n | " + " | ".join(REPORTED) + " |",
              "|---|---|---|" + ("---|" if vary_key else "") + "---|---|---|" + "---|" * len(REPORTED)]
    summary = []
    for key, lr in selected.items():
        arm, width, value = json.loads(key)
        rows = [r for r in ok if r["point"] == [arm, width, value] and r["lr"] == lr]
        # the run's own config (a teacher's starts from the teacher recipe, as run_job builds it)
        cfg = (teacher_config if ARMS[arm][0] == "teacher" else Config.for_dataset)(args.dataset, **rows[0]["raw"])
        params = count_parameters(build_for(cfg.model, cfg.data))
        val = [r["val"]["val_robust_acc"] for r in rows if r["phase"] == "grid"]
        acc = {a: [r["accuracy"][a] for r in rows] for a in REPORTED}
        summary.append({"arm": arm, "width": width, "value": value, "lr": lr, "params": params, "n": len(rows),
                        "accuracy": acc})
        lines.append(f"| {arm} | {width:g} | {params:,} |" + (f" {value} |" if vary_key else "") + f" {lr:g} | "
                     f"{_stats(val)} | {len(rows)} | " + " | ".join(_stats(acc[a]) for a in REPORTED) + " |")
    lines += ["", "## Every run", "", "| arm | width |" + (f" {vary_key[1]} |" if vary_key else "")
              + " lr | seed | val robust | " + " | ".join(REPORTED) + " | train s |",
              "|---|---|" + ("---|" if vary_key else "") + "---|---|---|" + "---|" * len(REPORTED) + "---|"]
    for r in sorted(ok, key=lambda r: (r["point"][0], r["point"][1], str(r["point"][2]), r["lr"], r["seed"])):
        lines.append(f"| {r['name']} | {r['point'][1]:g} |" + (f" {r['point'][2]} |" if vary_key else "")
                     + f" {r['lr']:g} | {r['seed']} | {100 * r['val']['val_robust_acc']:.1f} | "
                     + " | ".join(f"{100 * r['accuracy'][a]:.1f}" for a in REPORTED) + f" | {r['train_seconds']:.0f} |")
    if len(ok) > 2:  # does validation rank runs as the test split's AutoAttack does?
        rho = spearman([r["val"]["val_robust_acc"] for r in ok], [r["accuracy"]["autoattack"] for r in ok])
        lines += ["", f"Validation check: Spearman rank correlation between validation robust accuracy and test "
                      f"AutoAttack accuracy over the {len(ok)} runs: {rho:.2f}"]
    failed = [r for r in runs if not r["ok"]]
    lines += ["", f"Runs: {len(ok)} finished, {len(failed)} failed"
              + "".join(f"\n- {r['name']} {r['point']} lr {r['lr']} s{r['seed']}: {r['error']}" for r in failed)]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps({"summary": summary, "teacher": {k: v for k, v in teacher.items()
                                                       if k not in ("deadline",)}, "runs": [
        {k: v for k, v in r.items() if k not in ("deadline", "trace")} for r in runs]}, indent=1))
    if final and len({s["width"] for s in summary}) > 1:
        plot(out / f"{args.name}.png", summary, teacher, args.name)
    if final:
        print("\n".join(lines), flush=True)


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (ties get their mean rank); nan when either side is constant."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return statistics.correlation(ranks(a), ranks(b))


def plot(path: Path, summary: list[dict], teacher: dict, title: str) -> None:
    """AutoAttack accuracy vs student parameters (log scale), one line per arm, mean ± std over seeds."""
    from benchmarks.plots import lines

    series = {}
    for arm in dict.fromkeys(s["arm"] for s in summary if ARMS[s["arm"]][0] == "student"):
        pts = sorted((s["params"], s["accuracy"]["autoattack"]) for s in summary if s["arm"] == arm)
        series[arm] = ([p for p, _ in pts], [100 * statistics.mean(v) for _, v in pts],
                       [100 * statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts])
    hline = (f"teacher ({teacher['arch']})", 100 * teacher["accuracy"]["autoattack"]) if teacher else None
    lines(path, series, hline=hline, xlabel="student parameters", ylabel="test AutoAttack accuracy %", title=title,
          logx=True)


if __name__ == "__main__":
    sys.exit(main())
