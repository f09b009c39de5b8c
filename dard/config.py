"""Every knob of a run as typed dataclasses: paper defaults, dataset defaults, validation, YAML.

The one place configuration lives. The CLI, the Ray job entrypoints and the Tune sweep all build
a :class:`Config` and hand it to the same functions; nothing parses options twice.

Pixel values are in [0, 1]; ``eps`` and ``step`` are on that scale (8/255 for CIFAR).
"""
from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

# Each dataset's facts: (classes, image shape (C, H, W)); read them through DataConfig.
DATASET_FACTS = {"digits": (10, (1, 8, 8)), "fashion-mnist": (10, (1, 28, 28)), "cifar10": (10, (3, 32, 32)),
                 "cifar100": (100, (3, 32, 32))}
# The choices, as types: fields declare them, the checker, argparse and the search space read them.
Dataset = Literal["digits", "fashion-mnist", "cifar10", "cifar100"]
Method = Literal["natural", "sat", "trades", "dard", "ard", "rslad"]
Divergence = Literal["kl", "dice"]
DpgdLoss = Literal["dice", "ce", "dice+ce", "cw"]
StepSchedule = Literal["constant", "cosine", "apgd"]
LrSchedule = Literal["multistep", "cosine", "onecycle", "constant"]
RobTarget = Literal["teacher_nat", "self", "teacher_adv", "label"]
DATASETS, METHODS, DIVERGENCES = get_args(Dataset), get_args(Method), get_args(Divergence)
DPGD_LOSSES, STEP_SCHEDULES = get_args(DpgdLoss), get_args(StepSchedule)
LR_SCHEDULES, ROB_TARGETS = get_args(LrSchedule), get_args(RobTarget)
TEACHER_METHODS = METHODS[:3]
DISTILL_METHODS = METHODS[3:]
# The evaluation protocol's attacks, in report order (here, without torch, for the CLI's help);
# their functions are dard.attacks.registry.ATTACKS, which checks that it has exactly these.
EXPORT_FORMATS = ("pt2", "onnx", "torchscript")  # `dard export --format` (dard.export)
EVAL_ATTACKS = ("natural", "fgsm", "pgd20", "bim10", "tpgd10", "cw20", "dpgd20", "square", "autoattack")


def unknown(value: Any, choices, what: str = "") -> str:
    """The one wording of a value that is not among ``choices``."""
    return f"unknown {what + ' ' if what else ''}{value!r} (choose from {', '.join(map(str, choices))})"


class ConfigError(ValueError):
    """An invalid configuration; the message names every invalid field (``section.key: why``)."""


