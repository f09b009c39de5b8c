"""`dard precompute` and `dard train`: subcommands over the Ray code, registered through the
``dard.commands`` entry point so the core package never imports Ray."""
from __future__ import annotations

import argparse

from cluster.ray_session import owns_ray
from dard.cli import add_config_args, add_tracking_args, build_config, count, source_name
from dard.config import METHODS
from dard.files import check_destination
from dard.logs import to_file


@owns_ray
def cmd_precompute(args: argparse.Namespace) -> int:
    from cluster.precompute import precompute

    check_destination(args.out, what="--out", kind="folder", inputs=(args.teacher,))
    cfg = build_config(args)
    result = precompute(cfg, args.teacher, args.out, views=args.views, split=args.split,
                        rows_per_part=args.rows_per_part, teacher_arch=args.teacher_arch, batch_size=args.batch,
                        address=args.address, use_ray=not args.local)
    m = result.manifest
    print(f"{args.out}: computed {len(result.computed_parts)} parts, kept {len(result.skipped_parts)} finished ones; "
          f"{m['rows']} rows, {sum(p['bytes'] for p in m['parts']) / 1e6:.2f} MB, teacher {m['teacher']['id']}")
    return 0


@owns_ray
def cmd_train(args: argparse.Namespace) -> int:
    from cluster.train import check_scaling, train_distributed
    from dard.engine import validation_summary
    from dard.training import open_shards

    check_scaling(args.workers, args.max_failures, collective_timeout_s=args.collective_timeout)
    for dest, what, kind in ((args.out, "--out", "file"), (args.storage_path, "--storage-path", "folder")):
        if dest:
            check_destination(dest, what=what, kind=kind, inputs=(args.shards, args.teacher))
    if args.run_dir:
        check_destination(args.run_dir, what="--run-dir", kind="folder", local_only="it holds dard.log; checkpoints "
                          "take --storage-path s3://...")
    cfg = build_config(args)
    if args.run_dir:
        cfg = cfg.updated(run={"out_dir": args.run_dir})
    shards = open_shards(args.shards, cfg, args.teacher)  # checked once, here: no MLflow run, nothing written
    from cluster.train import checked_rerun, run_storage
    from dard.files import within
    from dard.tracking import check_tracking_uri, training_run

    run_dir = within(run_storage(cfg, args.storage_path), args.name)
    previous = checked_rerun(cfg, run_dir)  # a rerun under another config: refused here, as nothing is written
    to_file(cfg.run.out_dir)
    uri = None if args.no_tracking else check_tracking_uri(args.tracking_uri)
    # One training = one MLflow run: a rerun of the same Ray run (after a crash, SIGKILL or Ctrl-C)
    # continues the run it started instead of opening a second one.
    with training_run(cfg, uri, experiment=args.experiment, run_name=args.name,
                      marker=within(run_dir, "mlflow_run.json")) as tracked:
        if previous and tracked is not None:  # a rerun: the epochs its checkpoint committed, each in MLflow once
            tracked.backfill(list(previous[1].get("history") or []))
        result = train_distributed(cfg, shards, workers=args.workers, use_gpu=args.gpu, address=args.address,
                                   storage_path=args.storage_path, name=args.name, max_failures=args.max_failures,
                                   out=args.out, teacher_path=args.teacher,
                                   placement_strategy=args.placement.upper(), collective_timeout_s=args.collective_timeout,
                                   tracking=None if tracked is None else {"uri": uri, "run_id": tracked.run_id},
                                   rerun_checked=True)
        if tracked is not None:
            tracked.finish(result.model_path)
    print(f"{cfg.loss.method} {cfg.model.arch} on {cfg.data.dataset}, {args.workers} workers on "
          f"{result.metrics.get('nodes', 1)} node(s): {validation_summary(cfg, result.metrics)}")
    print(f"model: {result.model_path}\ncheckpoint: {result.checkpoint_dir}\nRay run: {result.run_path}")
    if tracked is not None:
        print(f"MLflow run {tracked.run_id} in {uri} (`dard registry promote --run-id {tracked.run_id} --tracking-uri {uri}`)")
    return 0


