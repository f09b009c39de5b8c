"""What an unlabeled pool buys: SAT and DARD on the labels alone, robust self-training (RST) and
DARD on labels + pool, and SAT on every label -- at one budget, lr chosen on validation, seeds on test.

The setting (issue #32): a training split of which ``--labels`` samples keep their labels
(stratified by class) and the rest is a pool whose labels are hidden; a teacher trained on the
labeled part (``--teacher``, or trained here with the dataset's teacher recipe); students of
``--width`` that all see ``--epochs`` x ``--steps`` x ``--batch`` images. Two shard folders from
that teacher: labels + pool (the pool rows carry the teacher's argmax and confidence, never a
hidden label) and every label (the ceiling's). Every arm gets the ``--lrs`` grid at seed 0 (train +
validation only); the best by validation robust accuracy (PGD-10 and CW-10) is evaluated on the
test split (natural, PGD-20, CW-20 on ``--test-limit``, AutoAttack standard on ``--aa-limit``) and
run again with seeds 1..``--seeds``-1. Writes ``<out>/<name>.md``, ``.json`` and ``.png`` (AutoAttack
vs natural accuracy, every selected run). Runs already in ``<out>/<name>.json`` with the same
settings are kept (an interrupted study continues).

    python benchmarks/pool_study.py --name pool-fashion-mnist --arms core --jobs 2
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.method_grid import REPORTED, _evaluate, _init_worker, _stats  # noqa: E402
from benchmarks.study import spearman  # noqa: E402
from dard.config import deep_merge  # noqa: E402

DARD_SAT = {"method": "dard", "rob_target": "label", "w_rob": 1.0, "w_ce": 0.0, "w_adv": 1.0, "w_nat": 0.0}
TRADES = {"method": "trades", "trades_beta": 6.0}
# name -> (which shards: pool | full, overrides). "labels" arms train on the labeled rows alone
# (pool_share 0); the pool arms draw half of every batch from pool rows (RST's 1:1).
ARMS = {
    "SAT labels": ("pool", {"loss": {"method": "sat"}, "data": {"pool_share": 0.0}}),
    "RST-SAT": ("pool", {"loss": {"method": "sat"}, "data": {"pool_share": 0.5}}),
    "DARD labels": ("pool", {"loss": DARD_SAT, "data": {"pool_share": 0.0}}),
    "DARD labels+pool": ("pool", {"loss": DARD_SAT, "data": {"pool_share": 0.5}}),
    "SAT all labels": ("full", {"loss": {"method": "sat"}}),
    "TRADES labels": ("pool", {"loss": TRADES, "data": {"pool_share": 0.0}}),
    "RST-TRADES": ("pool", {"loss": TRADES, "data": {"pool_share": 0.5}}),
    # DARD variants that might keep RST's robustness and add natural accuracy
    "DARD+pool w_adv 0.5": ("pool", {"loss": {**DARD_SAT, "w_adv": 0.5}, "data": {"pool_share": 0.5}}),
    "DARD+pool w_adv 2": ("pool", {"loss": {**DARD_SAT, "w_adv": 2.0}, "data": {"pool_share": 0.5}}),
    "DARD+pool + w_nat": ("pool", {"loss": {**DARD_SAT, "w_nat": 0.5}, "data": {"pool_share": 0.5}}),
    "DARD+pool tau 4": ("pool", {"loss": {**DARD_SAT, "temperature": 4.0}, "data": {"pool_share": 0.5}}),
    "DARD+pool conf 0.7": ("pool", {"loss": {**DARD_SAT, "pseudo_threshold": 0.7}, "data": {"pool_share": 0.5}}),
    "DARD+pool soft only": ("pool", {"loss": {**DARD_SAT, "pseudo_labels": "none"}, "data": {"pool_share": 0.5}}),
    "DARD+pool TRADES": ("pool", {"loss": {"method": "dard", "rob_target": "self", "w_rob": 1.0, "w_ce": 1.0,
                                           "w_adv": 1.0, "w_nat": 0.0, "trades_beta": 6.0},
                                  "data": {"pool_share": 0.5}}),
}
GROUPS = {"core": ["SAT labels", "RST-SAT", "DARD labels", "DARD labels+pool", "SAT all labels"],
          "trades": ["TRADES labels", "RST-TRADES"],
          "variants": ["DARD+pool w_adv 0.5", "DARD+pool w_adv 2", "DARD+pool + w_nat", "DARD+pool tau 4",
                       "DARD+pool conf 0.7", "DARD+pool soft only", "DARD+pool TRADES"]}


def train_job(job: dict) -> dict:
    """Train one student from its shards (validation every epoch); never raises."""
    from dard.config import Config
    from dard.data import resolve
    from dard.training import fit

    started = time.time()
    try:
        cfg = resolve(Config.for_dataset(job["dataset"], **job["raw"]))
        result = fit(cfg, shards=job["shards"])
        history = [json.loads(line) for line in Path(cfg.run.out_dir, "history.jsonl").read_text().splitlines()]
        best = max((h for h in history if "val_robust_acc" in h), key=lambda h: (h["val_robust_acc"], h["epoch"]))
        return {**job, "ok": True, "model_path": result["model_path"], "selected_epoch": result["selected_epoch"],
                "val": {k: v for k, v in best.items() if k.startswith("val_")},
                "train_seconds": round(time.time() - started, 1)}
    except Exception as err:  # reported in the results, the pool goes on
        return {**job, "ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}


def test_job(job: dict) -> dict:
    """The test split for a trained student (``job["run"]``)."""
    from dard.config import Config

    started = time.time()
    run = job["run"]
    try:
        cfg = Config.for_dataset(run["dataset"], **run["raw"])
        accuracy, _ = _evaluate(run["model_path"], cfg, job["aa_limit"], run["seed"], False, job["test_limit"])
        return {**run, "accuracy": accuracy, "eval_seconds": round(time.time() - started, 1)}
    except Exception as err:
        return {**run, "test_error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}


def shards_job(job: dict) -> dict:
    from dard.config import Config
    from dard.data import resolve
    from dard.precompute import build_shards

    started = time.time()
    cfg = resolve(Config.for_dataset(job["dataset"], **job["raw"]))
    build_shards(cfg, job["teacher"], job["out"], views=job["views"], rows_per_part=4096)
    return {**job, "seconds": round(time.time() - started, 1)}


def teacher_job(job: dict) -> dict:
    """The teacher: the dataset's teacher recipe on the labeled samples, then its test numbers."""
    from dard.config import teacher_config
    from dard.training import fit

    started = time.time()
    cfg = teacher_config(job["dataset"], **job["raw"])
    result = fit(cfg)
    train_s = time.time() - started
    accuracy, _ = _evaluate(result["model_path"], cfg, job["aa_limit"], 0, False, job["test_limit"])
    return {**job, "model_path": result["model_path"], "accuracy": accuracy, "train_seconds": round(train_s, 1),
            "arch": cfg.model.arch}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="pool-fashion-mnist")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--arms", default="core", help=f"comma list of arms or groups ({', '.join(GROUPS)})")
    p.add_argument("--labels", type=int, default=6000, help="training samples that keep their labels")
    p.add_argument("--width", type=float, default=0.5, help="cnn_small width of the students (0.5: 3.8k parameters)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps", type=int, default=46, help="steps per epoch (46 x 128: one pass over 6k labels)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lrs", default="0.05,0.1,0.2")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--teacher", help="teacher model file (default: train one on the labeled samples)")
    p.add_argument("--teacher-set", action="append", default=[], help="section.key=value for the teacher recipe")
    p.add_argument("--set", action="append", default=[], help="section.key=value for every student")
    p.add_argument("--aa-limit", type=int, default=1000)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 2))
    p.add_argument("--work", default=str(REPO / "runs" / "bench-pool"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    import yaml

    arms = [a for name in args.arms.split(",") for a in GROUPS.get(name, [name])]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    lrs = [float(x) for x in args.lrs.split(",")]

    def parsed(items: list[str]) -> dict:
        out: dict = {}
        for item in items:
            key, _, value = item.partition("=")
            section, field = key.split(".", 1)
            out = deep_merge(out, {section: {field: yaml.safe_load(value)}})
        return out

    t0 = time.time()
    work, out = Path(args.work) / args.name, Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    common = deep_merge({"data": {"labeled": args.labels}, "run": {"progress": False}}, parsed(args.set))
    budget = {"model": {"arch": "cnn_small", "kwargs": {"width": args.width}},
              "optim": {"epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": args.batch}}
    record_path = out / f"{args.name}.json"
    previous = json.loads(record_path.read_text()) if record_path.exists() else {}
    state = {"teacher": previous.get("teacher") or {}, "runs": [r for r in previous.get("runs", []) if r.get("ok")],
             "shards": previous.get("shards") or {}}
    pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker)
    pending: dict = {}

    def key(job: dict) -> str:
        return json.dumps([job["arm"], job["lr"], job["seed"], job["raw"]], sort_keys=True)

    done_keys = {key(r): r for r in state["runs"]}

    def save() -> None:
        record_path.write_text(json.dumps({"teacher": state["teacher"], "shards": state["shards"],
                                           "runs": [{k: v for k, v in r.items() if k != "trace"} for r in state["runs"]],
                                           "args": vars(args)}, indent=1))

    def drain() -> None:
        finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for f in finished:
            job = pending.pop(f)
            r = f.result()
            if job["kind"] == "train":
                if not r["ok"]:
                    print(f"FAILED {r['arm']} lr {r['lr']} s{r['seed']}: {r['error']}\n{r.get('trace', '')}", flush=True)
                state["runs"].append(r)
                done_keys[key(r)] = r
                print(f"[{(time.time() - t0) / 60:6.1f} min] trained {r['arm']} lr {r['lr']:g} seed {r['seed']}"
                      + (f": val robust {100 * r['val']['val_robust_acc']:.1f} natural "
                         f"{100 * r['val']['val_natural_acc']:.1f} ({r['train_seconds']:.0f} s)" if r["ok"] else ""),
                      flush=True)
            elif job["kind"] == "test":
                state["runs"] = [r if key(x) == key(r) else x for x in state["runs"]]
                done_keys[key(r)] = r
                print(f"[{(time.time() - t0) / 60:6.1f} min] tested {r['arm']} lr {r['lr']:g} seed {r['seed']}: "
                      + (", ".join(f"{a} {100 * r['accuracy'][a]:.1f}" for a in REPORTED) if "accuracy" in r
                         else "FAILED " + r.get("test_error", "")), flush=True)
            save()

    # 1. the teacher, trained on the labeled samples only
    if args.teacher:
        state["teacher"] = state["teacher"] if state["teacher"].get("model_path") == args.teacher else {
            "model_path": args.teacher}
    if not state["teacher"].get("accuracy"):
        raw = deep_merge({"data": {"labeled": args.labels}, "run": {"progress": False, "out_dir": str(work / "teacher")}},
                         parsed(args.teacher_set))
        job = {"kind": "teacher", "dataset": args.dataset, "raw": raw, "aa_limit": args.aa_limit,
               "test_limit": args.test_limit}
        if args.teacher:
            from benchmarks.method_grid import _evaluate as evaluate
            from dard.config import Config

            cfg = Config.for_dataset(args.dataset, **raw)
            state["teacher"] = {**job, "model_path": args.teacher,
                                "accuracy": evaluate(args.teacher, cfg, args.aa_limit, 0, False, args.test_limit)[0]}
        else:
            state["teacher"] = pool.submit(teacher_job, job).result()
        save()
        print(f"teacher: {state['teacher']['model_path']}: " + ", ".join(
            f"{a} {100 * state['teacher']['accuracy'][a]:.1f}" for a in REPORTED), flush=True)
    teacher = state["teacher"]["model_path"]
    # 2. shards: labels + pool, and every label
    for kind in sorted({ARMS[a][0] for a in arms}):
        if kind not in state["shards"]:
            raw = deep_merge(common, {"data": {"labeled": None}} if kind == "full" else {})
            job = {"kind": "shards", "dataset": args.dataset, "raw": raw, "teacher": teacher, "views": args.views,
                   "out": str(work / f"shards-{kind}")}
            pending[pool.submit(shards_job, job)] = job
    while pending:
        finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for f in finished:
            job = pending.pop(f)
            result = f.result()
            state["shards"][Path(job["out"]).name.split("-", 1)[1]] = {"out": job["out"], "seconds": result["seconds"]}
            save()
            print(f"shards {job['out']}: {result['seconds']:.0f} s", flush=True)

    def submit_train(arm: str, lr: float, seed: int, phase: str) -> None:
        shards, over = ARMS[arm]
        raw = deep_merge(deep_merge(deep_merge(common, budget), over), {"optim": {"lr": lr}, "run": {
            "seed": seed, "out_dir": str(work / f"{arm}-lr{lr:g}-s{seed}".replace(" ", "_").replace("+", "p"))}})
        if shards == "full":
            raw = deep_merge(raw, {"data": {"labeled": None}})
        job = {"kind": "train", "dataset": args.dataset, "arm": arm, "lr": lr, "seed": seed, "phase": phase, "raw": raw,
               "shards": state["shards"][shards]["out"]}
        if key(job) not in done_keys:
            pending[pool.submit(train_job, job)] = job

    def submit_test(run: dict) -> None:
        if "accuracy" not in run:
            job = {"kind": "test", "run": run, "aa_limit": args.aa_limit, "test_limit": args.test_limit}
            pending[pool.submit(test_job, job)] = job

    # 3. the lr grid at seed 0, selection on validation, the selected point's test and its seeds
    for lr in lrs:
        for arm in arms:
            submit_train(arm, lr, 0, "grid")
    while pending:
        drain()
    for arm in arms:
        grid = [r for r in state["runs"] if r["arm"] == arm and r["seed"] == 0 and r["lr"] in lrs and r["ok"]]
        best = max(grid, key=lambda r: r["val"]["val_robust_acc"])
        for r in state["runs"]:
            if r["arm"] == arm:
                r["selected"] = r["lr"] == best["lr"]
        submit_test(best)
        for seed in range(1, args.seeds):
            submit_train(arm, best["lr"], seed, "seeds")
    while pending:
        drain()
        for r in state["runs"]:
            if (r.get("selected") or r.get("phase") == "seeds") and r["ok"] and "accuracy" not in r and not any(
                    j.get("run", {}).get("model_path") == r["model_path"] for j in pending.values()):
                submit_test(r)
    for r in state["runs"]:
        if r["ok"] and r["seed"] > 0:
            r["selected"] = True
    save()
    write(args, state, arms, t0, out)
    pool.shutdown()
    return 0


def write(args, state: dict, arms: list[str], t0: float, out: Path) -> None:
    import torch

    runs = [r for r in state["runs"] if r["ok"]]
    teacher = state["teacher"]
    lines = [f"# {args.name}: labels vs labels + an unlabeled pool (accuracy %)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; this invocation {(time.time() - t0) / 60:.0f} min",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, "
             f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}, {args.jobs} jobs "
             f"in parallel (1 torch thread each); torch {torch.__version__}",
             f"- command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`",
             f"- {args.dataset}: {args.labels} training samples keep their labels (stratified by class), the rest of the "
             f"training split is the pool (labels hidden); students cnn_small width {args.width:g}, every one "
             f"{args.epochs} epochs x {args.steps} steps x batch {args.batch} = {args.epochs * args.steps * args.batch:,} "
             f"images; lr grid {args.lrs} at seed 0, the best by validation robust accuracy (PGD-10 and CW-10, best "
             f"epoch), then seeds 1..{args.seeds - 1}; test: natural, PGD-20, CW-20 on the first {args.test_limit} test "
             f"images, AutoAttack standard on the first {args.aa_limit}",
             f"- teacher ({teacher.get('arch', '?')}, trained on the {args.labels} labeled samples): "
             + ", ".join(f"{a} {100 * teacher['accuracy'][a]:.1f}" for a in REPORTED if a in teacher.get("accuracy", {})),
             "", "## Selected points (mean ± std over seeds)", "",
             "| arm | lr | val robust | n | " + " | ".join(REPORTED) + " |", "|---|---|---|---|" + "---|" * len(REPORTED)]
    summary = []
    for arm in arms:
        rows = [r for r in runs if r["arm"] == arm and r.get("selected") and "accuracy" in r]
        if not rows:
            continue
        acc = {a: [r["accuracy"][a] for r in rows] for a in REPORTED}
        summary.append({"arm": arm, "lr": rows[0]["lr"], "n": len(rows), "accuracy": acc})
        lines.append(f"| {arm} | {rows[0]['lr']:g} | {_stats([r['val']['val_robust_acc'] for r in rows])} | {len(rows)} | "
                     + " | ".join(_stats(acc[a]) for a in REPORTED) + " |")
    lines += ["", "## Every run", "", "| arm | lr | seed | selected epoch | val natural | val robust | "
              + " | ".join(REPORTED) + " | train s |", "|---|---|---|---|---|---|" + "---|" * len(REPORTED) + "---|"]
    for r in sorted(runs, key=lambda r: (arms.index(r["arm"]) if r["arm"] in arms else 99, r["lr"], r["seed"])):
        acc = " | ".join(f"{100 * r['accuracy'][a]:.1f}" if "accuracy" in r else "—" for a in REPORTED)
        lines.append(f"| {r['arm']} | {r['lr']:g} | {r['seed']} | {r['selected_epoch']} | "
                     f"{100 * r['val']['val_natural_acc']:.1f} | {100 * r['val']['val_robust_acc']:.1f} | {acc} | "
                     f"{r['train_seconds']:.0f} |")
    tested = [r for r in runs if "accuracy" in r]
    if len(tested) > 2:
        rho = spearman([r["val"]["val_robust_acc"] for r in tested], [r["accuracy"]["autoattack"] for r in tested])
        lines += ["", f"Validation check: Spearman rank correlation between validation robust accuracy and test "
                      f"AutoAttack over the {len(tested)} tested runs: {rho:.2f}"]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    if summary:
        plot(out / f"{args.name}.png", summary, teacher, args.name)
    print("\n".join(lines), flush=True)


def plot(path: Path, summary: list[dict], teacher: dict, title: str) -> None:
    """AutoAttack vs natural accuracy per arm: each seed a dot, the mean a marker with std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for s in summary:
        nat = [100 * v for v in s["accuracy"]["natural"]]
        aa = [100 * v for v in s["accuracy"]["autoattack"]]
        dots = ax.scatter(nat, aa, s=12, alpha=0.5)
        ax.errorbar(statistics.mean(nat), statistics.mean(aa), xerr=statistics.stdev(nat) if len(nat) > 1 else 0,
                    yerr=statistics.stdev(aa) if len(aa) > 1 else 0, fmt="o", color=dots.get_facecolor()[0], ms=7,
                    capsize=3, label=f"{s['arm']} (n={s['n']})")
    if teacher.get("accuracy"):
        ax.scatter([100 * teacher["accuracy"]["natural"]], [100 * teacher["accuracy"]["autoattack"]], marker="*", s=120,
                   color="black", label="teacher (labels only)")
    ax.set_xlabel("test natural accuracy %")
    ax.set_ylabel("test AutoAttack accuracy %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