@dataclass(frozen=True)
class Range:
    """A numeric bound, declared on a field as ``Annotated[float, Range(0, 1)]``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, v: float) -> str | None:
        too_low = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        too_high = self.high is not None and (v >= self.high if self.high_open else v > self.high)
        if not (too_low or too_high):
            return None
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {self.low:g}, got {v:g}"
        return (f"must be in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
                f", got {v:g}")


@dataclass(frozen=True)
class Architecture:
    """Marks a field naming a registered model (``dard models``); the registry is read when checked."""

    def problem(self, v: str) -> str | None:
        from dard.models import available  # local: models import config-free code only

        return None if v in available() else unknown(v, available(), "architecture")


Positive = Annotated[float, Range(0, low_open=True)]
NonNegative = Annotated[float, Range(0)]
Fraction01 = Annotated[float, Range(0, 1, low_open=True, high_open=True)]
Count = Annotated[int, Range(1)]


def check_value(name: str, value: Any, hint: Any) -> tuple[Any, list[str]]:
    """``value`` checked against the type ``hint`` (Literal, Annotated with :class:`Range`, Optional,
    ``tuple[X, ...]``, ``dict``, bool, int, float, str); returns (the value as the field holds it --
    YAML lists as tuples, ints as floats where floats are declared --, problems as ``name: why``)."""
    bounds = []
    if get_origin(hint) is Annotated:
        hint, *bounds = get_args(hint)
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None, []
        (hint,) = [a for a in args if a is not type(None)]
        return check_value(name, value, Annotated[(hint, *bounds)] if bounds else hint)
    if origin is Literal:
        return value, [] if value in args else [f"{name}: {unknown(value, args)}"]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return value, [f"{name}: expected a list, got {value!r}"]
        checked = [check_value(f"{name}[{i}]", v, Annotated[(args[0], *bounds)] if bounds else args[0])
                   for i, v in enumerate(value)]
        return tuple(v for v, _ in checked), [p for _, ps in checked for p in ps]
    if origin is dict or hint is dict:
        return value, [] if isinstance(value, dict) else [f"{name}: expected a mapping, got {value!r}"]
    if hint is bool:
        return value, [] if isinstance(value, bool) else [f"{name}: expected true/false, got {value!r}"]
    if hint is str:
        if not isinstance(value, str):
            return value, [f"{name}: expected a string, got {value!r}"]
        return value, [f"{name}: {p}" for p in (b.problem(value) for b in bounds) if p]
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and not isinstance(value, int)):
            return value, [f"{name}: expected {'an integer' if hint is int else 'a number'}, got {value!r}"]
        if not math.isfinite(value):
            return value, [f"{name}: must be a finite number, got {value}"]
        value = float(value) if hint is float else value
        return value, [f"{name}: {p}" for p in (r.problem(value) for r in bounds) if p]
    raise TypeError(f"{name}: no rule for type {hint!r}")  # a field declared with a type this checker lacks


def field_hints(section_cls: type) -> dict[str, Any]:
    """A section's field types, ``Annotated`` bounds kept."""
    return get_type_hints(section_cls, include_extras=True)


