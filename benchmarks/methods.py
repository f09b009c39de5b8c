"""DARD vs SAT / TRADES / ARD / RSLAD, plus DARD ablations, side by side over seeds.

Every student has the same architecture, data, epochs and teacher; all train from the same
precomputed shards (the teacher's views and soft labels), so the only difference is the
objective and, with ``--tuned``, each method's own best lr and knobs from an equal tuning budget
(``benchmarks/tune_methods.py``). Each is evaluated with the full protocol (docs/design.md) on the
test split, AutoAttack on all of it by default.

    python benchmarks/methods.py --tuned benchmarks/results/tuned-digits.json   # digits, 3 seeds
    python benchmarks/methods.py --quick                # 1 seed, few epochs: a smoke run
    python benchmarks/methods.py --dataset cifar10 --data-dir ~/data --student resnet18 --teacher wrn.pt

Writes ``benchmarks/results/methods-<dataset>.md`` (mean +- std, machine, date, command),
``methods-<dataset>.json`` (every run), ``methods-<dataset>-curves.png`` (training curves) and
``methods-<dataset>-frontier.png`` (natural vs AutoAttack accuracy of every run).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.precompute import precompute  # noqa: E402
from dard.config import Config, deep_merge, teacher_config  # noqa: E402
from dard.data import load_splits, to_float  # noqa: E402
from dard.evaluate import EvalSettings, evaluate_model  # noqa: E402
from dard.models import load_model  # noqa: E402
from dard.training import fit  # noqa: E402

# name -> (method, overrides, tuning preset whose best parameters --tuned applies first). Ablations
# change one knob of DARD's default each.
VARIANTS = {
    "SAT": ("sat", {}, "sat"),
    "TRADES": ("trades", {}, "trades"),
    "ARD": ("ard", {}, "ard"),
    "RSLAD": ("rslad", {}, "rslad"),
    "DARD": ("dard", {}, "dard-sat"),
    "DARD w_adv=0 (its SAT backbone alone)": ("dard", {"loss": {"w_adv": 0.0}}, "dard-sat"),
    "DARD + w_nat 1/6": ("dard", {"loss": {"w_nat": 1 / 6}}, "dard-sat"),
    "DARD PGD views instead of DPGD": ("dard", {"attack": {"dpgd_loss": "ce"}}, "dard-sat"),
    "DARD TRADES backbone": ("dard", {"loss": {"rob_target": "self", "w_ce": 1.0, "trades_beta": 6.0}},
                             "dard-trades"),
    "DARD target T(x_s) online": ("dard", {"loss": {"rob_target": "teacher_adv", "w_rob": 1.0, "w_ce": 0.0,
                                                    "w_ce_adv": 1.0}}, "dard-sat"),
    "DARD v0 (target T(x); 1/3 1/2 1/6)": ("dard", {"loss": {"rob_target": "teacher_nat", "w_adv": 1 / 3,
                                                             "w_rob": 1 / 2, "w_nat": 1 / 6, "w_ce": 0.0}}, None),
}
REPORTED = ("natural", "fgsm", "pgd20", "bim10", "tpgd10", "cw20", "dpgd20", "autoattack")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-=." else "_" for c in name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir")
    p.add_argument("--student", help="student arch (default: the dataset's, cnn_small on digits)")
    p.add_argument("--teacher", help="teacher model file (default: train a TRADES teacher here)")
    p.add_argument("--teacher-arch", default=None, help="teacher arch when training one (default: the dataset's)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="default: the dataset's teacher recipe")
    p.add_argument("--tuned", help="tune_methods.py output: each method's best parameters are applied first")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--views", type=int, default=4, help="augmented views per sample in the shards")
    p.add_argument("--variants", help="comma list of variant names (default: all)")
    p.add_argument("--aa-limit", type=int, default=None, help="AutoAttack on the first N test samples (default: all)")
    p.add_argument("--work", default=str(REPO / "runs" / "bench-methods"), help="models, shards, logs")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="1 seed, 4 epochs, 2-epoch teacher: smoke run")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs, args.aa_limit = 1, 4, 2, 50
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    base = Config.for_dataset(args.dataset, data={"data_dir": args.data_dir}, optim={"epochs": args.epochs},
                              run={"progress": False})
    if args.student:
        base = base.updated(model={"arch": args.student, "kwargs": {}})
    started = time.time()

    teacher = args.teacher
    if teacher is None:
        teacher = str(work / "teacher" / "model.pt")
        if not Path(teacher).exists():
            tcfg = teacher_config(args.dataset, data={"data_dir": args.data_dir},
                                  run={"out_dir": str(work / "teacher"), "progress": False})
            tcfg = tcfg.updated(model={"arch": args.teacher_arch or tcfg.model.arch},
                                optim={"epochs": args.teacher_epochs or tcfg.optim.epochs})
            logging.info("training the teacher (%s %s, %d epochs)", tcfg.loss.method, tcfg.model.arch, tcfg.optim.epochs)
            fit(tcfg, resume=True)

    shard_sets: dict[str, str] = {}

    def shards_for(cfg: Config) -> str:
        key = f"{cfg.attack.dpgd_loss}-{cfg.attack.dpgd_schedule}"
        if key not in shard_sets:
            directory = str(work / f"shards-{key}")
            logging.info("precomputing shards %s", directory)
            precompute(cfg, teacher, directory, views=args.views, rows_per_part=2048, use_ray=False)
            shard_sets[key] = directory
        return shard_sets[key]

    tuned = json.loads(Path(args.tuned).read_text()) if args.tuned else None
    splits = load_splits(base.data)
    x_test, y_test = to_float(splits.test.images), splits.test.labels
    runs = []
    results_path = work / "runs.json"
    done = {(r["variant"], r["seed"]): r for r in json.loads(results_path.read_text())} if results_path.exists() else {}
    for seed in range(args.seeds):
        for name in names:
            if (name, seed) in done:
                runs.append(done[(name, seed)])
                continue
            method, over, preset = VARIANTS[name]
            start = base
            if tuned and preset in tuned["presets"]:  # else the dataset's defaults
                from tuning.space import apply

                start = apply(base, tuned["presets"][preset]["best_params"])
            raw = deep_merge(start.to_dict(), deep_merge(over, {"loss": {"method": method}, "run": {
                "seed": seed, "out_dir": str(work / f"{slug(name)}-s{seed}")}}))
            cfg = Config.for_dataset(args.dataset, **raw)
            t0 = time.time()
            result = fit(cfg, shards=shards_for(cfg), teacher_path=teacher)
            train_s = time.time() - t0
            model, _ = load_model(result["model_path"])
            settings = EvalSettings.for_config(cfg, seed=seed, autoattack_limit=args.aa_limit, eps_curve=False,
                                               sanity_checks=seed == 0)
            report = evaluate_model(model, x_test, y_test, settings, progress=False)
            history = [json.loads(l) for l in Path(cfg.run.out_dir, "history.jsonl").read_text().splitlines()]
            run = {"variant": name, "seed": seed, "accuracy": report.accuracy, "train_seconds": train_s,
                   "loss": cfg.to_dict()["loss"], "optim": {"lr": cfg.optim.lr},
                   "checks": [c.__dict__ for c in report.checks],
                   "curve": [(h["epoch"], h.get("val_natural_acc"), h.get("val_robust_acc")) for h in history]}
            runs.append(run)
            done[(name, seed)] = run
            results_path.write_text(json.dumps(list(done.values()), indent=1))
            logging.info("%s seed %d: %s (%.0f s)", name, seed,
                         ", ".join(f"{k} {100 * v:.1f}" for k, v in report.accuracy.items()), train_s)

    write_results(runs, names, args, out, time.time() - started, base)
    return 0


def write_results(runs: list[dict], names: list[str], args, out: Path, seconds: float, base: Config) -> None:
    table = {}
    for name in names:
        rows = [r for r in runs if r["variant"] == name]
        table[name] = {a: [r["accuracy"][a] for r in rows if a in r["accuracy"]] for a in REPORTED}
    fmt = lambda v: (f"{100 * statistics.mean(v):.1f} ± {100 * statistics.stdev(v):.1f}" if len(v) > 1  # noqa: E731
                     else f"{100 * v[0]:.1f}" if v else "–")
    lines = [f"# Methods on {args.dataset}: mean ± std over {args.seeds} seed(s), test split, accuracy %", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; total {seconds / 60:.0f} min",
             f"- machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
             f"torch {torch.__version__}",
             f"- command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`",
             f"- student {base.model.arch}, {args.epochs} epochs, batch {base.optim.batch_size}, lr {base.optim.lr} "
             f"({base.optim.lr_schedule}); eps {base.attack.eps:.4g}, step {base.attack.step_size:.4g}, "
             f"{base.attack.steps} training attack steps; shards with {args.views} views; "
             f"AutoAttack on {'the first ' + str(args.aa_limit) if args.aa_limit else 'all'} test samples, "
             f"the rest on all; " + (f"each method's lr and knobs from `{args.tuned}`" if args.tuned else
                                     "every method at the dataset's default recipe"), "",
             "| method | " + " | ".join(REPORTED) + " |", "|---|" + "---|" * len(REPORTED)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(fmt(table[name][a]) for a in REPORTED) + " |")
    failed = sorted({(r["variant"], c["name"]) for r in runs for c in r["checks"] if not c["passed"]})
    lines += ["", "Sanity checks (seed 0): " + ("all passed" if not failed else
                                                 "FAILED: " + ", ".join(f"{v}: {c}" for v, c in failed))]
    (out / f"methods-{args.dataset}.md").write_text("\n".join(lines) + "\n")
    (out / f"methods-{args.dataset}.json").write_text(json.dumps(runs, indent=1))
    plot_curves(runs, names, out / f"methods-{args.dataset}-curves.png")
    plot_frontier(runs, names, out / f"methods-{args.dataset}-frontier.png")
    print("\n".join(lines))


def plot_curves(runs: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for name in names:
        rows = [r for r in runs if r["variant"] == name and r["seed"] == 0]
        if not rows:
            continue
        curve = rows[0]["curve"]
        axes[0].plot([c[0] + 1 for c in curve], [100 * (c[1] or 0) for c in curve], label=name)
        axes[1].plot([c[0] + 1 for c in curve], [100 * (c[2] or 0) for c in curve], label=name)
    axes[0].set_title("validation natural accuracy (seed 0)")
    axes[1].set_title("validation robust (PGD-10 + CW-10) accuracy (seed 0)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_frontier(runs: list[dict], names: list[str], path: Path) -> None:
    """Natural vs AutoAttack accuracy, one point per run (variant x seed): the frontier, not one number."""
    from benchmarks.plots import scatter

    groups = {}
    for name in names:
        rows = [r for r in runs if r["variant"] == name and "autoattack" in r["accuracy"]]
        groups[name] = ([100 * r["accuracy"]["natural"] for r in rows], [100 * r["accuracy"]["autoattack"] for r in rows],
                        [], [])
    scatter(path, groups, xlabel="test natural accuracy %", ylabel="test AutoAttack accuracy %",
            title="every run (method x seed)")


if __name__ == "__main__":
    sys.exit(main())
