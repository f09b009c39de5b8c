"""`dard sweep`, `dard registry promote|show|load`, `dard ui` (registered via the dard.commands entry point)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cluster.ray_session import owns_ray
from dard.cli import add_config_args, build_config
from dard.config import METHODS
from dard.logs import to_file
from dard.registry import METRIC
from dard.tracking import check_tracking_uri


@owns_ray
def cmd_sweep(args: argparse.Namespace) -> int:
    from dard.registry import promote
    from tuning.sweep import sweep

    cfg = build_config(args)
    if args.run_dir:
        cfg = cfg.updated(run={"out_dir": args.run_dir})
    uri = check_tracking_uri(args.tracking_uri)
    to_file(Path(args.storage_path or Path(cfg.run.out_dir) / "sweeps") / args.name)
    result = sweep(cfg, args.shards, args.space, trials=args.trials, workers_per_trial=args.workers_per_trial,
                   name=args.name, storage_path=args.storage_path, tracking_uri=uri, experiment=args.experiment,
                   resume=args.resume, address=args.address, max_concurrent=args.max_concurrent,
                   grace_period=args.grace_period, seed=args.seed or 0)
    print(f"sweep {args.name}: {result.trials} trials; best validation robust (PGD+CW) accuracy "
          f"{100 * result.best_metrics[METRIC]:.2f}% (natural {100 * result.best_metrics.get('val_natural_acc', 0):.2f}%)")
    print("best parameters: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in result.best_params.items()))
    print(f"MLflow parent run {result.parent_run_id} in {uri}")
    if not args.no_promote and result.best_run_id:
        from tuning.space import apply

        print(promote(uri, result.best_run_id, float(result.best_metrics[METRIC]), apply(cfg, result.best_params)).summary())
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from dard.registry import promote, run_config, show

    uri = check_tracking_uri(args.tracking_uri, existing=True)
    if args.registry_command == "promote":
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=uri).get_run(args.run_id)
        metric = args.metric if args.metric is not None else run.data.metrics.get(METRIC)
        if metric is None:
            raise ValueError(f"run {args.run_id} has no {METRIC} metric; pass --metric")
        print(promote(uri, args.run_id, float(metric), run_config(uri, args.run_id), name=args.name).summary())
    elif args.registry_command == "show":
        rows = show(uri, args.name)
        print(f"{args.name}:")
        for r in rows:
            print(f"  v{r['version']:<4} {METRIC}={r[METRIC]}  aliases={','.join(r['aliases']) or '-'}  "
                  f"promoted={r['promoted']}  champion at registration: {r['champion_at_registration']}  run {r['run_id']}")
    else:  # load
        from dard.models import save_model
        from dard.registry import load_registered

        model, header = load_registered(args.uri if args.uri.startswith("models:/") else f"models:/{args.uri}", uri)
        save_model(args.out, model, arch=header["arch"], num_classes=header["num_classes"],
                   in_channels=header["in_channels"], dataset=header["dataset"], arch_kwargs=header["arch_kwargs"],
                   meta=header["meta"])
        print(f"{args.uri} -> {args.out} ({header['arch']}, {header['dataset']})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    uri = check_tracking_uri(args.tracking_uri)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
               "--port", str(args.port)]
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl+C to stop")
    os.execv(sys.executable, command)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Ray Tune sweep over temperature and loss weights, MLflow per trial")
    add_config_args(p, method_default="dard", methods=METHODS)
    p.add_argument("--shards", required=True, help="shard directory (the sweep trains from shards)")
    p.add_argument("--space", default="dard-sat", help="preset (dard-sat, dard-trades, dard-default, rslad-like, wide, sat, trades, ard, rslad) or a YAML file")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--max-concurrent", type=int, help="default: GPUs // workers per trial, 1 without GPUs")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--name", default="dard-sweep", help="sweep name; with --resume, the sweep to continue")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--storage-path", help="default <run dir>/sweeps")
    p.add_argument("--run-dir")
    p.add_argument("--address")
    p.add_argument("--tracking-uri")
    p.add_argument("--experiment", default="dard-sweeps")
    p.add_argument("--no-promote", action="store_true", help="do not register the best student")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("registry", help="MLflow model registry: promote | show | load")
    rs = p.add_subparsers(dest="registry_command", required=True)
    q = rs.add_parser("promote", help="register a run's model; move 'champion' only if it is better")
    q.add_argument("--tracking-uri")
    q.add_argument("--run-id", required=True)
    q.add_argument("--metric", type=float, help="validation robust accuracy (default: the run's val_robust_acc)")
    q.add_argument("--name", help="default dard-<dataset>-<arch>")
    q = rs.add_parser("show", help="versions with metrics and aliases")
    q.add_argument("--tracking-uri")
    q.add_argument("name")
    q = rs.add_parser("load", help="export a registered model to a dard model file")
    q.add_argument("--tracking-uri")
    q.add_argument("uri", help="NAME@ALIAS, NAME/VERSION or models:/...")
    q.add_argument("--out", required=True)
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser("ui", help="open the MLflow dashboard on the tracking store")
    p.add_argument("--tracking-uri")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
