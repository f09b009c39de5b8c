"""Fair baselines: the same Ray Tune budget for every method, selected on the validation split.

One ``dard sweep`` (Ray Tune + Optuna + ASHA, every trial an MLflow child run) per method preset
of ``tuning/space.py`` -- ``sat``, ``trades``, ``ard``, ``rslad`` and the DARD presets -- each with
the same number of trials and epochs, all from the same teacher shards. Every preset searches lr
and that method's own knobs. Selection is on ``val_robust_acc`` (validation samples that survive
both PGD and the CW margin attack), never on the test split.

    python benchmarks/tune_methods.py --shards runs/bench-methods/shards-dice-constant --trials 8 --epochs 20

Writes ``benchmarks/results/tuned-<dataset>.json``: per preset the best parameters (what
``benchmarks/methods.py --tuned`` trains over seeds) and every trial's validation metrics, and
``tuned-<dataset>-trials.png`` (validation natural vs robust accuracy of every trial).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dard.config import Config  # noqa: E402
from dard.registry import METRIC  # noqa: E402

PRESETS = ("sat", "trades", "ard", "rslad", "dard-sat")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="training shards of the teacher (benchmarks/methods.py builds them)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--trials", type=int, default=8, help="trials per method (the same for every method)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--grace-period", type=int, default=5)
    p.add_argument("--concurrent", type=int, default=2, help="trials at once (each DDP worker takes 0.5 CPU)")
    p.add_argument("--work", default=str(REPO / "runs" / "bench-tune"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()

    from tuning.sweep import child_runs, sweep

    work, out = Path(args.work).absolute(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    work.mkdir(parents=True, exist_ok=True)
    results_path = out / f"tuned-{args.dataset}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault("presets", {})
    started = time.time()
    for preset in args.presets.split(","):
        cfg = Config.for_dataset(args.dataset, data={"data_dir": args.data_dir}, optim={"epochs": args.epochs},
                                 run={"out_dir": str(work / preset), "progress": False})
        t0 = time.time()
        result = sweep(cfg, args.shards, preset, trials=args.trials, name=f"tune-{preset}",
                       storage_path=str(work / "sweeps"), tracking_uri=uri, experiment="tune-methods",
                       grace_period=args.grace_period, max_concurrent=args.concurrent, resume=(work / "sweeps" / f"tune-{preset}").exists())
        trials = []
        for run in child_runs(uri, result.parent_run_id):
            m = run.data.metrics
            trials.append({"params": {k[len("trial."):]: v for k, v in run.data.params.items() if k.startswith("trial.")},
                           "epochs": int(m.get("epoch", -1)) + 1, "val_natural_acc": m.get("val_natural_acc"),
                           "val_pgd_acc": m.get("val_pgd_acc"), METRIC: m.get(METRIC)})
        results["presets"][preset] = {"best_params": result.best_params,
                                      "best_metrics": {k: result.best_metrics.get(k) for k in
                                                       ("val_natural_acc", "val_pgd_acc", "val_cw_acc", METRIC)},
                                      "trials": trials, "seconds": round(time.time() - t0)}
        print(preset, json.dumps(results["presets"][preset]["best_params"]),
              json.dumps(results["presets"][preset]["best_metrics"]), flush=True)
        results.update(dataset=args.dataset, trials_per_method=args.trials, epochs=args.epochs,
                       shards=str(args.shards), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       command=f"python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}")
        results_path.write_text(json.dumps(results, indent=1))
    plot_trials(results, out / f"tuned-{args.dataset}-trials.png")
    print(f"done in {(time.time() - started) / 60:.1f} min; {results_path}")
    return 0


def plot_trials(results: dict, path: Path) -> None:
    from benchmarks.plots import scatter

    def pct(trials, key):
        return [100 * t[key] for t in trials]

    groups = {}
    for preset, r in results["presets"].items():
        done = [t for t in r["trials"] if t[METRIC] is not None and t["epochs"] == results["epochs"]]
        stopped = [t for t in r["trials"] if t[METRIC] is not None and t["epochs"] != results["epochs"]]
        groups[preset] = (pct(done, "val_natural_acc"), pct(done, METRIC), pct(stopped, "val_natural_acc"),
                          pct(stopped, METRIC))
    scatter(path, groups, xlabel="validation natural accuracy %", ylabel="validation robust (PGD + CW) accuracy %",
            title=f"every trial, {results['trials_per_method']} per method (hollow: stopped early by ASHA)")


if __name__ == "__main__":
    sys.exit(main())
