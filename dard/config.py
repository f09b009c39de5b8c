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

from dard.errors import ConfigError, unknown

# The presets' facts: (class names in label order, image shape (C, H, W)); read them through
# DataConfig (``class_names``, ``num_classes``, ``image_shape``), which also covers your own sources.
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train tulip turtle
wardrobe whale willow_tree wolf woman worm""".split())
PRESETS = {"digits": (tuple(str(d) for d in range(10)), (1, 8, 8)), "fashion-mnist": (FASHION_CLASSES, (1, 28, 28)),
           "cifar10": (CIFAR10_CLASSES, (3, 32, 32)), "cifar100": (CIFAR100_CLASSES, (3, 32, 32))}
# The choices, as types: fields declare them, the checker, argparse and the search space read them.
Dataset = Literal["digits", "fashion-mnist", "cifar10", "cifar100"]  # the presets
Method = Literal["natural", "sat", "trades", "dard", "ard", "rslad"]
Divergence = Literal["kl", "dice"]
DpgdLoss = Literal["dice", "ce", "dice+ce", "cw"]
StepSchedule = Literal["constant", "cosine", "apgd"]
LrSchedule = Literal["multistep", "cosine", "onecycle", "constant"]
RobTarget = Literal["teacher_nat", "self", "teacher_adv", "label"]
PseudoLabels = Literal["teacher", "none"]
DATASETS, METHODS, DIVERGENCES = get_args(Dataset), get_args(Method), get_args(Divergence)
DPGD_LOSSES, STEP_SCHEDULES = get_args(DpgdLoss), get_args(StepSchedule)
LR_SCHEDULES, ROB_TARGETS = get_args(LrSchedule), get_args(RobTarget)
TEACHER_METHODS = METHODS[:3]
DISTILL_METHODS = METHODS[3:]
# The evaluation protocol's attacks, in report order (here, without torch, for the CLI's help);
# their functions are dard.attacks.registry.ATTACKS, which checks that it has exactly these.
EXPORT_FORMATS = ("pt2", "onnx", "torchscript")  # `dard export --format` (dard.export)
EVAL_ATTACKS = ("natural", "fgsm", "pgd20", "bim10", "tpgd10", "cw20", "dpgd20", "square", "autoattack")


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
        from dard.models import available  # local: the models import torch; a config is read without it

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
class Pattern:
    """A string field's rule, declared as ``Annotated[str, Pattern(regex, what)]``."""

    regex: str
    what: str

    def problem(self, v: str) -> str | None:
        import re

        return None if re.fullmatch(self.regex, v) else f"{self.what}, got {v!r}"


SOURCE_KINDS = ("folder", "table")
# Your own images: ``folder:PATH`` (one sub-folder per class, torchvision's ImageFolder; or ``train/`` and
# ``test/`` folders of such; or the images alone for an unlabeled pool) or ``table:PATH`` (Parquet or
# Arrow IPC with an image column: encoded bytes or a path, and a label column); PATH local or a URI.
SourceSpec = Annotated[str, Pattern(r"(folder|table):.+", "expected folder:PATH or table:PATH (PATH local, or "
                                                          "s3://, gs://, file:// URIs)")]
DatasetName = Annotated[str, Pattern(r"[a-z0-9][a-z0-9._-]{0,63}", "expected a name of lowercase letters, digits, "
                                                                  "'.', '_' or '-'")]


