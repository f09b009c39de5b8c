"""Teacher search, an equal grid per method, selection on validation, 3 seeds on test: in one pool.

The many-core / GPU counterpart of ``teacher.py`` + ``tune_methods.py`` + ``methods.py`` (which run
one job at a time and tune with Ray Tune): here every run is a job in a process pool, so a machine
with a GPU and 16 cores does the whole comparison in minutes, and nothing beyond ``dard/`` (no Ray,
no MLflow) is needed.

1. Teachers: each candidate recipe in ``TEACHERS`` is trained and evaluated (test: natural,
   PGD-20, CW-20, AutoAttack on the whole split); the one with the best *validation* robust
   accuracy (PGD-10 and CW-10) is the teacher. Shards (DPGD views + soft labels) from it.
2. Grid: every method gets the same budget, ``len(LRS) x 2`` configurations (lr x one knob of its
   own, ``GRID``) at seed 0, each 40 epochs, onecycle lr. SAT and TRADES need no teacher: they
   train online (fresh augmentation each epoch, as a user trains them) while the teachers train.
3. Selection: per method, the configuration with the best validation robust accuracy; seeds 1
   and 2 of it, and DARD ablations (``ABLATIONS``) on DARD's selected point over 3 seeds.

Every run is evaluated on the test split (AutoAttack standard on all of it). Writes, to ``--out``:
``grid-<dataset>.md`` (tables, selection, acceptance line), ``grid-<dataset>.json`` (every run),
``grid-<dataset>-frontier.png`` (natural vs AutoAttack, every run) and the chosen teacher's model file.

    python benchmarks/method_grid.py --jobs 15 --budget-s 560          # GPU machine
    python benchmarks/method_grid.py --quick --jobs 2                  # smoke run on a laptop
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dard.config import deep_merge  # noqa: E402

# name -> overrides of the dataset's teacher recipe (TRADES, onecycle, batch 64, wd 5e-4)
TEACHERS = {
    "large trades lr0.1 40ep": {"optim": {"lr": 0.1, "epochs": 40}},  # TEACHER_DEFAULTS today
    "large trades lr0.1 80ep": {"optim": {"lr": 0.1, "epochs": 80}},
    "large trades lr0.05 80ep": {"optim": {"lr": 0.05, "epochs": 80}},
    "large trades lr0.2 80ep": {"optim": {"lr": 0.2, "epochs": 80}},
    "large trades beta3 lr0.1 80ep": {"optim": {"lr": 0.1, "epochs": 80}, "loss": {"trades_beta": 3.0}},
    "large trades beta10 lr0.1 80ep": {"optim": {"lr": 0.1, "epochs": 80}, "loss": {"trades_beta": 10.0}},
    "large sat lr0.1 80ep": {"optim": {"lr": 0.1, "epochs": 80}, "loss": {"method": "sat"}},
    # cheaper SAT teachers, for a demo that trains its own on a laptop
    "large sat lr0.1 40ep": {"optim": {"lr": 0.1, "epochs": 40}, "loss": {"method": "sat"}},
    "medium sat lr0.1 80ep": {"optim": {"lr": 0.1, "epochs": 80}, "loss": {"method": "sat"}, "model": {"arch": "cnn_medium"}},
    "medium sat lr0.1 40ep": {"optim": {"lr": 0.1, "epochs": 40}, "loss": {"method": "sat"}, "model": {"arch": "cnn_medium"}},
}
LRS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
# DARD's online robustness term on a TRADES backbone (rob_target self: CE(S(x)) + beta KL) or a SAT
# one (rob_target label: CE(S(x_s), y)), plus the teacher's soft labels on its DPGD views (w_adv).
DARD_TRADES = {"method": "dard", "rob_target": "self", "w_rob": 1.0, "w_ce": 1.0, "w_adv": 1.0, "w_nat": 0.0,
               "trades_beta": 6.0}
DARD_SAT = {"method": "dard", "rob_target": "label", "w_rob": 1.0, "w_ce": 0.0, "w_adv": 1.0, "w_nat": 0.0}
# method -> (knob label, its two settings); every method: LRS x these = 10 configurations
GRID = {
    "SAT": ("schedule", [{"loss": {"method": "sat"}, "optim": {"lr_schedule": "onecycle"}},
                         {"loss": {"method": "sat"}, "optim": {"lr_schedule": "cosine"}}]),
    "TRADES": ("beta", [{"loss": {"method": "trades", "trades_beta": 3.0}},
                        {"loss": {"method": "trades", "trades_beta": 6.0}}]),
    "ARD": ("tau/alpha", [{"loss": {"method": "ard", "ard_temperature": 4.0, "ard_alpha": 0.9}},
                          {"loss": {"method": "ard", "ard_temperature": 30.0, "ard_alpha": 1.0}}]),
    "RSLAD": ("schedule", [{"loss": {"method": "rslad"}, "optim": {"lr_schedule": "onecycle"}},
                           {"loss": {"method": "rslad"}, "optim": {"lr_schedule": "cosine"}}]),
    "DARD": ("backbone", [{"loss": DARD_TRADES}, {"loss": DARD_SAT}]),
}
ONLINE = {"SAT", "TRADES"}  # need no teacher: train from memory while the teachers train
# name -> overrides on DARD's selected configuration ("shards": which DPGD step schedule made the views)
ABLATIONS = {
    "DARD w_adv 0 (its backbone alone, from the same shards)": {"loss": {"w_adv": 0.0}},
    "DARD w_adv 0.5": {"loss": {"w_adv": 0.5}},
    "DARD w_adv 2": {"loss": {"w_adv": 2.0}},
    "DARD + w_nat 1/6": {"loss": {"w_nat": 1 / 6}},
    "DARD views DPGD cosine": {"attack": {"dpgd_schedule": "cosine"}},
}
REPORTED = ("natural", "pgd20", "cw20", "autoattack")
JOB_KEYS = ("dataset", "aa_limit", "kind", "name", "config", "seed", "raw", "phase", "deadline", "knob", "shards", "teacher")


class OutOfTime(Exception):
    pass


# ---------------------------------------------------------------- jobs (run in pool processes)

def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    logging.disable(logging.CRITICAL)


def _evaluate(model_path: str, cfg, aa_limit, seed: int, sanity: bool, limit: int | None = None) -> tuple[dict, list]:
    from dard.attacks.registry import PROTOCOL
    from dard.data import load_splits, to_float
    from dard.engine import resolve_device
    from dard.evaluate import EvalSettings, evaluate_model
    from dard.models import load_model

    model, _ = load_model(model_path)
    model = model.to(resolve_device(cfg.run.device))
    splits = load_splits(cfg.data)
    settings = EvalSettings.for_config(cfg, attacks=REPORTED if not sanity else PROTOCOL, limit=limit,
                                       autoattack_limit=aa_limit, eps_curve=False, sanity_checks=sanity, seed=seed)
    report = evaluate_model(model, to_float(splits.test.images), splits.test.labels, settings, progress=False)
    return report.accuracy, [c.__dict__ for c in report.checks]


def run_job(job: dict) -> dict:
    """Train one model (teacher or student) and evaluate it on the test split; never raises."""
    from dard.config import Config, teacher_config
    from dard.training import fit

    started = time.time()
    try:
        def stop_if_late(epoch: int, metrics: dict) -> None:
            if time.time() > job["deadline"]:
                raise OutOfTime(f"out of time at epoch {epoch + 1}")

        if job["kind"] == "teacher":
            cfg = teacher_config(job["dataset"], **job["raw"])
            result = fit(cfg, on_epoch_end=stop_if_late)
        else:
            cfg = Config.for_dataset(job["dataset"], **job["raw"])
            result = fit(cfg, shards=job.get("shards"), teacher_path=job.get("teacher"), on_epoch_end=stop_if_late)
        history = [json.loads(line) for line in Path(cfg.run.out_dir, "history.jsonl").read_text().splitlines()]
        train_s = time.time() - started
        accuracy, checks = _evaluate(result["model_path"], cfg, job["aa_limit"], cfg.run.seed, job.get("sanity", False),
                                     job.get("test_limit"))
        return {**job, "ok": True, "accuracy": accuracy, "checks": checks, "model_path": result["model_path"],
                "val": {k: v for k, v in history[-1].items() if k.startswith("val_")},
                "train_seconds": round(train_s, 1), "train_step_seconds": round(sum(h["train_seconds"] for h in history), 1),
                "eval_seconds": round(time.time() - started - train_s, 1)}
    except OutOfTime as err:
        return {**job, "ok": False, "error": str(err), "seconds": round(time.time() - started, 1)}
    except Exception as err:  # reported in the results, the pool goes on
        return {**job, "ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:],
                "seconds": round(time.time() - started, 1)}


def precompute_job(job: dict) -> dict:
    from cluster.precompute import precompute
    from dard.config import Config

    started = time.time()
    try:
        cfg = Config.for_dataset(job["dataset"], **job["raw"])
        precompute(cfg, job["teacher"], job["out"], views=job["views"], rows_per_part=4096, use_ray=False)
        return {**job, "ok": True, "seconds": round(time.time() - started, 1)}
    except Exception as err:
        return {**job, "ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}


# ---------------------------------------------------------------- the driver

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="processes in the pool")
    p.add_argument("--budget-s", type=float, default=3600, help="wall-clock budget; late runs stop, results are kept")
    p.add_argument("--epochs", type=int, default=40, help="student epochs")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3, help="seeds of each selected configuration (0 is the grid's)")
    p.add_argument("--aa-limit", type=int, default=None, help="AutoAttack on the first N test samples (default: all)")
    p.add_argument("--teachers", help="comma list of TEACHERS names to train (default: all; none with --teacher)")
    p.add_argument("--teacher", help="distil from this model file instead of the best trained teacher")
    p.add_argument("--teacher-name", help="with --teacher: its row in the teachers table")
    p.add_argument("--previous", help="an earlier grid-<dataset>.json: runs of the same settings are reused, not rerun")
    p.add_argument("--work", default=str(REPO / "runs" / "bench-grid"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="2 teachers x 2 epochs, 1 lr, 2-epoch students, AA on 30")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.time()
    end = t0 + args.budget_s
    teachers = args.teachers.split(",") if args.teachers else [] if args.teacher else list(TEACHERS)
    lrs, teacher_epochs = LRS, None
    if args.quick:
        lrs, teachers, teacher_epochs, args.epochs, args.aa_limit = (0.1,), teachers[:2], 2, 2, 30
    work, out = Path(args.work), Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    common = {"dataset": args.dataset, "aa_limit": args.aa_limit}
    student_base = {"optim": {"epochs": args.epochs, "lr_schedule": "onecycle"}, "run": {"progress": False}}
    previous = {_key(r): r for r in json.loads(Path(args.previous).read_text()) if r["ok"]} if args.previous else {}
    runs: list[dict] = [r for r in previous.values() if r["kind"] == "teacher"]
    state = {"teacher": args.teacher, "teacher_name": args.teacher_name, "shards": {}, "selected": {}, "grid": set()}

    def student(name: str, config: str, seed: int, over: dict, phase: str, **extra) -> dict:
        raw = deep_merge(deep_merge(student_base, over), {"run": {"seed": seed, "out_dir": str(
            work / "students" / f"{name}-{config}-s{seed}".replace(" ", "_").replace("/", "_"))}})
        return {**common, "kind": "student", "name": name, "config": config, "seed": seed, "raw": raw,
                "phase": phase, "deadline": end - 30, **extra}

    def grid_jobs(names) -> list[dict]:
        jobs = []
        for lr in lrs:
            for name in names:
                label, knobs = GRID[name]
                for knob in knobs:
                    config = f"lr={lr} {label}={_knob_value(knob)}"
                    state["grid"].add((name, config))
                    extra = {} if name in ONLINE else {"shards": state["shards"]["constant"], "teacher": state["teacher"]}
                    jobs.append(student(name, config, 0, deep_merge(knob, {"optim": {"lr": lr}}), "grid", **extra))
        return jobs

    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, initializer=_init_worker)
    pending: dict[Future, dict] = {}

    def submit(fn, job):
        earlier = previous.get(_key(job))
        if earlier is not None:  # measured before with the same settings: reuse under this run's labels
            runs.append({**earlier, **{k: job[k] for k in ("name", "config", "phase") if k in job}, "reused": True})
            return
        pending[pool.submit(fn, job)] = job

    def drain(timeout: float) -> None:
        if not pending:
            return
        done, _ = wait(list(pending), timeout=max(0.1, timeout), return_when=FIRST_COMPLETED)
        for f in done:
            pending.pop(f)
            r = f.result()
            if r["kind"] == "shards":
                logging.info("shards %s: %s", r["out"], "ok %.0f s" % r["seconds"] if r["ok"] else r["error"])
                if r["ok"]:
                    state["shards"][r["schedule"]] = r["out"]
                continue
            runs.append(r)
            logging.info("%s %s %s seed %s: %s", r["kind"], r["name"], r.get("config", ""), r.get("seed", ""), _brief(r))
            write(runs, state, args, out, t0, final=False)

    # phase 1: teachers, and the grid of the methods that need none
    for name in teachers:
        raw = deep_merge(TEACHERS[name], {"run": {"out_dir": str(work / "teachers" / name.replace(" ", "_")),
                                              "progress": False}})
        if teacher_epochs:
            raw = deep_merge(raw, {"optim": {"epochs": teacher_epochs}})
        submit(run_job, {**common, "kind": "teacher", "name": name, "raw": raw, "deadline": t0 + 0.45 * args.budget_s})
    for job in grid_jobs([n for n in GRID if n in ONLINE]):
        submit(run_job, job)
    if state["teacher"] is None:
        while any(j["kind"] == "teacher" for j in pending.values()):
            drain(end - time.time())
        done_teachers = [r for r in runs if r["kind"] == "teacher" and r["ok"]]
        if not done_teachers:
            logging.error("no teacher finished")
            write(runs, state, args, out, t0, final=True)
            os._exit(1)
        best = max(done_teachers, key=lambda r: r["val"]["val_robust_acc"])
        state["teacher"], state["teacher_name"] = best["model_path"], best["name"]
        shutil.copy(best["model_path"], out / f"teacher-{args.dataset}.pt")
    logging.info("teacher: %s (%s)", state["teacher_name"], state["teacher"])

    # shards from it: the DPGD views DARD uses (constant step) and the cosine-step ablation
    student_raw = _config_dict(args.dataset, student_base)
    for schedule in ("constant", "cosine"):
        directory = str(work / f"shards-{schedule}")
        submit(precompute_job, {**common, "kind": "shards", "raw": deep_merge(student_raw, {"attack": {"dpgd_schedule": schedule}}),
                                "teacher": state["teacher"], "out": directory, "views": args.views, "schedule": schedule})
    while "constant" not in state["shards"] and any(j["kind"] == "shards" for j in pending.values()):
        drain(end - time.time())
    if "constant" not in state["shards"]:
        logging.error("shards failed")
        write(runs, state, args, out, t0, final=True)
        os._exit(1)
    for job in grid_jobs([n for n in GRID if n not in ONLINE]):
        submit(run_job, job)

    # phase 2 -> 3: once the grid is done (or 65 % of the budget is gone), select and add seeds 1, 2
    cutoff = t0 + 0.65 * args.budget_s
    while any(j.get("phase") == "grid" for j in pending.values()) and time.time() < cutoff:
        drain(min(cutoff, end) - time.time())
    for f, j in list(pending.items()):
        if j.get("phase") == "grid" and f.cancel():
            pending.pop(f)
    while "cosine" not in state["shards"] and any(j["kind"] == "shards" for j in pending.values()):
        drain(end - time.time())
    for name in GRID:
        sel = _select(runs, name, state["grid"])
        if sel is None:
            continue
        state["selected"][name] = sel
        done = next(r for r in runs if r.get("name") == name and r.get("config") == sel and r["kind"] == "student")
        template = {k: done[k] for k in JOB_KEYS if k in done}
        if name not in ONLINE:
            template.update(shards=state["shards"]["constant"], teacher=state["teacher"])
        for seed in range(1, args.seeds):
            submit(run_job, {**template, "seed": seed, "phase": "final", "sanity": seed == 1, "deadline": end - 30,
                             "raw": deep_merge(template["raw"], {"run": {
                                 "seed": seed, "out_dir": template["raw"]["run"]["out_dir"][:-3] + f"-s{seed}"}})})
        if name == "DARD":
            for ab, over in ABLATIONS.items():
                shards = state["shards"].get(over.get("attack", {}).get("dpgd_schedule", "constant"))
                if shards is None:
                    continue
                for seed in (0, 1, 2):
                    raw = deep_merge(deep_merge(template["raw"], over), {"run": {
                        "seed": seed, "out_dir": str(work / "ablations" / f"{ab}-s{seed}".replace(" ", "_").replace("/", "_"))}})
                    submit(run_job, {**template, "name": ab, "config": sel, "seed": seed, "phase": "ablation",
                                     "raw": raw, "shards": shards, "deadline": end - 30})
    while pending and time.time() < end - 20:
        drain(end - 20 - time.time())
    write(runs, state, args, out, t0, final=True)
    pool.shutdown(wait=False, cancel_futures=True)
    for child in mp.active_children():
        child.kill()
    return 0


def _key(job: dict) -> str:
    """What makes two runs the same measurement: kind, name, seed and every setting but the output folder."""
    settings = {k: v for k, v in job["raw"].items() if k != "run"}
    return json.dumps([job["kind"], job["name"] if job["kind"] == "teacher" else None, job.get("seed"),
                       settings], sort_keys=True)


def _config_dict(dataset: str, over: dict) -> dict:
    from dard.config import Config

    return deep_merge(Config.for_dataset(dataset).to_dict(), over)


def _knob_value(knob: dict) -> str:
    loss = knob.get("loss", {})
    if "rob_target" in loss:  # DARD's backbone
        return {"self": f"trades(beta {loss.get('trades_beta', 6.0):g})", "label": "sat"}[loss["rob_target"]]
    leaves = [v for section in knob.values() for k, v in section.items() if k != "method"]
    return "/".join(str(v) for v in leaves)


def _select(runs: list[dict], name: str, grid: set) -> str | None:
    """The grid configuration of ``name`` with the best validation robust accuracy (seed 0)."""
    scores = {r["config"]: r["val"]["val_robust_acc"] for r in runs if r["kind"] == "student" and r["ok"]
              and r["name"] == name and r.get("phase") == "grid" and (name, r["config"]) in grid}
    return max(scores, key=scores.get) if scores else None


def _brief(r: dict) -> str:
    if not r["ok"]:
        return "FAILED " + r["error"]
    return (", ".join(f"{k} {100 * r['accuracy'][k]:.1f}" for k in REPORTED if k in r["accuracy"])
            + f" | val robust {100 * r['val']['val_robust_acc']:.1f} | {r['train_seconds']:.0f}+{r['eval_seconds']:.0f} s")


def _stats(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def write(runs: list[dict], state: dict, args, out: Path, t0: float, final: bool) -> None:
    import torch

    ds = args.dataset
    ok = [r for r in runs if r["ok"]]
    lines = [f"# Methods on {ds}, equal grid per method, selected on validation: test split, accuracy %", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall time {(time.time() - t0) / 60:.1f} min"
             f"{'' if final else ' (in progress)'}",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, "
             f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}, "
             f"{args.jobs} jobs in parallel; torch {torch.__version__}",
             f"- command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`",
             f"- students cnn_small, {args.epochs} epochs, batch 64, onecycle lr, eps 0.2; AutoAttack standard on "
             f"{'the first ' + str(args.aa_limit) if args.aa_limit else 'all'} test samples; grid per method: lr "
             f"{', '.join(map(str, LRS))} x 2 settings of its own knob, seed 0; selection: best "
             f"val_robust_acc (PGD-10 and CW-10 on the validation split); then seeds 1 to {args.seeds - 1} of the selected", "",
             "## Teachers (trained and evaluated here; the one with the best validation robust accuracy is used)", "",
             "| teacher | epochs | train s | val robust | " + " | ".join(REPORTED) + " |", "|---|---|---|---|" + "---|" * len(REPORTED)]
    for r in [r for r in ok if r["kind"] == "teacher"]:
        mark = " **(used)**" if r["name"] == state.get("teacher_name") else ""
        lines.append(f"| {r['name']}{mark} | {r['raw']['optim']['epochs']} | {r['train_step_seconds']:.0f} | "
                     f"{100 * r['val']['val_robust_acc']:.1f} | " + " | ".join(f"{100 * r['accuracy'][a]:.1f}" for a in REPORTED) + " |")
    lines += ["", f"## Selected configuration per method: {args.seeds} seeds on test (ablations: 3)", "",
              "| method | selected (val) | val robust | n | " + " | ".join(REPORTED) + " |", "|---|---|---|---|" + "---|" * len(REPORTED)]
    summary = {}
    for name, sel in state.get("selected", {}).items():
        rows = [r for r in ok if r["kind"] == "student" and r["name"] == name and r["config"] == sel and r["phase"] != "ablation"]
        vals = [r["val"]["val_robust_acc"] for r in rows if r["phase"] == "grid"]
        summary[name] = {a: [r["accuracy"][a] for r in rows] for a in REPORTED}
        lines.append(f"| {name} | {sel} | {_stats(vals)} | {len(rows)} | "
                     + " | ".join(_stats(summary[name][a]) for a in REPORTED) + " |")
    for ab in ABLATIONS:
        rows = [r for r in ok if r["name"] == ab]
        if rows:
            summary[ab] = {a: [r["accuracy"][a] for r in rows] for a in REPORTED}
            lines.append(f"| {ab} | DARD's | – | {len(rows)} | " + " | ".join(_stats(summary[ab][a]) for a in REPORTED) + " |")
    if "DARD" in summary:
        aa = {k: v["autoattack"] for k, v in summary.items() if k in GRID and len(v["autoattack"]) > 1}
        base = [k for k in aa if k != "DARD"]
        if "DARD" in aa and base:
            top = max(base, key=lambda k: statistics.mean(aa[k]))
            need = statistics.mean(aa[top]) + statistics.stdev(aa[top])
            nat_gap = statistics.mean(summary["DARD"]["natural"]) - statistics.mean(summary[top]["natural"])
            win = statistics.mean(aa["DARD"]) >= need and nat_gap >= -0.01
            lines += ["", f"Acceptance (#14): DARD AutoAttack {100 * statistics.mean(aa['DARD']):.1f} vs best baseline "
                          f"{top} {100 * statistics.mean(aa[top]):.1f} + 1 std = {100 * need:.1f}; natural gap "
                          f"{100 * nat_gap:+.1f} points: {'MET' if win else 'NOT met'}"]
    lines += ["", "## Every grid run (test accuracy; val = validation robust accuracy that selection used)", "",
              "| method | config | seed | val robust | " + " | ".join(REPORTED) + " | train s |",
              "|---|---|---|---|" + "---|" * len(REPORTED) + "---|"]
    for r in sorted([r for r in ok if r["kind"] == "student"], key=lambda r: (r["name"], r["config"], r["seed"])):
        lines.append(f"| {r['name']} | {r['config']} | {r['seed']} | {100 * r['val']['val_robust_acc']:.1f} | "
                     + " | ".join(f"{100 * r['accuracy'][a]:.1f}" for a in REPORTED) + f" | {r['train_seconds']:.0f} |")
    failed = [r for r in runs if not r["ok"]]
    checks = sorted({(r["name"], c["name"]) for r in ok for c in r.get("checks", []) if not c["passed"]})
    lines += ["", f"Runs: {len(ok)} finished, {len(failed)} stopped or failed"
              + "".join(f"\n- {r['kind']} {r['name']} {r.get('config', '')} s{r.get('seed', '')}: {r['error']}" for r in failed),
              "", "Sanity checks (seed 1 of each selected configuration): "
              + ("all passed" if not checks else "FAILED: " + ", ".join(f"{n}: {c}" for n, c in checks))]
    (out / f"grid-{ds}.md").write_text("\n".join(lines) + "\n")
    (out / f"grid-{ds}.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "deadline"} for r in runs], indent=1))
    if final:
        from benchmarks.plots import scatter

        groups = {}
        for name in list(GRID) + list(ABLATIONS):
            rows = [r for r in ok if r["kind"] == "student" and r["name"] == name]
            if rows:
                groups[name] = ([100 * r["accuracy"]["natural"] for r in rows],
                                [100 * r["accuracy"]["autoattack"] for r in rows], [], [])
        scatter(out / f"grid-{ds}-frontier.png", groups, xlabel="test natural accuracy %",
                ylabel="test AutoAttack accuracy %", title="every student run (grid, selected seeds, ablations)")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
