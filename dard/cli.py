"""``dard ...``: thin subcommands -- parse, build a Config, call the same functions the Ray jobs call."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from fractions import Fraction
from importlib.metadata import entry_points
from pathlib import Path

import yaml

from dard import logs
from dard.config import (DATASETS, DIVERGENCES, DPGD_LOSSES, EVAL_ATTACKS, EXPORT_FORMATS, METHODS, STEP_SCHEDULES,
                         Config, ConfigError, deep_merge, default_sections, load_strict, read_yaml, teacher_config)
from dard.logs import one_line, percent

log = logging.getLogger("dard")


def pixel_value(text: str) -> float:
    """'8/255' or '0.03' -> float (eps and step sizes on the [0, 1] scale)."""
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError) as err:
        raise argparse.ArgumentTypeError(f"expected a number like 8/255 or 0.03, got {text!r}") from err


def count(low: int = 1, high: int | None = None):
    """An argparse type: an integer in [low, high], else one line naming the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from err
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {'in [' + str(low) + ', ' + str(high) + ']' if high is not None else '>= ' + str(low)}, got {value}")
        return value

    parse.__name__ = "count"
    return parse


class Parser(argparse.ArgumentParser):
    """argparse with dard's one line for a bad argument (``dard CMD: error: ...``, exit 2): the
    usage text is what ``--help`` is for."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def image_size(text: str) -> list[int]:
    """'32' -> [32, 32]; '32,48' or '32x48' -> [32, 48] (height, width)."""
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected H,W or N pixels, e.g. 32 or 64,48, got {text!r}") from err
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W or N pixels (>= 1), e.g. 32 or 64,48, got {text!r}")
    return values * 2 if len(values) == 1 else values


def add_config_args(p: argparse.ArgumentParser, *, method_default: str, methods: tuple[str, ...]) -> None:
    g = p.add_argument_group("run configuration (flags override --config)")
    g.add_argument("--config", help="YAML run config (see `dard config --dataset digits`)")
    g.add_argument("--dataset", help=f"a preset ({', '.join(DATASETS)}; default digits: embedded, nothing downloaded), "
                   "or with --source the name of your images (default: the folder's or table's name)")
    g.add_argument("--source", help="your images: folder:PATH (one sub-folder per class, or train/ and test/ folders "
                   "of those) or table:PATH (Parquet/Arrow with image and label columns); PATH local or s3://, gs://")
    g.add_argument("--test-source", help="a fixed test set (folder:PATH or table:PATH); default: carved from "
                   "--source by seed (data.test_fraction)")
    g.add_argument("--image-size", type=image_size, metavar="H,W", help="resize every image to H,W (or N,N); "
                   "default: none, and every image must have the first one's size")
    g.add_argument("--labels", type=count(), metavar="N", help="keep the labels of N training samples (stratified by "
                   "class); the rest become the unlabeled pool")
    g.add_argument("--pool", help="more images without labels (folder:PATH or table:PATH) for the teacher to label")
    g.add_argument("--data-dir", help="CIFAR: folder holding cifar-10-batches-py/ or cifar-100-python/; Fashion-MNIST: "
                   "the IDX files' folder (default /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)")
    g.add_argument("--arch", help="architecture (see `dard models`)")
    g.add_argument("--method", choices=methods, default=None, help=f"training objective (default {method_default or 'the teacher recipe'})")
    g.add_argument("--epochs", type=count())
    g.add_argument("--batch-size", type=count())
    g.add_argument("--lr", type=float)
    g.add_argument("--eps", type=pixel_value, help="L-inf radius on [0,1] pixels, e.g. 8/255")
    g.add_argument("--step-size", type=pixel_value)
    g.add_argument("--steps", type=count(), help="inner attack steps")
    g.add_argument("--temperature", type=float, help="distillation temperature tau")
    g.add_argument("--divergence", choices=DIVERGENCES)
    g.add_argument("--dpgd-loss", choices=DPGD_LOSSES)
    g.add_argument("--dpgd-schedule", choices=STEP_SCHEDULES)
    g.add_argument("--limit-train", type=count(), help="use only the first N training samples")
    g.add_argument("--seed", type=count(0))
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any config field, e.g. --set loss.w_adv=0.5 (repeatable; VALUE parsed as YAML)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(method_default=method_default)


def source_name(spec: str) -> str:
    """A dataset name for a source: its folder's or table's name (``train`` folders: their parent's)."""
    import re

    parts = [p for p in spec.split(":", 1)[-1].rstrip("/").split("/") if p]
    name = parts[-1] if parts else "data"
    if name in ("train", "training") and len(parts) > 1:
        name = parts[-2]
    name = re.sub(r"\.(parquet|arrow|feather)$", "", name.lower())
    name = re.sub(r"[^a-z0-9._-]+", "-", name).strip("-.") or "data"
    return name if name not in DATASETS else f"{name}-own"


def _overrides(items: list[str]) -> list[tuple[str, list[str], object]]:
    """``--set SECTION.KEY=VALUE`` items -> (section, key path, YAML value)."""
    out = []
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. loss.w_adv=0.5")
        dotted, value = item.split("=", 1)
        section, *path = dotted.split(".")
        out.append((section, path, load_strict(value, f"--set {item}")))
    return out


def _assign(raw: dict, section: str, path: list[str], value, item: str) -> None:
    if section not in raw:
        raise ConfigError(f"--set {item}: unknown section {section!r}; known: {sorted(raw)}")
    target = raw[section]
    for key in path[:-1]:  # model.kwargs.width=0.5
        if not isinstance(target.get(key), dict):
            raise ConfigError(f"--set {item}: {section}.{key} is not a mapping")
        target = target[key]
    target[path[-1]] = value


def build_config(args: argparse.Namespace) -> Config:
    """Config from --config (or the dataset's defaults), then flags, then --set overrides. A source
    of your own is listed first (its defaults follow its images: :func:`dard.config.source_defaults`)
    and its facts pinned (:func:`dard.data.resolve_section`)."""
    from dard.config import from_dict
    from dard.data import resolve_section

    given = read_yaml(args.config) if args.config else {}
    sets = _overrides(args.set)
    data = dict(given.get("data") or {})
    if args.dataset and args.dataset != data.get("dataset", args.dataset):
        data = {}  # another dataset than the file's: its defaults, with the file's other sections on top
    data_flags = {"source": args.source, "test_source": args.test_source, "image_size": args.image_size,
                  "labeled": args.labels, "pool": args.pool, "data_dir": args.data_dir, "limit_train": args.limit_train}
    data.update({k: v for k, v in data_flags.items() if v is not None})
    for section, path, value in sets:
        if section == "data":
            _assign({"data": data}, section, path, value, f"data.{'.'.join(path)}")
    source = data.get("source")
    data["dataset"] = dataset = args.dataset or data.get("dataset") or (source_name(source) if source else "digits")
    data = resolve_section(data)
    teacher = args.method_default is None  # train-teacher: the dataset's teacher recipe (TEACHER_DEFAULTS)
    raw = default_sections(dataset, data, teacher=teacher and not given)
    for name, values in {**given, "data": data}.items():
        raw[name] = deep_merge(raw[name], values) if isinstance(raw.get(name), dict) else values
    if not given and not teacher:
        raw["loss"]["method"] = args.method_default
    flags = {
        ("model", "arch"): args.arch, ("loss", "method"): args.method, ("optim", "epochs"): args.epochs,
        ("optim", "batch_size"): args.batch_size, ("optim", "lr"): args.lr, ("attack", "eps"): args.eps,
        ("attack", "step_size"): args.step_size, ("attack", "steps"): args.steps,
        ("loss", "temperature"): args.temperature, ("loss", "divergence"): args.divergence,
        ("attack", "dpgd_loss"): args.dpgd_loss, ("attack", "dpgd_schedule"): args.dpgd_schedule,
        ("run", "seed"): args.seed, ("run", "device"): args.device,
    }
    if args.arch is not None and args.arch != raw["model"]["arch"]:
        raw["model"]["kwargs"] = {}  # the default architecture's knobs mean nothing to another one
    for (section, key), value in flags.items():
        if value is not None:
            raw[section][key] = value
    if args.amp:
        raw["optim"]["amp"] = True
    if args.no_progress:
        raw["run"]["progress"] = False
    for section, path, value in sets:
        if section != "data":
            _assign(raw, section, path, value, f"{section}.{'.'.join(path)}")
    return from_dict(raw)


def add_tracking_args(p: argparse.ArgumentParser, experiment: str = "dard") -> None:
    p.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)")
    p.add_argument("--experiment", default=experiment, help="MLflow experiment")
    p.add_argument("--no-tracking", action="store_true", help="no MLflow run (nothing to promote afterwards)")


