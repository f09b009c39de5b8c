"""`dard demo`: the whole system on the embedded digits (or Fashion-MNIST), in one go, on a laptop.

Stages (each reused on a re-run unless ``--fresh``; each shows progress):
1. a robust teacher (the dataset's recipe in ``dard.config.TEACHER_DEFAULTS`` within the demo's
   budget: on digits cnn_medium for 15 epochs; ``DATASET_BUDGETS`` for others), cached by recipe
   in ``~/.cache/dard/teachers`` (``DARD_CACHE``) and verified by sha256 before reuse
2. teacher soft labels on natural + DPGD views -> Arrow shards (Ray tasks)
3. the DARD student with Ray Train, 2 DDP workers, from the shards
4. a SAT student, same architecture, epochs, workers and data (the baseline at equal budget)
5. the full attack suite on the test split for the DARD and SAT students (AutoAttack standard,
   the headline); the teacher without AutoAttack unless ``--teacher-aa``
6. MLflow: a run per model with metrics and reports; the DARD student registered as
   ``dard-<dataset>-<arch>`` (champion only if it beats the current one)
7. a side-by-side table, and where the MLflow UI, shards and checkpoints are
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.precompute import precompute
from cluster.train import train_distributed
from dard.attacks.registry import AUTOATTACK, PROTOCOL
from dard.config import Config, teacher_config
from dard.data import load_splits, resolve_section
from dard.engine import validation_summary
from dard.evaluate import EvalSettings, Report, evaluate_file
from dard.logs import LOG_FILE
from dard.modelfile import from_file
from dard.models import file_sha256
from dard.registry import load_reference, promote, record_evaluation
from dard.report import write_report
from dard.shards import ShardError, ShardSet
from dard.tracking import EpochLogger, check_tracking_uri, log_model, log_report_artifacts
from dard.training import fit, open_shards

log = logging.getLogger("dard")


@dataclass
class DemoSettings:
    out: str = "runs/demo"
    dataset: str = "digits"
    source: str | None = None  # your images (folder:PATH or table:PATH): the demo runs on them
    data_dir: str | None = None
    teacher_arch: str = "cnn_medium"
    teacher_epochs: int = 15
    teacher_aa: bool = False  # AutoAttack on the teacher too (minutes on a CPU)
    student_epochs: int = 12
    workers: int = 2
    views: int = 2
    aa_limit: int = 200
    eval_limit: int | None = None  # test samples for the attack suite (None: all)
    val_limit: int | None = None  # validation samples per epoch (None: the dataset's run.eval_limit)
    limit_train: int | None = None
    tracking_uri: str | None = None
    fresh: bool = False
    address: str | None = None

    @classmethod
    def for_dataset(cls, dataset: str = "digits", **kw) -> "DemoSettings":
        """The demo's budget for ``dataset`` (``DATASET_BUDGETS``; a source of yours: ``SOURCE_BUDGET``),
        ``kw`` on top."""
        budget = SOURCE_BUDGET if kw.get("source") else DATASET_BUDGETS.get(dataset, {})
        return cls(**{"dataset": dataset, **budget, **kw})

    def data(self) -> dict:
        """The data section of every config the demo builds (a source resolved once, here)."""

        data = {"limit_train": self.limit_train, "data_dir": self.data_dir}
        if self.source:
            data = resolve_section({**data, "dataset": self.dataset, "source": self.source})
        return data

    @classmethod
    def quick(cls, dataset: str = "digits", **kw) -> "DemoSettings":
        """Minutes -> about a minute: for the test suite and a first look."""
        return cls.for_dataset(dataset, **{"teacher_epochs": 3, "student_epochs": 2, "aa_limit": 10, "eval_limit": 60,
                                           "val_limit": 100, "limit_train": 512, **kw})

# Fashion-MNIST on a CPU: 70k images of 28x28 cost ~50x a digits epoch, so the demo trains on a
# subset and evaluates a slice; benchmarks/results/grid-fashion-mnist.md has the full protocol.
DATASET_BUDGETS = {
    "fashion-mnist": {"teacher_arch": "cnn_small", "teacher_epochs": 10, "student_epochs": 8, "limit_train": 6000,
                      "eval_limit": 1000, "val_limit": 500, "aa_limit": 200},
}
# Your own images: at most 6,000 of them train in the demo (all of them with `dard train`), the
# teacher on cnn_medium (its architecture by the rule of dard.config.source_teacher: --teacher-arch).
SOURCE_BUDGET = {"teacher_arch": "cnn_medium", "teacher_epochs": 10, "student_epochs": 8, "limit_train": 6000,
                 "eval_limit": 1000, "val_limit": 500, "aa_limit": 200}


def _stage(number: int, text: str) -> float:
    print(f"[{number}/7] {text}", flush=True)
    return time.time()


def _done(started: float, detail: str = "") -> None:
    print(f"      done in {time.time() - started:.0f} s{': ' + detail if detail else ''}", flush=True)


def teacher_cache_dir() -> Path:
    return Path(os.environ.get("DARD_CACHE") or Path.home() / ".cache" / "dard") / "teachers"


def _cached_teacher(cfg: Config, fresh: bool) -> tuple[Path, str]:
    """The teacher for ``cfg``'s recipe: reused from the cache when its sha256 checks, else trained.

    Returns (model path, what happened). The cache key is the recipe (every config field but
    the output folder), so another recipe never reuses this teacher."""

    recipe = {k: v for k, v in cfg.to_dict().items() if k != "run"} | {"seed": cfg.run.seed}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    folder = teacher_cache_dir() / f"{cfg.data.dataset}-{cfg.model.arch}-{key}"
    model, record = folder / "model.pt", folder / "model.sha256"
    if not fresh and model.exists() and record.exists():
        if file_sha256(model) == record.read_text().strip():
            return model, f"reused {model} (sha256 verified)"
        log.warning("cached teacher %s does not match its sha256; training it again", model)
    cfg = cfg.updated(run={"out_dir": str(folder)})
    fit(cfg, resume=not fresh)  # an interrupted demo continues the teacher from its checkpoint
    record.write_text(file_sha256(model) + "\n")
    return model, f"trained {model}"


def _previous_report(folder: Path, stem: str, sha256: str, settings: EvalSettings):
    """(report, its files) from an earlier run when it was made of this very model file with these
    settings (evaluation is deterministic: it would give the same numbers); else None."""
    try:
        report = Report.from_dict(json.loads((folder / f"{stem}.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if report.meta.get("model_sha256") != sha256 or report.settings != json.loads(json.dumps(asdict(settings))):
        return None
    return report, {p.name: p for p in folder.glob(f"{stem}*") if p.name.startswith((f"{stem}.", f"{stem}-"))}


def run_demo(s: DemoSettings) -> dict:
    """The demo's seven stages (module docstring); returns the table, the reports, the promotion."""
    out = Path(s.out).absolute()
    if s.fresh and out.exists():
        for child in out.iterdir():  # all but the log this run is writing
            if child.is_dir():
                shutil.rmtree(child)
            elif child.name != LOG_FILE:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    uri = check_tracking_uri(s.tracking_uri)
    data = s.data()
    validation = {"eval_limit": s.val_limit} if s.val_limit else {}
    teacher_path = _teacher_stage(s, data, validation)
    student_cfg = Config.for_dataset(s.dataset, data=data, optim={"epochs": s.student_epochs},
                                     run={**validation, "out_dir": str(out / "dard")})
    shards = _shards_stage(s, out, student_cfg, teacher_path)
    students = {method: _student_stage(s, out, number, method, data, validation, shards, uri)
                for number, method in ((3, "dard"), (4, "sat"))}
    reports = _attack_stage(s, out, student_cfg, {"teacher": teacher_path, "DARD": students["dard"][0],
                                                   "SAT": students["sat"][0]})
    promotion = _mlflow_stage(out, uri, students, reports)
    _stage(7, "results")
    table = side_by_side({k: v[0] for k, v in reports.items()}, student_cfg.attack.eps)
    print(table)
    warnings = [f"{name}: {c.name}: {c.detail}" for name, (r, _) in reports.items() for c in r.warnings]
    if warnings:
        print("sanity-check warnings:\n  " + "\n  ".join(warnings))
    print(f"\nMLflow UI:    dard ui --tracking-uri {uri}   (or: mlflow ui --backend-store-uri {uri})")
    print(f"registry:     dard registry show {promotion.name} --tracking-uri {uri}")
    print(f"shards:       dard shards inspect {shards.directory}")
    print(f"checkpoints:  {out / 'ray'} (Ray Train), students {out}/{{dard,sat}}/model.pt, teacher {teacher_path}")
    print(f"reports:      {out / 'reports'}/*.html")
    print(f"log:          {out / LOG_FILE} (library messages; --verbose shows them here)")
    (out / "results.md").write_text(table + "\n")
    return {"out": str(out), "tracking_uri": uri, "table": table, "reports": {k: v[0].to_dict() for k, v in reports.items()},
            "promotion": promotion.__dict__, "warnings": warnings}