@owns_ray
def cmd_demo(args: argparse.Namespace) -> int:
    from cluster.demo import DemoSettings, run_demo

    kw = {"out": args.out, "fresh": args.fresh, "tracking_uri": args.tracking_uri, "address": args.address,
          "data_dir": args.data_dir, "source": args.source}
    if args.source is None and args.dataset not in ("digits", "fashion-mnist"):
        raise ValueError(f"--dataset {args.dataset}: the demo runs on digits, fashion-mnist or your own --source")
    dataset = args.dataset if args.source is None or args.dataset != "digits" else source_name(args.source)
    check_destination(args.out, what="--out", kind="folder", local_only="the demo's run folder: teacher, shards, "
                      "checkpoints, reports")
    settings = (DemoSettings.quick if args.quick else DemoSettings.for_dataset)(dataset, **kw)
    for name in ("teacher_arch", "teacher_epochs", "student_epochs", "workers", "aa_limit"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.teacher_aa = args.teacher_aa
    to_file(settings.out)
    run_demo(settings)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from cluster.submit import check_package, submit

    entrypoint = [a for a in args.entrypoint if a != "--"]
    if args.check:
        files, total = check_package(args.working_dir, args.exclude)
        print(f"{args.working_dir}: {files} files, {total / 2**20:.1f} MiB would be uploaded (Ray's own walk, "
              ".gitignore and .rayignore)")
        return 0
    if not entrypoint:
        raise ValueError("dard submit: give the job's command after --, e.g. -- python -m cluster.jobs.train --shards ...")
    job_id = submit(entrypoint, address=args.address, working_dir=args.working_dir, excludes=args.exclude,
                    wait=args.wait)
    print(f"submitted {job_id} to {args.address}: `ray job logs --address {args.address} {job_id} --follow`")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="a Ray job from this checkout, its package checked before upload (no outputs, "
                                      "nothing over Ray's 512 MiB)")
    p.add_argument("--address", default="http://127.0.0.1:8265",
                   help="the job API (a cluster's stays on its head's loopback: `ray dashboard CLUSTER.yaml` forwards it)")
    p.add_argument("--working-dir", default=".", help="what the job runs from (uploaded less .gitignore/.rayignore)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="more to leave out (gitignore patterns; repeatable)")
    p.add_argument("--check", action="store_true", help="only say what would be uploaded")
    p.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the job's command")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded digits: teacher, shards, DARD on Ray Train, "
                                    "SAT baseline, attack suite, MLflow, registry")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--dataset", default="digits",
                   help="digits, or fashion-mnist (a 6k-image subset, cnn_small teacher; about 6 min on 2 CPUs); with "
                        "--source: your images' name (default: the folder's)")
    p.add_argument("--source", help="your images: folder:PATH (a sub-folder per class, or train/ and test/ of those) "
                                    "or table:PATH; the demo trains on up to 6,000 of them")
    p.add_argument("--data-dir", help="fashion-mnist: the IDX files' folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--quick", action="store_true", help="a reduced run (about a minute; used by the tests)")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")
    p.add_argument("--teacher-arch", help="teacher architecture (default cnn_medium)")
    p.add_argument("--teacher-epochs", type=count())
    p.add_argument("--teacher-aa", action="store_true", help="AutoAttack on the teacher too (minutes on a CPU)")
    p.add_argument("--student-epochs", type=count())
    p.add_argument("--workers", type=count())
    p.add_argument("--aa-limit", type=count(), help="AutoAttack on the first N test samples")
    p.add_argument("--tracking-uri")
    p.add_argument("--address")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="DDP student training from shards on Ray Train (laptop or cluster)")
    add_config_args(p, method_default="dard", methods=METHODS)
    p.add_argument("--shards", required=True, help="shard directory from `dard precompute` (path or URI)")
    p.add_argument("--teacher", help="optional: check that the shards were made by this teacher file")
    p.add_argument("--workers", type=count(), default=2, help="DDP workers (one GPU each on a GPU cluster)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="use GPUs (default: when the cluster has any)")
    p.add_argument("--address", help="Ray cluster (auto, ray://host:10001); default: RAY_ADDRESS or a local Ray")
    p.add_argument("--storage-path", help="checkpoints (local dir or s3://...); default <run dir>/ray")
    p.add_argument("--name", default="dard-train", help="run name; the same name + storage path resumes")
    p.add_argument("--max-failures", type=count(0), default=2, help="worker-group restarts before giving up")
    p.add_argument("--placement", choices=("pack", "spread"), default="pack",
                   help="pack: fewest nodes (fastest collectives); spread: one worker per node where possible")
    p.add_argument("--collective-timeout", type=count(), default=300, metavar="S",
                   help="seconds a rank waits in a collective before it fails and the group restarts")
    p.add_argument("--out", help="final model file, a path or URI (default <storage path>/<name>/model.pt, beside "
                                 "its checkpoints)")
    p.add_argument("--run-dir", help="run folder: dard.log, and the default storage path <run dir>/ray (default runs/default)")
    add_tracking_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("precompute", help="teacher soft labels on natural + DPGD views -> Arrow shards (Ray tasks)")
    add_config_args(p, method_default="dard", methods=METHODS)
    p.add_argument("--teacher", required=True, help="teacher model file")
    p.add_argument("--teacher-arch", help="architecture of a bare-state-dict teacher")
    p.add_argument("--out", required=True, help="shard directory (local path or pyarrow URI, e.g. s3://bucket/shards)")
    p.add_argument("--views", type=count(), default=1, help="augmented views per sample (epoch e uses view e mod V)")
    p.add_argument("--split", choices=("train", "val", "test"), default="train")
    p.add_argument("--rows-per-part", type=count(), default=4096, help="samples per part (one Ray task each)")
    p.add_argument("--batch", type=count(), default=256, help="teacher batch size inside a task")
    p.add_argument("--address", help="Ray cluster to join (auto, ray://host:10001); default: start a local one")
    p.add_argument("--local", action="store_true", help="compute in this process, without Ray")
    p.set_defaults(func=cmd_precompute)