def cmd_train(args: argparse.Namespace) -> int:
    """train-teacher and distill: one training function, different defaults."""
    from dard.engine import validation_summary
    from dard.files import check_destination, is_uri, read_bytes, write_bytes
    from dard.tracking import check_tracking_uri, training_run
    from dard.training import fit

    out = args.out  # a path or a storage URI
    inputs = (getattr(args, "teacher", None), getattr(args, "shards", None))
    if out is not None:
        check_destination(out, what="--out", inputs=inputs)
    if args.run_dir:  # checked as typed: Path() would fold "ftp://x" into "ftp:/x"
        check_destination(args.run_dir, what="--run-dir", kind="folder", inputs=inputs,
                          local_only="it holds the checkpoints, the history and dard.log; --out takes a URI")
    run_dir = (Path(args.run_dir) if args.run_dir else Path(out).with_name(Path(out).stem + "-run")
               if out and not is_uri(out) else Path("runs") / args.command)
    if not args.run_dir:
        check_destination(run_dir, what="--run-dir", kind="folder", inputs=inputs)
    cfg = build_config(args).updated(run={"out_dir": str(run_dir)})
    uri = None if args.no_tracking else check_tracking_uri(args.tracking_uri)
    logs.to_file(cfg.run.out_dir)  # library chatter and warnings: <run dir>/dard.log
    with training_run(cfg, uri, experiment=args.experiment, run_name=f"{args.command} {cfg.loss.method} {cfg.model.arch}",
                      marker=run_dir / "mlflow_run.json", resume=args.resume) as tracked:
        result = fit(cfg, teacher_path=getattr(args, "teacher", None), teacher_arch=getattr(args, "teacher_arch", None),
                     shards=getattr(args, "shards", None), resume=args.resume,
                     on_epoch_end=None if tracked is None else lambda epoch, metrics: tracked.log(metrics, epoch))
        model = result["model_path"]
        if out is not None:
            write_bytes(out, read_bytes(model))
            model = out
        if tracked is not None:
            tracked.finish(model)
    print(f"{cfg.loss.method} {cfg.model.arch} on {cfg.data.dataset}: {validation_summary(cfg, result)}")
    print(f"model: {model}   checkpoints and history: {cfg.run.out_dir}")
    if tracked is not None:
        print(f"MLflow run {tracked.run_id} in {uri} (`dard registry promote --run-id {tracked.run_id} --tracking-uri {uri}`)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import tempfile

    from dard.attacks.registry import PROTOCOL
    from dard.data import load_splits
    from dard.engine import resolve_device
    from dard.evaluate import EvalSettings, evaluate_file
    from dard.files import check_destination, is_uri, upload_folder, within
    from dard.registry import load_reference as load
    from dard.report import write_report

    if args.out_dir:
        out_dir = args.out_dir
    elif args.model.startswith("models:/") or is_uri(args.model):  # beside the caller, not at the URI's path
        out_dir = args.model.split("://", 1)[-1].replace("/", "-").replace("@", "-").strip("-:") + "-eval"
    else:
        out_dir = str(Path(args.model).with_name(Path(args.model).stem + "-eval"))
    check_destination(out_dir, what="--out-dir", kind="folder", inputs=(args.model,))
    mf = load(args.model, args.tracking_uri)
    cfg = mf.run_config(args.data_dir)
    mf.model.to(resolve_device(args.device or "auto"))
    split = getattr(load_splits(cfg.data), args.split)
    settings = EvalSettings.for_config(cfg, eps=args.eps, step_size=args.step_size, limit=args.limit,
                                       attacks=tuple(args.attacks.split(",")) if args.attacks else PROTOCOL,
                                       autoattack_limit=args.aa_limit, seed=args.seed, sanity_checks=not args.no_checks)
    report_dir = out_dir if not is_uri(out_dir) else tempfile.mkdtemp(prefix="dard-eval-")
    logs.to_file(report_dir)
    report = evaluate_file(mf, split.head(settings.limit), settings, name=str(args.model), split=args.split,
                           dataset=cfg.data.dataset, progress=not args.no_progress)  # decodes only what it evaluates
    paths = write_report(report, report_dir)
    if is_uri(out_dir):  # the report written here, then each file to the storage URI
        paths = {k: within(out_dir, Path(v).name) for k, v in zip(paths, upload_folder(report_dir, out_dir))}
    print(f"{mf.arch} ({report.meta['method']}) on {cfg.data.dataset} {args.split}, eps={settings.eps:.4g}:")
    print(report.table())
    print("report: " + ", ".join(str(p) for p in paths.values()))
    if mf.header.get("registry"):  # a registered model: its version gets the numbers, its card the table
        from dard.registry import record_evaluation

        run_id = record_evaluation(args.tracking_uri, mf, report, paths)
        print(f"recorded on {mf.header['registry']}: evaluation run {run_id}, version tags dard.test.*, its card")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export, then run the exported file itself: parity and robustness next to the PyTorch model."""
    import tempfile

    from dard.data import load_splits, to_float
    from dard.evaluate import EvalSettings
    from dard.export import EXPORT_SUFFIXES, ExportError, check_export, export_model, load_export
    from dard.files import check_destination, write_bytes
    from dard.registry import load_reference as load

    bad = [f"{flag}: must be in [0, 1], got {value:g}" for flag, value in (
        ("--tolerance", args.tolerance), ("--min-agreement", args.min_agreement), ("--max-drop", args.max_drop))
        if not 0 <= value <= 1]
    if bad:
        raise ValueError("; ".join(bad))

    out = check_destination(args.out, what="--out", suffixes=EXPORT_SUFFIXES[args.format], inputs=(args.model,))
    mf = load(args.model, args.tracking_uri)
    cfg = mf.run_config(args.data_dir)
    settings = EvalSettings.for_config(cfg, eps=args.eps, limit=args.limit)
    test = load_splits(cfg.data).test.head(settings.limit)
    x, y = to_float(test.images), test.labels
    label = args.format + (" int8" if args.int8 else "")
    with tempfile.TemporaryDirectory() as tmp:
        staged = export_model(mf.model, x[:2], args.format, Path(tmp) / f"model{EXPORT_SUFFIXES[args.format][0]}",
                              int8=args.int8, metadata=export_metadata(mf))  # checked before it is kept
        check = check_export(mf.model, load_export(staged, args.format), x, y, settings, square_limit=args.aa_limit)
        print(f"{mf.arch} on {cfg.data.dataset} test ({check.samples} samples), eps={settings.eps:.4g}, {label}:")
        print(check.table(label))
        problems = check.problems(args.tolerance, int8=args.int8, min_agreement=args.min_agreement,
                                  max_drop=args.max_drop)
        if problems:
            raise ExportError(f"the {label} export differs from the model ({'; '.join(problems)}); nothing written to {out}")
        write_bytes(out, staged.read_bytes())  # a path or a storage URI, atomically
    record = f"{out}.check.json"
    write_bytes(record, json.dumps({"model": str(args.model), "format": args.format, "int8": args.int8,
                                    "eps": settings.eps, **check.to_dict()}, indent=2).encode())
    print(f"export: {out}   check: {record}")
    return 0


def export_metadata(mf) -> dict[str, str]:
    """What an exported file says of itself: class names, the input it takes (shape, [0, 1] range,
    channels, the eps it was trained for), its architecture, dataset and the dard file it came from."""
    return {"dard.classes": json.dumps(mf.classes), "dard.input": json.dumps(mf.input), "dard.arch": mf.arch,
            "dard.dataset": str(mf.dataset), "dard.model_sha256": str(mf.sha256)}


def cmd_shards_inspect(args: argparse.Namespace) -> int:
    from dard.data import load_splits, resolve_section
    from dard.shards import PINNED_DATA, ShardSet, check_fingerprint

    shards = ShardSet.unchecked(args.directory) if args.no_verify else ShardSet.open(args.directory)
    m = shards.manifest
    if not args.no_verify:  # the rows against the split the manifest claims, rebuilt from its own data fields
        data = {k: v for k, v in (m.get("data") or {}).items() if k in PINNED_DATA or k == "data_dir"}
        if data.get("source") or data.get("pool"):
            resolve_section({"dataset": m["dataset"], **data})  # the source is still the one the shards were built from
        claimed = Config.for_dataset(m["dataset"], data=data).data
        if claimed.preset:
            splits = load_splits(claimed)
            shards.check_rows(splits, m["split"], claimed.crop_padding)
        check_fingerprint(shards.directory, m)
    s = shards.summary()
    samples = " + ".join(f"{n} {kind}" for kind, n in s["samples"].items() if n)
    print(f"{s['directory']}: {s['dataset']}/{s['split']}, {samples} samples x {s['views']} views = {s['rows']} rows "
          f"in {s['parts']} parts, {s['bytes'] / 1e6:.2f} MB ({s['bytes_per_row']:.0f} B/row)")
    t = s["teacher"]
    print(f"teacher: {t.get('arch')} sha256 {t.get('sha256')} ({t.get('path')})")
    a = s["attack"] or {}
    print(f"DPGD: eps {a.get('eps'):.5g}, step {a.get('step_size'):.5g}, {a.get('steps')} steps, loss {a.get('dpgd_loss')}, "
          f"schedule {a.get('dpgd_schedule')}")
    print(f"created {s['created']} by dard {s['package_version']}; checks: "
          + ("skipped" if args.no_verify else "manifest, sizes, schema, every unit's digest, "
             + ("rows (each the sample it names)" if claimed.preset else "the source unchanged since") + " all ok"))
    if args.json:
        print(json.dumps(s, indent=2, default=str))
    return 0


def cmd_video(args: argparse.Namespace) -> int:
    from dard.files import check_destination
    from dard.video import make_sample, run_video

    local = "ffmpeg writes a local file; copy it to storage afterwards"
    if args.make_sample:
        clip, labels = make_sample(check_destination(args.out or "sample.mp4", what="--out", suffixes=(".mp4",),
                                                     local_only=local))
        print(f"sample clip: {clip} (labels: {labels})")
        return 0
    if not args.input or not args.model:
        raise ConfigError("dard video needs --input CLIP and --model PATH|models:/NAME@ALIAS (or --make-sample)")
    from dard.registry import load_reference as load

    out = args.out or str(Path(args.input).with_name(Path(args.input).stem + f"-{args.attack}.mp4"))
    check_destination(out, what="--out", suffixes=(".mp4",), local_only=local, inputs=(args.input, args.model))
    mf = load(args.model, args.tracking_uri)
    labels = args.labels
    if labels is None and Path(args.input).with_suffix(".labels.csv").exists():
        labels = str(Path(args.input).with_suffix(".labels.csv"))
    r = run_video(args.input, mf, attack=args.attack, out=out, eps=args.eps, step_size=args.step_size,
                  labels_path=labels)
    eps = r.eps
    print(f"{r.frames} frames, attack {args.attack} (eps {eps:.4g}): flip rate {percent(r.flip_rate)}"
          + (f", accuracy natural {percent(r.natural_accuracy)} -> attacked {percent(r.adversarial_accuracy)}"
             if r.natural_accuracy is not None else ""))
    print(f"video: {r.video}\nper-frame CSV: {r.csv}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from dard.models import available, build, count_parameters

    for name in available():
        print(f"{name:<12} {count_parameters(build(name, 10, 3)):>12,d} parameters (10 classes, RGB)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """The defaults of a preset, or of your own images (listed, their facts pinned, defaults by the
    rule of dard.config.source_defaults), as the YAML `--config` reads."""
    if args.source or args.test_source or args.image_size:
        from dard.data import source_config

        if not args.source:
            raise ConfigError("--test-source and --image-size describe a --source; give it too")
        data = {"source": args.source, "test_source": args.test_source, "image_size": args.image_size}
        cfg = source_config(args.dataset or source_name(args.source), teacher=args.teacher,
                            data={k: v for k, v in data.items() if v is not None})
    else:
        dataset = args.dataset or "digits"
        cfg = teacher_config(dataset) if args.teacher else Config.for_dataset(dataset)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """List a source and decode every image: what a run would find, before it starts."""
    from collections import Counter

    from dard.data import load_splits, resolve_section
    from dard.precompute import index_source

    data = {"dataset": args.dataset or source_name(args.source), "source": args.source, "test_source": args.test_source,
            "image_size": args.image_size, "channels": args.channels, "pool": args.pool}
    cfg = Config.for_dataset(data["dataset"], data=resolve_section({k: v for k, v in data.items() if v is not None}))
    splits = load_splits(cfg.data)
    problems: list[str] = []
    index = index_source(cfg, splits, progress=not args.no_progress, problems=problems) or []
    d = cfg.data
    counts = Counter(splits.train.labels.tolist() + splits.val.labels.tolist()
                     + ([] if d.test_source else splits.test.labels.tolist()))
    print(f"{d.source}: {sum(counts.values())} images in {d.num_classes} classes"
          + (f", test {d.test_source}: {len(splits.test)}" if d.test_source else "")
          + (f", pool {d.pool}: {len(splits.pool)}" if d.pool else ""))
    print("classes: " + ", ".join(f"{name} ({counts.get(i, 0)})" for i, name in enumerate(d.class_names)))
    print(f"stored as {d.shape[0]} x {d.shape[1]} x {d.shape[2]} (channels, height, width)"
          + (f", resized to {d.image_size}" if d.image_size else "") + f"; fingerprint {d.fingerprint}")
    print(f"splits (seed {d.split_seed}): train {len(splits.train)}, validation {len(splits.val)}, test {len(splits.test)}")
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        raise ValueError(f"{len(problems)} of {len(index)} images cannot be used as they are (listed above)")
    print(f"every image decoded: {len(index)} checked, no problem")
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from dard.registry import METRIC, promote, run_config, show
    from dard.tracking import check_tracking_uri

    if args.registry_command == "load":  # the destination before anything is read
        from dard.files import check_destination

        check_destination(args.out, what="--out")
    uri = check_tracking_uri(args.tracking_uri, existing=True)
    if args.registry_command == "promote":
        print(promote(uri, args.run_id, run_config(uri, args.run_id), name=args.name, metric=args.metric).summary())
    elif args.registry_command == "show" and args.name is None:
        from dard.registry import registered

        rows = registered(uri)
        for r in rows:
            value = percent(float(r[METRIC])) if r[METRIC] is not None else "-"
            print(f"{r['name']}: {r['versions']} version(s), champion "
                  + (f"v{r['champion']} ({METRIC} {value})" if r["champion"] else "none"))
        if not rows:
            print(f"no registered model in {uri} (`dard registry promote --run-id RUN` registers one)")
    elif args.registry_command == "show":
        rows = show(uri, args.name)
        print(f"{args.name}:")
        for r in rows:
            value = percent(float(r[METRIC])) if r[METRIC] is not None else "-"
            print(f"  v{r['version']:<4} {METRIC} {value}  aliases={','.join(r['aliases']) or '-'}  "
                  f"promoted={r['promoted']}  champion at registration: {r['champion_at_registration']}  run {r['run_id']}")
    else:  # load
        from dard.models import save_model
        from dard.registry import load_registered

        model, header = load_registered(args.uri if args.uri.startswith("models:/") else f"models:/{args.uri}", uri)
        save_model(args.out, model, arch=header["arch"], num_classes=header["num_classes"],
                   in_channels=header["in_channels"], dataset=header["dataset"], arch_kwargs=header["arch_kwargs"],
                   meta=header["meta"], classes=header.get("classes"), input=header.get("input"))
        print(f"{args.uri} -> {args.out} ({header['arch']}, {header['dataset']})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import os

    from dard.tracking import check_tracking_uri, client

    uri = check_tracking_uri(args.tracking_uri)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
               "--port", str(args.port)]
    base = f"http://{args.host}:{args.port}"
    experiment = client(uri)[0].get_experiment_by_name(args.experiment)
    # MLflow 3 opens an experiment on its GenAI overview; a training's runs are the runs tab
    where = f"{base}/#/experiments/{experiment.experiment_id}/runs" if experiment else f"{base}/#/models"
    print(f"MLflow UI: {where} (runs of {args.experiment!r}; registered models: {base}/#/models; store {uri}); "
          "Ctrl+C to stop")
    os.execv(sys.executable, command)
    return 0


def _train_teacher_command(sub) -> None:
    p = sub.add_parser("train-teacher", help="adversarially train a teacher (TRADES, SAT) in one process; "
                                             "defaults: the dataset's teacher recipe (`dard config --teacher`)")
    add_config_args(p, method_default=None, methods=("natural", "sat", "trades"))
    p.add_argument("--out", help="also copy the model file here (it is always <run dir>/model.pt)")
    p.add_argument("--run-dir", help="checkpoints, history, model.pt, dard.log (default: runs/train-teacher, or "
                                     "<out stem>-run/ beside --out)")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's last checkpoint (and its MLflow run)")
    add_tracking_args(p)
    p.set_defaults(func=cmd_train)


def _distill_command(sub) -> None:
    p = sub.add_parser("distill", help="train a student from a teacher (DARD, RSLAD, ARD) or a baseline")
    add_config_args(p, method_default="dard", methods=METHODS)
    p.add_argument("--teacher", help="teacher model file (dard file, or a bare state dict with --teacher-arch)")
    p.add_argument("--teacher-arch", help="architecture of a bare-state-dict teacher, e.g. wrn34_10")
    p.add_argument("--shards", help="train from precomputed soft-label shards (`dard precompute`) instead of "
                                    "running the teacher; with --teacher too, the shards must come from it")
    p.add_argument("--out", help="also copy the model file here (it is always <run dir>/model.pt)")
    p.add_argument("--run-dir", help="checkpoints, history, model.pt, dard.log (default: runs/distill, or <out stem>-run/ "
                                     "beside --out)")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's last checkpoint (and its MLflow run)")
    add_tracking_args(p)
    p.set_defaults(func=cmd_train)


def _evaluate_command(sub) -> None:
    p = sub.add_parser("evaluate", help="robustness report: natural, FGSM, PGD-20, BIM, T-PGD, CW, DPGD, AutoAttack")
    p.add_argument("--model", required=True, help="dard model file, or models:/NAME@ALIAS from the MLflow registry")
    p.add_argument("--tracking-uri", help="MLflow store for models:/ URIs (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--data-dir")
    p.add_argument("--attacks", help=f"comma list (default: all): {','.join(EVAL_ATTACKS)}")
    p.add_argument("--limit", type=count(), help="evaluate the first N samples")
    p.add_argument("--aa-limit", type=count(), default=500, help="Square and AutoAttack on the first N samples")
    p.add_argument("--eps", type=pixel_value, help="L-inf radius on [0,1] pixels (default: the model's training eps)")
    p.add_argument("--step-size", type=pixel_value, help="attack step on [0,1] pixels (default: the model's training step)")
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("--device")
    p.add_argument("--no-checks", action="store_true", help="skip the sanity checks")
    p.add_argument("--out-dir", help="report folder (default: <model stem>-eval/)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)


def _export_command(sub) -> None:
    p = sub.add_parser("export", help="export a model (torch.export .pt2, ONNX, TorchScript; ONNX int8) and re-check "
                                      "parity and robustness on the exported file itself, run by its own runtime")
    p.add_argument("--model", required=True, help="dard model file, or models:/NAME@ALIAS from the MLflow registry")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="pt2",
                   help="pt2 (torch.export), onnx (ONNX Runtime; needs dard[export]), torchscript (deprecated by PyTorch)")
    p.add_argument("--int8", action="store_true", help="with --format onnx: int8 weights (ONNX Runtime dynamic "
                                                        "quantisation), kept only within --min-agreement and --max-drop")
    p.add_argument("--out", required=True, help="the exported file (written only if the re-check passes)")
    p.add_argument("--tracking-uri")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=count(), default=500, help="test samples for parity and PGD-20 transfer")
    p.add_argument("--aa-limit", type=count(), default=100, help="test samples for the Square attack through each model")
    p.add_argument("--eps", type=pixel_value, help="L-inf radius on [0,1] pixels (default: the model's training eps)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |delta logit| accepted (float exports)")
    p.add_argument("--min-agreement", type=float, default=0.99, help="int8: least fraction of predictions that must agree")
    p.add_argument("--max-drop", type=float, default=0.02, help="int8: most accuracy (a fraction) it may lose, natural, "
                                                                "PGD-20 transfer or Square")
    p.set_defaults(func=cmd_export)


def _shards_command(sub) -> None:
    p = sub.add_parser("shards", help="soft-label shards: `dard shards inspect DIR`")
    shards_sub = p.add_subparsers(dest="shards_command", required=True)
    q = shards_sub.add_parser("inspect", help="manifest summary, rows, bytes, teacher, checks")
    q.add_argument("directory")
    q.add_argument("--no-verify", action="store_true", help="skip checksums")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_shards_inspect)


def _video_command(sub) -> None:
    p = sub.add_parser("video", help="classify a clip natural vs attacked: annotated side-by-side MP4 + CSV")
    p.add_argument("--input", help="video file")
    p.add_argument("--model", help="dard model file or models:/NAME@ALIAS")
    p.add_argument("--attack", choices=[a for a in EVAL_ATTACKS if a != "autoattack"], default="dpgd20",
                   help="the attacked panel (natural: none)")
    p.add_argument("--out", help="output MP4 (with --make-sample: the sample clip to write)")
    p.add_argument("--labels", help="CSV with frame,label (default: <input>.labels.csv if present)")
    p.add_argument("--eps", type=pixel_value, help="L-inf radius on [0,1] pixels (default: the model's training eps)")
    p.add_argument("--step-size", type=pixel_value)
    p.add_argument("--tracking-uri")
    p.add_argument("--make-sample", action="store_true", help="write a small clip of digits test images")
    p.set_defaults(func=cmd_video)


def _registry_command(sub) -> None:
    p = sub.add_parser("registry", help="MLflow model registry: promote | show | load")
    rs = p.add_subparsers(dest="registry_command", required=True)
    q = rs.add_parser("promote", help="register a run's model; move 'champion' only if it is better")
    q.add_argument("--tracking-uri")
    q.add_argument("--run-id", required=True)
    q.add_argument("--metric", type=float, help="validation robust accuracy, in [0, 1] (default: the run's at the "
                                                "epoch its model holds)")
    q.add_argument("--name", help="default dard-<dataset>-<arch>")
    q = rs.add_parser("show", help="versions with metrics and aliases (without NAME: every registered model)")
    q.add_argument("--tracking-uri")
    q.add_argument("name", nargs="?", help="a registered model (default: list them all)")
    q = rs.add_parser("load", help="export a registered model to a dard model file")
    q.add_argument("--tracking-uri")
    q.add_argument("uri", help="NAME@ALIAS, NAME/VERSION or models:/...")
    q.add_argument("--out", required=True)
    p.set_defaults(func=cmd_registry)


def cmd_lineage(args: argparse.Namespace) -> int:
    """A model walked back: its run, data, shards, teacher and the teacher's run."""
    from dard.registry import load_reference, walk
    from dard.tracking import check_tracking_uri, client

    store, _ = client(check_tracking_uri(args.tracking_uri, existing=args.model.startswith("models:/")))
    print("\n".join(walk(load_reference(args.model, args.tracking_uri), store)))
    return 0


def _lineage_command(sub) -> None:
    p = sub.add_parser("lineage", help="what a model was made from: run, data, shards, teacher and its run")
    p.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a dard model file")
    p.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.set_defaults(func=cmd_lineage)


def _ui_command(sub) -> None:
    p = sub.add_parser("ui", help="open the MLflow dashboard on the tracking store")
    p.add_argument("--tracking-uri")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=count(1, 65535), default=5000)
    p.add_argument("--experiment", default="dard", help="the experiment whose runs the printed address opens")
    p.set_defaults(func=cmd_ui)