def _teacher_stage(s: DemoSettings, data: dict, validation: dict) -> Path:
    teacher_cfg = teacher_config(s.dataset, data=data, model={"arch": s.teacher_arch}, optim={"epochs": s.teacher_epochs},
                                 run=validation)
    t = _stage(1, f"robust teacher: {teacher_cfg.loss.method.upper()} {teacher_cfg.model.arch} on {s.dataset}, "
                  f"{teacher_cfg.optim.epochs} epochs")
    teacher_path, what = _cached_teacher(teacher_cfg, s.fresh)
    _done(t, what)
    return teacher_path


def _shards_stage(s: DemoSettings, out: Path, student_cfg: Config, teacher_path: Path) -> ShardSet:
    """The teacher's shards, reused when they are this teacher's; checked once, for both students."""
    shards = out / "shards"
    t = _stage(2, f"teacher soft labels on natural + DPGD views ({s.views} per sample) -> Arrow shards, Ray tasks")
    try:
        if ShardSet.open(str(shards), full=False).manifest["teacher"].get("sha256") != file_sha256(teacher_path):
            raise ShardError("made by another teacher")
        _done(t, f"reused {shards}")
    except ShardError:
        shutil.rmtree(shards, ignore_errors=True)
        for method in ("dard", "sat"):  # students (and checkpoints) of other shards are not this run's
            (out / method / "model.pt").unlink(missing_ok=True)
            shutil.rmtree(out / "ray" / f"demo-{method}", ignore_errors=True)
        result = precompute(student_cfg, teacher_path, str(shards), views=s.views, rows_per_part=512,
                            address=s.address)
        _done(t, f"{result.manifest['rows']} rows in {len(result.manifest['parts'])} parts, {shards}")
    return open_shards(str(shards), student_cfg)