@dataclass(frozen=True)
class DataConfig:
    """Dataset, split, augmentation and (with shards) how rows are streamed.

    ``dataset`` is a preset (digits, fashion-mnist, cifar10, cifar100) or, with ``source``, the
    name of your own images. A source's ``classes``, ``shape`` and ``fingerprint`` (a digest of its listing: every file's name, size and label) are filled where a
    run starts (:func:`dard.data.resolve`) and then pinned: shards, checkpoints and model files
    carry them, and a source that changed is refused by name. Images are resized to
    ``image_size`` (H, W; bilinear) only when they differ from it, stored as uint8, and converted
    to ``channels`` (1: L, 3: RGB) only when set; left unset, every image must already have the
    first image's size (or channel count), and ``shape`` records what was found.

    ``crop_padding``/``flip`` define the standard augmentation (random crop with zero padding,
    horizontal flip); the shard format records the drawn parameters per view. ``labeled`` keeps
    the labels of that many training samples (stratified by class, by ``split_seed``) and makes the
    rest an unlabeled pool; ``pool`` adds images without labels. With shards, ``pool_share`` is the
    share of every batch drawn from pool rows (robust self-training uses 0.5; None: as they come),
    and ``shuffle_window`` the record batches (<= 1024 rows each) a rank holds and mixes at a time.
    """

    dataset: DatasetName = "digits"
    source: SourceSpec | None = None
    test_source: SourceSpec | None = None  # a fixed test set; without it the test split is carved by seed
    image_column: str = "image"  # table sources: encoded image bytes, or a path relative to the table
    label_column: str = "label"  # table sources: class index or class name
    image_size: tuple[Annotated[int, Range(1, 4096)], ...] | None = None  # (H, W)
    channels: Literal[1, 3] | None = None
    classes: tuple[str, ...] = ()  # class names in label order (a source's are filled when resolved)
    shape: tuple[Annotated[int, Range(1)], ...] | None = None  # (C, H, W) stored: filled when resolved
    fingerprint: str | None = None  # the source's listing digest, filled when resolved
    # presets: CIFAR's folder holding cifar-10-batches-py / cifar-100-python; Fashion-MNIST's IDX
    # files' folder (default /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)
    data_dir: str | None = None
    split_seed: int = 0  # fixes the train/val/test partition and the labeled subset
    val_fraction: Fraction01 = 0.1  # validation is what selection and the registry use
    test_fraction: Fraction01 = 0.2  # digits and sources without test_source: the carved test share
    crop_padding: Annotated[int, Range(0)] = 4
    flip: bool = True
    limit_train: Count | None = None  # use only the first N training samples (smoke tests)
    labeled: Count | None = None
    pool: SourceSpec | None = None
    pool_share: Annotated[float, Range(0, 1)] | None = None
    shuffle_window: Count = 4

    @property
    def preset(self) -> bool:
        return self.source is None

    @property
    def class_names(self) -> tuple[str, ...]:
        if self.preset:
            return PRESETS[self.dataset][0]
        if not self.classes:
            raise ConfigError(f"data.source {self.source}: not resolved yet (classes unknown); build the config "
                              "through dard.data.resolve(cfg)")
        return self.classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        if self.preset:
            return PRESETS[self.dataset][1]
        if self.shape is None:
            raise ConfigError(f"data.source {self.source}: not resolved yet (image size unknown); build the config "
                              "through dard.data.resolve(cfg)")
        return self.shape


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
    # pool rows (data.labeled / data.pool): hard-label terms take the teacher's argmax where a row has
    # no label (robust self-training), or skip such rows (none); a pool row whose teacher confidence
    # (its largest softmax probability) is below pseudo_threshold is skipped either way
    pseudo_labels: PseudoLabels = "teacher"
    pseudo_threshold: Annotated[float, Range(0, 1)] = 0.0


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
    steps_per_epoch: Count | None = None  # shards: steps an epoch (default: one pass over the rows)


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
        """Defaults for ``dataset`` with ``sections`` (e.g. ``attack={"steps": 5}``) applied on top.
        A dataset of your own (``data={"source": ...}``) takes the rule of :func:`source_defaults`,
        which needs the source resolved (:func:`dard.data.resolve` fills ``data``)."""
        return from_dict(deep_merge(default_sections(dataset, sections.get("data")), sections))

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
    """Each field of ``section`` checked against its type, once; a value the type converts (a YAML
    list to a tuple, an int where a float is declared) is stored converted."""
    hints = field_hints(type(section))
    problems = []
    for f in fields(section):
        value, found = check_value(f"{name}.{f.name}", getattr(section, f.name), hints[f.name])
        object.__setattr__(section, f.name, value)  # frozen: set once, here, before anyone reads it
        problems += found
    return problems