def _models_command(sub) -> None:
    p = sub.add_parser("models", help="list architectures")
    p.set_defaults(func=cmd_models)


def _config_command(sub) -> None:
    p = sub.add_parser("config", help="print a dataset's default run config as YAML (a preset's, or your images')")
    p.add_argument("--dataset", help=f"a preset ({', '.join(DATASETS)}; default digits), or the name of --source")
    p.add_argument("--source", help="your images (folder:PATH or table:PATH): listed, their facts pinned, defaults "
                                    "chosen by their size and channels (docs/design.md §8)")
    p.add_argument("--test-source")
    p.add_argument("--image-size", type=image_size, metavar="H,W")
    p.add_argument("--teacher", action="store_true", help="the teacher recipe (what train-teacher trains) instead")
    p.set_defaults(func=cmd_config)


def _data_command(sub) -> None:
    p = sub.add_parser("data", help="your own images: `dard data check SOURCE`")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("check", help="list a source and decode every image: classes, counts, size, problems")
    q.add_argument("source", help="folder:PATH or table:PATH (local, s3://, gs://)")
    q.add_argument("--dataset", help="its name (default: the folder's or table's)")
    q.add_argument("--test-source")
    q.add_argument("--pool", help="a pool of images without labels, checked against validation and test")
    q.add_argument("--image-size", type=image_size, metavar="H,W", help="resize to H,W (else every image must match the first)")
    q.add_argument("--channels", type=int, choices=(1, 3), help="convert to grey (1) or RGB (3)")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_data_check)