def _student_stage(s: DemoSettings, out: Path, number: int, method: str, data: dict, validation: dict,
                   shards: ShardSet, uri: str) -> tuple[Path, Config, EpochLogger]:
    cfg = Config.for_dataset(s.dataset, data=data, loss={"method": method}, optim={"epochs": s.student_epochs},
                             run={**validation, "out_dir": str(out / method)})
    label = "DARD" if method == "dard" else "SAT (baseline, same budget)"
    knobs = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in cfg.model.kwargs.items())
    t = _stage(number, f"{label} student {cfg.model.arch}{f' ({knobs})' if knobs else ''}: Ray Train, {s.workers} DDP "
                       f"workers, {s.student_epochs} epochs")
    model_path = out / method / "model.pt"
    logger = EpochLogger({"uri": uri, "experiment": "dard-demo", "run_name": f"demo-{method}"}, cfg)
    if model_path.exists():
        _done(t, f"reused {model_path}")
        logger.log(json.loads(Path(out / method / "final_metrics.json").read_text()), s.student_epochs - 1)
    else:
        result = train_distributed(cfg, shards, workers=s.workers, name=f"demo-{method}", storage_path=str(out / "ray"),
                                   address=s.address, tracking={"uri": uri, "run_id": logger.run_id}, out=str(model_path))
        Path(out / method / "final_metrics.json").write_text(json.dumps(result.metrics))
        _done(t, validation_summary(cfg, result.metrics))
    return model_path, cfg, logger