@dataclass(frozen=True)
class DataConfig:
    """Dataset, split and augmentation.

    ``crop_padding``/``flip`` define the standard augmentation (random crop with zero padding,
    horizontal flip); the shard format records the drawn parameters per view.
    """

    dataset: Dataset = "digits"
    # CIFAR: folder holding cifar-10-batches-py / cifar-100-python; Fashion-MNIST: the IDX files'
    # folder (default /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)
    data_dir: str | None = None
    split_seed: int = 0  # fixes the train/val/test partition (digits) and train/val (others)
    val_fraction: Fraction01 = 0.1  # validation is what selection and the registry use
    test_fraction: Fraction01 = 0.2  # digits only: CIFAR has its own test split
    crop_padding: Annotated[int, Range(0)] = 4
    flip: bool = True
    limit_train: Count | None = None  # use only the first N training samples (smoke tests)

    @property
    def num_classes(self) -> int:
        return DATASET_FACTS[self.dataset][0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return DATASET_FACTS[self.dataset][1]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture by registry name (``dard models``) and its own knobs, as timm's ``**kwargs``:
    ``width`` for cnn_* (channel multiplier; cnn_small at 0.25 ~ 1k parameters), ``depth`` and
    ``widen_factor`` for wideresnet. Each architecture checks its knobs (``dard.models.registry``)."""

    arch: Annotated[str, Architecture()] = "resnet18"
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AttackConfig:
    """The training-time inner attack (L-inf), pixels in [0, 1].

    Paper: eps 8/255, step 2/255, 10 steps, random start. DPGD knobs are used where the method
    calls for DPGD (DARD's inner maximisation and the teacher's DPGD views).
    """

    eps: Annotated[float, Range(0, 1)] = 8 / 255  # pixel scale, e.g. 8/255
    step_size: Positive = 2 / 255
    steps: Count = 10
    random_start: bool = True
    dpgd_loss: DpgdLoss = "dice"
    dpgd_schedule: StepSchedule = "constant"
    dpgd_channel_mask: tuple[Annotated[int, Range(0)], ...] = ()  # input channels whose gradient is zeroed
    dpgd_segpgd_weighting: bool = False  # SegPGD correct/fooled weights; a no-op under sign steps


@dataclass(frozen=True)
class LossConfig:
    """Training objective and its weights (docs/design.md §3).

    DARD: ``w_adv*D_tau(T(x_d)||S(x_d)) + w_rob*R(x_s) + w_nat*D_tau(T(x)||S(x)) + w_ce*CE(S(x), y)
    + w_ce_adv*CE(S(x_s), y)``, where ``rob_target`` picks the online robustness term R:
    ``teacher_nat`` D_tau(T(x)||S(x_s)), x_s = DPGD towards softmax(T(x)) (RSLAD-style);
    ``self`` trades_beta*KL(S(x)||S(x_s)), x_s = TRADES' KL attack (the student's own natural
    prediction as target, no teacher at x_s); ``teacher_adv`` D_tau(T(x_s)||S(x_s)), the teacher
    queried online at the student's DPGD example (AdaAD/IAD-style; one teacher forward a step);
    ``label`` CE(S(x_s), y), x_s = PGD-CE against the student (SAT's term: the hard label at x_s).
    ``trades_beta`` is TRADES' beta; ``ard_alpha`` ARD's alpha.
    """

    method: Method = "dard"
    temperature: Positive = 1.0
    w_adv: NonNegative = 1 / 3
    w_rob: NonNegative = 1 / 2
    w_nat: NonNegative = 1 / 6
    w_ce: NonNegative = 0.0
    w_ce_adv: NonNegative = 0.0  # hard-label CE on the student's own adversarial example x_s
    rob_target: RobTarget = "teacher_nat"
    divergence: Divergence = "kl"
    trades_beta: NonNegative = 6.0
    ard_alpha: Annotated[float, Range(0, 1)] = 1.0
    ard_temperature: Positive = 30.0


@dataclass(frozen=True)
class OptimConfig:
    """SGD as in the paper's peers (RSLAD/ARD): lr 0.1, momentum 0.9, wd 2e-4, batch 128."""

    epochs: Count = 100
    batch_size: Count = 128  # global: split over DDP workers
    lr: Positive = 0.1
    momentum: Annotated[float, Range(0, 1, high_open=True)] = 0.9
    weight_decay: NonNegative = 2e-4
    nesterov: bool = False
    lr_schedule: LrSchedule = "multistep"
    milestones: tuple[Fraction01, ...] = (0.5, 0.75)  # fractions of epochs where lr is divided by 10
    amp: bool = False  # bf16/fp16 autocast on CUDA; ignored on CPU
    grad_clip: Positive | None = None


@dataclass(frozen=True)
class RunConfig:
    """Where outputs go and how the run executes."""

    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: Count = 1  # epochs between validation passes (natural + PGD)
    eval_pgd_steps: Count = 10
    eval_limit: Count | None = 512  # validation samples per evaluation (None: all)
    progress: bool = True


@dataclass(frozen=True)
class Config:
    """A whole run, valid once built (every rule checked in ``__post_init__``) and frozen: change
    it with :meth:`updated`. Build with :meth:`for_dataset` to get the dataset's defaults."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        problems = [p for section in fields(self) for p in _section_problems(section.name, getattr(self, section.name))]
        try:
            problems += _rule_problems(self)
        except (TypeError, KeyError, ValueError, AttributeError):
            if not problems:  # the rules assume well-typed fields; with none wrong this is a bug
                raise
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def for_dataset(cls, dataset: str, **sections: dict[str, Any]) -> "Config":
        """Defaults for ``dataset`` with ``sections`` (e.g. ``attack={"steps": 5}``) applied on top."""
        if dataset not in DATASET_DEFAULTS:
            raise ConfigError(f"data.dataset: {unknown(dataset, DATASETS)}")
        base = deep_merge(DATASET_DEFAULTS[dataset], {"data": {"dataset": dataset}})
        return from_dict(deep_merge(base, sections))

    def updated(self, **sections: dict[str, Any]) -> "Config":
        """A copy with ``sections`` (``run={"out_dir": "x"}``) changed, checked again."""
        unknown = set(sections) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"config: unknown section(s) {sorted(unknown)}")
        raw = to_dict(self)
        for name, values in sections.items():
            raw[name].update(values)
        return from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _section_problems(name: str, section: Any) -> list[str]:
    hints = field_hints(type(section))
    return [p for f in fields(section) for p in check_value(f"{name}.{f.name}", getattr(section, f.name), hints[f.name])[1]]


def _rule_problems(cfg: Config) -> list[str]:
    """The rules that tie fields together (types and bounds are the fields' own)."""
    from dard.models.registry import available, knob_problems  # local: models import config-free code only

    d, m, a, l = cfg.data, cfg.model, cfg.attack, cfg.loss
    out = []
    if d.val_fraction + d.test_fraction >= 0.9:
        out.append(f"data.val_fraction: val_fraction {d.val_fraction} + test_fraction {d.test_fraction} leave under "
                   "10 % of the data to train on")
    out += [f"model.{p}" for p in knob_problems(m.arch, m.kwargs)] if m.arch in available() else []
    if a.eps > 0 and a.step_size > a.eps:
        out.append(f"attack.step_size: step {a.step_size:.5g} exceeds eps {a.eps:.5g}")
    channels = d.image_shape[0]
    if not all(c < channels for c in a.dpgd_channel_mask):
        out.append(f"attack.dpgd_channel_mask: channels must be in [0, {channels}) for {d.dataset}, "
                   f"got {list(a.dpgd_channel_mask)}")
    if l.method == "dard" and l.w_adv + l.w_rob + l.w_nat + l.w_ce + l.w_ce_adv == 0:
        out.append("loss.w_adv: all DARD weights are 0: nothing to train")
    r = cfg.run
    if not (r.device in ("auto", "cpu", "mps") or r.device.startswith("cuda")):
        out.append(f"run.device: must be auto, cpu, cuda or cuda:N, got {r.device!r}")
    return out


# Digits: 8x8 grey images; eps 0.2 separates methods (docs/design.md §8: a natural CNN falls to
# ~1 % PGD-20 accuracy, TRADES keeps ~70 %); eps 0.1 barely does. No flip: digits are not mirror
# symmetric. No crop: a one-pixel shift of an 8x8 digit is a 12 % translation; it cost SAT 15 and
# TRADES 21 AutoAttack points (benchmarks/results/augment-digits.md). Small CNNs, more epochs since
# each epoch is tiny. The student recipe is DARD on a SAT backbone (rob_target label: CE at the
# student's own PGD example) plus the teacher's soft labels on its DPGD views (w_adv), onecycle lr
# 0.4, selected on validation in benchmarks/results/capacity-digits.md; there SAT alone is as
# robust or more at every student size.
# Fashion-MNIST: eps 0.1 (docs/design.md §8); the student cnn_small at width 0.25 (~1k parameters)
# under a SAT cnn_small teacher, lr 0.1, 15 epochs: the CPU protocol of
# benchmarks/results/grid-fashion-mnist.md, where DARD's SAT backbone was selected on validation.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {
        "data": {"crop_padding": 0, "flip": False},
        "model": {"arch": "cnn_small"},
        "attack": {"eps": 0.2, "step_size": 0.05, "steps": 10},
        "loss": {"rob_target": "label", "w_adv": 1.0, "w_rob": 1.0, "w_nat": 0.0, "w_ce": 0.0},
        "optim": {"epochs": 40, "batch_size": 64, "lr": 0.4, "lr_schedule": "onecycle",
                  "weight_decay": 5e-4},
        "run": {"eval_limit": None},
    },
    "fashion-mnist": {
        "data": {"crop_padding": 0, "flip": False},
        "model": {"arch": "cnn_small", "kwargs": {"width": 0.25}},
        "attack": {"eps": 0.1, "step_size": 0.025, "steps": 10},
        "loss": {"rob_target": "label", "w_adv": 1.0, "w_rob": 1.0, "w_nat": 0.0, "w_ce": 0.0},
        "optim": {"epochs": 15, "batch_size": 128, "lr": 0.1, "lr_schedule": "onecycle", "weight_decay": 5e-4},
        "run": {"eval_limit": 500},
    },
    "cifar10": {},
    "cifar100": {},
}

