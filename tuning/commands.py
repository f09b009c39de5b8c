"""`dard sweep` (registered through the ``dard.commands`` entry point: the core CLI never imports Ray)."""
from __future__ import annotations

import argparse
from pathlib import Path

from cluster.ray_session import owns_ray
from dard.cli import add_config_args, build_config, count
from dard.config import METHODS
from dard.files import check_destination, is_uri
from dard.logs import percent, to_file
from dard.registry import METRIC
from dard.tracking import check_tracking_uri


@owns_ray
def cmd_sweep(args: argparse.Namespace) -> int:
    from dard.registry import promote
    from tuning.sweep import sweep

    if args.storage_path:
        check_destination(args.storage_path, what="--storage-path", kind="folder", inputs=(args.shards,))
    if args.run_dir:
        check_destination(args.run_dir, what="--run-dir", kind="folder", local_only="it holds the trials' run "
                          "folders and dard.log; the sweep's state takes --storage-path s3://...")
    cfg = build_config(args)
    if args.run_dir:
        cfg = cfg.updated(run={"out_dir": args.run_dir})
    uri = check_tracking_uri(args.tracking_uri)
    storage = args.storage_path or str(Path(cfg.run.out_dir) / "sweeps")
    to_file(Path(cfg.run.out_dir) if is_uri(storage) else Path(storage) / args.name)  # a log is a local file
    result = sweep(cfg, args.shards, args.space, trials=args.trials, workers_per_trial=args.workers_per_trial,
                   name=args.name, storage_path=args.storage_path, tracking_uri=uri, experiment=args.experiment,
                   resume=args.resume, address=args.address, max_concurrent=args.max_concurrent,
                   grace_period=args.grace_period, seed=args.seed or 0)
    print(f"sweep {args.name}: {result.trials} trials; best validation robust (PGD+CW) accuracy "
          f"{percent(result.best_metrics[METRIC])} (natural {percent(result.best_metrics.get('val_natural_acc', 0))})")
    print("best parameters: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in result.best_params.items()))
    print(f"MLflow parent run {result.parent_run_id} in {uri}")
    if not args.no_promote and result.best_run_id:
        from tuning.space import apply

        print(promote(uri, result.best_run_id, apply(cfg, result.best_params)).summary())  # the held epoch's metric
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Ray Tune sweep over temperature and loss weights, MLflow per trial")
    add_config_args(p, method_default="dard", methods=METHODS)
    p.add_argument("--shards", required=True, help="shard directory (the sweep trains from shards)")
    p.add_argument("--space", default="dard-sat", help="preset (dard-sat, dard-trades, dard-default, rslad-like, wide, sat, trades, ard, rslad) or a YAML file")
    p.add_argument("--trials", type=count(), help="trials (sampled points; default 12; a --resume continues the "
                                                   "number the sweep started with)")
    p.add_argument("--workers-per-trial", type=count(), default=1)
    p.add_argument("--max-concurrent", type=count(), help="trials at once (default: GPUs // workers per trial, 1 without GPUs)")
    p.add_argument("--grace-period", type=count(), default=1, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--name", default="dard-sweep", help="sweep name; with --resume, the sweep to continue")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--storage-path", help="the sweep's state (a folder or s3://...; default <run dir>/sweeps)")
    p.add_argument("--run-dir", help="the trials' run folders and dard.log (default runs/default)")
    p.add_argument("--address")
    p.add_argument("--tracking-uri")
    p.add_argument("--experiment", default="dard-sweeps")
    p.add_argument("--no-promote", action="store_true", help="do not register the best student")
    p.set_defaults(func=cmd_sweep)