def _attack_stage(s: DemoSettings, out: Path, student_cfg: Config, models: dict[str, Path]) -> dict:
    """The protocol on the test split for each model (the teacher's AutoAttack only on request);
    a report of the same model file and settings is reused. Returns name -> (report, its files)."""
    t = _stage(5, "the attack suite on the test split: " + ", ".join(PROTOCOL)
               + ("" if s.teacher_aa else " (the teacher without AutoAttack; --teacher-aa adds it)"))
    test = load_splits(student_cfg.data).test.head(s.eval_limit)
    reports, reused = {}, []
    for name, path in models.items():
        attacks = PROTOCOL if name != "teacher" or s.teacher_aa else tuple(a for a in PROTOCOL if a != AUTOATTACK)
        settings = EvalSettings.for_config(student_cfg, attacks=attacks, limit=s.eval_limit, autoattack_limit=s.aa_limit)
        previous = _previous_report(out / "reports", name.lower(), file_sha256(path), settings)
        if previous is not None:
            reports[name] = previous
            reused.append(name)
            continue
        report = evaluate_file(from_file(str(path)), test, settings, name=name, split="test", dataset=s.dataset)
        reports[name] = (report, write_report(report, out / "reports", stem=name.lower()))
    _done(t, (f"reused the reports of {', '.join(reused)} (same model files, same settings); " if reused else "")
          + f"reports in {out / 'reports'}")
    return reports


def _mlflow_stage(out: Path, uri: str, students: dict, reports: dict):
    t = _stage(6, f"MLflow ({uri}): metrics, reports, models; register the DARD student")
    for method, label in (("dard", "DARD"), ("sat", "SAT")):
        path, cfg, logger = students[method]
        report, paths = reports[label]
        log_report_artifacts(logger.run_id, paths, uri, metrics=report.accuracy)
        log_model(logger.run_id, path, tracking_uri=uri)
        logger.close()
    promotion = promote(uri, students["dard"][2].run_id, students["dard"][1])  # the held epoch's metric
    if not promotion.already_registered:  # its test-split numbers on the version and its card, as `dard evaluate` does
        registered = load_reference(f"models:/{promotion.name}/{promotion.version}", uri)
        record_evaluation(uri, registered, *reports["DARD"])
    _done(t, promotion.summary())
    return promotion


def side_by_side(reports: dict, eps: float) -> str:
    """Accuracy per attack (rows) and model (columns); "—" where a model was not attacked so."""
    names = list(reports)
    attacks = [a for a in PROTOCOL if any(a in r.accuracy for r in reports.values())]
    head = f"{'accuracy (%)':<13}" + "".join(f"{n:>10}" for n in names)
    lines = [head, "-" * len(head)]
    for a in attacks:
        lines.append(f"{a:<13}" + "".join(f"{100 * reports[n].accuracy[a]:>10.1f}" if a in reports[n].accuracy
                                          else f"{'—':>10}" for n in names))
    n = {r.samples["natural"] for r in reports.values()}.pop()
    aa = {name: r.samples[AUTOATTACK] for name, r in reports.items() if AUTOATTACK in r.samples}
    note = f"test split, eps {eps:g}, {n} samples"
    if aa:
        note += f"; AutoAttack (standard) on the first {set(aa.values()).pop()}"
        if len(aa) < len(reports):
            note += f", not run on {', '.join(k for k in reports if k not in aa)}"
    lines.append(f"({note})")
    return "\n".join(lines)