# The robust teacher each dataset distils from when none is given (the benchmarks'), chosen on
# validation robust accuracy. Digits: TRADES on cnn_large, 80 onecycle epochs (AutoAttack 76.9 % on
# the test split; benchmarks/results/teacher-digits-nocrop.md). Fashion-MNIST: the teacher the CPU
# protocol could afford, SAT on cnn_small (benchmarks/results/grid-fashion-mnist.md).
TEACHER_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"model": {"arch": "cnn_large"}, "loss": {"method": "trades"},
               "optim": {"epochs": 80, "lr": 0.1, "lr_schedule": "onecycle"}},
    # no kwargs: the dataset's student defaults (merged below this) are cnn_small at width 0.25
    "fashion-mnist": {"model": {"arch": "cnn_small", "kwargs": {}}, "loss": {"method": "sat"},
                      "optim": {"epochs": 15, "lr": 0.1, "lr_schedule": "onecycle"}},
    "cifar10": {"model": {"arch": "wrn34_10"}, "loss": {"method": "trades"}},
    "cifar100": {"model": {"arch": "wrn34_10"}, "loss": {"method": "trades"}},
}


def teacher_config(dataset: str, **sections: dict[str, Any]) -> Config:
    """The dataset's default teacher recipe (``TEACHER_DEFAULTS``) with ``sections`` applied on top."""
    if dataset not in TEACHER_DEFAULTS:
        raise ConfigError(f"data.dataset: {unknown(dataset, DATASETS)}")
    return Config.for_dataset(dataset, **deep_merge(TEACHER_DEFAULTS[dataset], sections))


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists): YAML-, JSON- and ``torch.load(weights_only)``-safe."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from plain values (YAML, JSON, a model file's record). Every problem --
    unknown sections or keys, wrong types, values out of bounds -- is reported at once."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping, got {type(raw).__name__}")
    sections = {f.name: f for f in fields(Config)}
    unknown = {str(k) for k in raw} - set(sections)
    if unknown:
        raise ConfigError(f"config: unknown section(s) {sorted(unknown)}; known: {sorted(sections)}")
    built, problems = {}, []
    for name, cls in get_type_hints(Config).items():
        values = _legacy(name, raw.get(name) or {})
        if not isinstance(values, dict):
            problems.append(f"{name}: expected a mapping, got {values!r}")
            continue
        hints = field_hints(cls)
        problems += [f"{name}.{k}: unknown key; known: {', '.join(hints)}" for k in values if k not in hints]
        checked = {k: check_value(f"{name}.{k}", v, hints[k]) for k, v in values.items() if k in hints}
        problems += [p for _, ps in checked.values() for p in ps]
        built[name] = {k: v for k, (v, _) in checked.items()}
    if problems:
        raise ConfigError("; ".join(problems))
    return Config(**{name: cls(**built[name]) for name, cls in get_type_hints(Config).items()})