def _rule_problems(cfg: Config) -> list[str]:
    """The rules that tie fields together (types and bounds are the fields' own)."""
    from dard.models.registry import available, knob_problems  # local: the models import torch

    d, m, a, l = cfg.data, cfg.model, cfg.attack, cfg.loss
    out = []
    if d.val_fraction + d.test_fraction >= 0.9:
        out.append(f"data.val_fraction: val_fraction {d.val_fraction} + test_fraction {d.test_fraction} leave under "
                   "10 % of the data to train on")
    out += [f"model.{p}" for p in knob_problems(m.arch, m.kwargs)] if m.arch in available() else []
    if a.eps > 0 and a.step_size > a.eps:
        out.append(f"attack.step_size: step {a.step_size:.5g} exceeds eps {a.eps:.5g}")
    out += _data_problems(d)
    channels = (PRESETS[d.dataset][1][0] if d.dataset in PRESETS else 3) if d.preset else (d.shape or (3,))[0]
    if not all(c < channels for c in a.dpgd_channel_mask):
        out.append(f"attack.dpgd_channel_mask: channels must be in [0, {channels}) for {d.dataset}, "
                   f"got {list(a.dpgd_channel_mask)}")
    if l.method == "dard" and l.w_adv + l.w_rob + l.w_nat + l.w_ce + l.w_ce_adv == 0:
        out.append("loss.w_adv: all DARD weights are 0: nothing to train")
    r = cfg.run
    if not (r.device in ("auto", "cpu", "mps") or r.device.startswith("cuda")):
        out.append(f"run.device: must be auto, cpu, cuda or cuda:N, got {r.device!r}")
    return out


def _data_problems(d: DataConfig) -> list[str]:
    """What ties the data fields together: a preset or a source of your own, never half of each."""
    out = []
    if d.preset:
        if d.dataset not in DATASETS:
            out.append(f"data.dataset: {unknown(d.dataset, DATASETS)} (or give data.source for your own images)")
        own = [k for k in ("test_source", "image_size", "channels", "shape") if getattr(d, k) is not None]
        own += ["fingerprint"] if d.fingerprint is not None and d.pool is None else []
        own += ["classes"] if d.classes and d.dataset in PRESETS and d.classes != PRESETS[d.dataset][0] else []
        out += [f"data.{k}: belongs to a source of your own (data.source); the preset {d.dataset} fixes it"
                for k in own]
    else:
        if d.dataset in DATASETS:
            out.append(f"data.dataset: {d.dataset!r} is a preset's name; name your own data (e.g. the folder's name)")
        if d.image_size is not None and len(d.image_size) != 2:
            out.append(f"data.image_size: expected [height, width], got {list(d.image_size)}")
        if d.shape is not None and (len(d.shape) != 3 or d.shape[0] not in (1, 3)):
            out.append(f"data.shape: expected [channels (1 or 3), height, width], got {list(d.shape)}")
        if len(set(d.classes)) != len(d.classes):
            out.append(f"data.classes: names repeat: {sorted(c for c in set(d.classes) if d.classes.count(c) > 1)}")
        if d.classes and len(d.classes) < 2:
            out.append(f"data.classes: a classifier needs at least 2 classes, got {list(d.classes)}")
    if d.pool_share is not None and d.labeled is None and d.pool is None:
        out.append("data.pool_share: there is no pool (set data.labeled to hide labels, or data.pool)")
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
    """The dataset's default teacher recipe (``TEACHER_DEFAULTS``, or the rule's for your own
    data) with ``sections`` applied on top."""
    return from_dict(deep_merge(default_sections(dataset, sections.get("data"), teacher=True), sections))


def default_sections(dataset: str, data: dict[str, Any] | None = None, teacher: bool = False) -> dict[str, Any]:
    """Every section's defaults for ``dataset`` as plain values, unchecked (the caller puts its
    own values on top and builds the Config once, so every problem is named at once). ``data``: the
    run's data section (a source's resolved facts choose its defaults); ``teacher``: the teacher
    recipe (``TEACHER_DEFAULTS``; :func:`source_teacher` for your own data)."""
    data = {**(data or {}), "dataset": dataset}
    raw = deep_merge(to_dict(Config()), deep_merge(defaults_for(data), {"data": {"dataset": dataset}}))
    if teacher:
        own = data.get("source") is not None or dataset not in TEACHER_DEFAULTS
        raw = deep_merge(raw, source_teacher(data) if own else TEACHER_DEFAULTS[dataset])
    return raw


def defaults_for(data: dict[str, Any]) -> dict[str, Any]:
    """The default sections for the data described by ``data`` (a ``data`` section as a dict)."""
    name = data.get("dataset", "digits")
    if data.get("source") is None:
        if name not in DATASET_DEFAULTS:
            raise ConfigError(f"data.dataset: {unknown(name, DATASETS)} (or give data.source for your own images)")
        return DATASET_DEFAULTS[name]
    return source_defaults(*_resolved(data))