# the subcommands in `dard --help` order; None: where the entry points' commands go
SUBCOMMANDS = [_train_teacher_command, _distill_command, _evaluate_command, _export_command, _shards_command, None,
               _video_command, _registry_command, _lineage_command, _ui_command, _models_command, _config_command,
               _data_command]


def make_parser(registrars: list | None = None) -> argparse.ArgumentParser:
    """The CLI: one parser per subcommand, in the order of ``SUBCOMMANDS``. ``registrars`` add
    subcommands (``register(subparsers)``); None: those of the installed ``dard.commands`` entry
    points (cluster/ and tuning/; dard/ never imports them)."""
    from dard import __version__

    parser = Parser(prog="dard", description="Dice Adversarial Robustness Distillation")
    parser.add_argument("--version", action="version", version=f"dard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        if add is None:  # where the entry points' commands go (demo, train, precompute, sweep, ...)
            for register in registrars if registrars is not None else [ep.load() for ep in
                                                                        entry_points(group="dard.commands")]:
                register(sub)
        else:
            add(sub)
    _show_defaults(parser)
    return parser


# The help of options many subcommands share, said once (an option's own help= wins).
COMMON_HELP = {
    "--epochs": "training epochs", "--batch-size": "global batch (split over DDP workers)",
    "--lr": "peak learning rate (SGD)", "--step-size": "attack step on [0,1] pixels, e.g. 2/255",
    "--divergence": "distillation divergence: kl, or dice", "--dpgd-loss": "DPGD's inner loss",
    "--dpgd-schedule": "DPGD's step-size schedule", "--seed": "run seed (weights, shuffles, attack starts)",
    "--tracking-uri": "MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)",
    "--data-dir": "a preset's local files: CIFAR's folder or Fashion-MNIST's IDX files",
    "--device": "auto (default: CUDA when there is one), cpu, cuda, cuda:N", "--no-progress": "no progress bars or lines",
    "--split": "which split", "--test-source": "a fixed test set of your own (folder:PATH or table:PATH)",
    "--image-size": "resize every image to H,W (or N,N)", "--address": "Ray cluster (auto, ray://host:10001); "
    "default: RAY_ADDRESS or a local Ray", "--out": "where to write it", "--json": "also print it as JSON",
    "--run-id": "the MLflow run", "--host": "address to listen on (keep loopback unless it is behind a proxy "
    "with authentication)", "--port": "port to listen on", "--experiment": "MLflow experiment",
    "--workers": "DDP workers", "--run-dir": "run folder: dard.log, the default storage path",
    "--trials": "trials (sampled points)", "--workers-per-trial": "DDP workers of each trial",
    "--teacher-epochs": "the teacher's epochs", "--student-epochs": "each student's epochs",
    "directory": "a shard folder (path or URI)",
}


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option has a help (its own, or ``COMMON_HELP``'s), and every option with a default says
    it in ``--help`` (none for flags and unset options)."""
    for action in parser._actions:
        if not action.help and action.help is not argparse.SUPPRESS:
            name = action.option_strings[-1] if action.option_strings else action.dest
            action.help = COMMON_HELP.get(name)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)
        elif action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                and action.default != [] and "%(default)" not in (action.help or "") \
                and "default" not in (action.help or ""):
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so ``finally`` blocks run (runs closed, nothing half-written)."""


_SIGTERM_RECEIVED: list[bool] = []  # libraries (Ray Train's fit) may re-raise our Terminated as a plain KeyboardInterrupt


def _on_sigterm(signum, frame):  # noqa: ARG001
    _SIGTERM_RECEIVED.append(True)
    raise Terminated()


def _expected(err: BaseException) -> bool:
    """Errors about the user's input or environment (one line) rather than a bug (traceback).
    (Ray's errors are converted where Ray is called: ``cluster.ray_session.owns_ray``.)"""
    # the tracking store's errors (MLflow's, and its database's: a full disk, a locked file), and
    # those of the tools dard wraps (pyarrow's filesystems, ONNX Runtime): their reason, in one line
    stores = tuple(cls for module, name in (("mlflow.exceptions", "MlflowException"), ("sqlalchemy.exc", "SQLAlchemyError"),
                                            ("pyarrow.lib", "ArrowException"),
                                            ("onnxruntime.capi.onnxruntime_pybind11_state", "Fail"),
                                            ("onnxruntime.capi.onnxruntime_pybind11_state", "InvalidArgument"))
                   if (cls := getattr(sys.modules.get(module), name, None)) is not None)
    return isinstance(err, (ValueError, RuntimeError, OSError, FloatingPointError, ImportError, *stores))


def main(argv: list[str] | None = None, registrars: list | None = None) -> int:
    """Run a subcommand. Expected failures print one line ``dard CMD: error: ...`` and exit 2
    (the traceback with --verbose); Ctrl-C exits 130 and SIGTERM 143, after cleaning up.
    ``registrars``: see :func:`make_parser`."""
    import signal

    parser = make_parser(registrars)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a bad argument (2, its one line printed)
        return stop.code if isinstance(stop.code, int) else 2
    logs.setup(args.verbose)
    if not args.verbose:  # MLflow's INFO lines (table creation, migrations) and artifact bars are not the user's business
        import os

        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        logging.getLogger("mlflow").setLevel(logging.ERROR)  # if it was imported already
    _SIGTERM_RECEIVED.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated) or bool(_SIGTERM_RECEIVED)
        detail = str(err) or ("finished epochs and parts are kept; the same command continues them (with --resume "
                              "for train-teacher, distill and sweep)")
        print(f"dard {args.command}: {'terminated' if terminated else 'interrupted'}: {detail}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as err:  # noqa: BLE001 -- the one top-level handler
        if not _expected(err) or args.verbose:
            raise
        print(f"dard {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run() -> None:
    """The ``dard`` command: :func:`main`, then the process's exit. After Ctrl-C or SIGTERM, Ray is
    not shut down: threads may still be using it (a Ray Train fit waits in a thread of its own),
    and shutting Ray down under them ended the process -11 or 1 instead of 130
    (ray-project/ray#31145). By then the command has closed its runs and printed its line,
    so it ends without Python's teardown, its logs flushed; a Ray it started goes down with it
    (Ray's processes share their driver's fate)."""
    code = main()
    ray = sys.modules.get("ray")
    if code in (130, 143) and ray is not None and ray.is_initialized():
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