def _legacy(section: str, values: Any) -> Any:
    """Configs recorded before ``model.kwargs`` (model files, YAML) carried ``depth``,
    ``widen_factor`` and ``width`` on every model: keep the ones that applied to the architecture."""
    if section != "model" or not isinstance(values, dict) or not {"depth", "widen_factor", "width"} & set(values):
        return values
    values = dict(values)
    defaults = {"depth": 34, "widen_factor": 10, "width": 1.0}
    old = {k: values.pop(k) for k in defaults if k in values}
    arch = values.get("arch", "")
    # a knob at its old default that the architecture lacks is dropped; any other is kept (and
    # refused by the architecture's check if it has no such knob)
    kept = {k: v for k, v in old.items() if v != defaults[k] or (arch == "wideresnet" and k != "width")}
    return {**values, "kwargs": {**kept, **(values.get("kwargs") or {})}}


def load_yaml(path: str | Path) -> Config:
    """Read a YAML config. Sections absent from the file take the dataset's defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, ...) at the top level")
    bad = [k for k, v in raw.items() if not isinstance(k, str) or not isinstance(v, (dict, type(None)))]
    if bad:
        raise ConfigError(f"{path}: section {bad[0]!r} must be a name with a mapping of key: value under it")
    dataset = (raw.get("data") or {}).get("dataset", "digits")
    raw = {k: v for k, v in raw.items()}
    return Config.for_dataset(dataset, **raw)


def save_yaml(cfg: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, mapping by mapping; ``kwargs`` (an architecture's knobs) is
    replaced whole: the knobs of one architecture mean nothing to another."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