def _resolved(data: dict[str, Any]) -> tuple[int, tuple[int, int], int]:
    if not data.get("shape") or not data.get("classes"):
        raise ConfigError(f"data.source {data.get('source')}: not resolved yet (classes and image shape unknown); "
                          "build the config through dard.data.resolve")
    c, h, w = data["shape"]
    return int(c), (int(h), int(w)), len(data["classes"])


def source_defaults(channels: int, image_size: tuple[int, int], num_classes: int) -> dict[str, Any]:
    """The defaults for images of your own, by the rule of docs/design.md §8 (every value can be
    overridden): the threat model of the closest public benchmark -- eps 0.1 for grey images
    (Fashion-MNIST's), 8/255 for colour ones up to 64 px (CIFAR's), 4/255 above (ImageNet's) --,
    step eps/4, 10 steps; a crop of 1/8 of the side for images of 16 px or more, no flip (a
    mirrored sign or digit can be another class); cnn_small for grey images up to 32 px, else
    ResNet-18; the student recipe measured on digits and Fashion-MNIST (DARD on the SAT backbone,
    onecycle lr 0.1, 30 epochs, batch 128)."""
    side = max(image_size)
    eps = 0.1 if channels == 1 else 8 / 255 if side <= 64 else 4 / 255
    small_grey = channels == 1 and side <= 32
    return {
        "data": {"crop_padding": round(side / 8) if side >= 16 else 0, "flip": False},
        "model": {"arch": "cnn_small" if small_grey else "resnet18", "kwargs": {}},
        "attack": {"eps": eps, "step_size": eps / 4, "steps": 10},
        "loss": {"rob_target": "label", "w_adv": 1.0, "w_rob": 1.0, "w_nat": 0.0, "w_ce": 0.0},
        "optim": {"epochs": 30, "batch_size": 128, "lr": 0.1, "lr_schedule": "onecycle", "weight_decay": 5e-4},
        "run": {"eval_limit": 512},
    }


def source_teacher(data: dict[str, Any]) -> dict[str, Any]:
    """The teacher recipe for your own images (docs/design.md §8): TRADES, onecycle lr 0.1, 40
    epochs, on cnn_large for grey images up to 32 px, else WideResNet-34-10."""
    channels, image_size, _ = _resolved(data)
    small_grey = channels == 1 and max(image_size) <= 32
    return {"model": {"arch": "cnn_large" if small_grey else "wrn34_10", "kwargs": {}}, "loss": {"method": "trades"},
            "optim": {"epochs": 40, "lr": 0.1, "lr_schedule": "onecycle"}}


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
            values = {}
        hints = field_hints(cls)
        problems += [f"{name}.{k}: unknown key; known: {', '.join(hints)}" for k in values if k not in hints]
        built[name] = cls(**{k: v for k, v in values.items() if k in hints})
    try:  # the values are checked once, by the Config itself, every problem at once
        cfg = Config(**built)
    except ConfigError as err:
        raise ConfigError("; ".join([*problems, str(err)])) from None
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


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


class _StrictLoader(yaml.SafeLoader):
    """YAML that says one thing once: a key given twice in a mapping (a section, a field) is an
    error naming it and its line, never the last one winning; tags that construct objects stay
    refused (SafeLoader)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.name}: {key!r} given twice (lines {seen[key]} and {line}); "
                                  "keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_strict(text: str, where: str = "<text>") -> Any:
    """YAML from ``text`` (a file's, or a ``--set`` value) read by :class:`_StrictLoader`."""
    try:
        return yaml.load(text, Loader=_named(where))
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from err


def _named(where: str):
    class Loader(_StrictLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self.name = where

    return Loader


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's sections as plain values, checked for shape: a mapping of section
    names to mappings. Values are checked when the Config is built."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = load_strict(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, ...) at the top level")
    bad = [k for k, v in raw.items() if not isinstance(k, str) or not isinstance(v, (dict, type(None)))]
    if bad:
        raise ConfigError(f"{path}: section {bad[0]!r} must be a name with a mapping of key: value under it")
    return {k: v or {} for k, v in raw.items()}


def load_yaml(path: str | Path) -> Config:
    """Read a YAML config. Sections absent from the file take the dataset's defaults (a source of
    your own must be resolved in the file, as `dard config --source` writes it)."""
    raw = read_yaml(path)
    return Config.for_dataset(raw.get("data", {}).get("dataset", "digits"), **raw)


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
