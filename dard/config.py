"""Every knob of a run as typed dataclasses: paper defaults, dataset defaults, validation, YAML.

The one place configuration lives. The CLI, the Ray job entrypoints and the Tune sweep all build
a :class:`Config` and hand it to the same functions; nothing parses options twice.

Pixel values are in [0, 1]; ``eps`` and ``step`` are on that scale (8/255 for CIFAR).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

# Each dataset's facts: (classes, image shape (C, H, W)); read them through DataConfig.
DATASET_FACTS = {"digits": (10, (1, 8, 8)), "fashion-mnist": (10, (1, 28, 28)), "cifar10": (10, (3, 32, 32)),
                 "cifar100": (100, (3, 32, 32))}
DATASETS = tuple(DATASET_FACTS)
TEACHER_METHODS = ("natural", "sat", "trades")
DISTILL_METHODS = ("dard", "ard", "rslad")
METHODS = TEACHER_METHODS + DISTILL_METHODS
DIVERGENCES = ("kl", "dice")
DPGD_LOSSES = ("dice", "ce", "dice+ce", "cw")
STEP_SCHEDULES = ("constant", "cosine", "apgd")
# The evaluation protocol's attacks, in report order (here, without torch, for the CLI's help);
# their functions are dard.attacks.registry.ATTACKS, which checks that it has exactly these.
EVAL_ATTACKS = ("natural", "fgsm", "pgd20", "bim10", "tpgd10", "cw20", "dpgd20", "autoattack")
LR_SCHEDULES = ("multistep", "cosine", "onecycle", "constant")
ROB_TARGETS = ("teacher_nat", "self", "teacher_adv", "label")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass
class DataConfig:
    """Dataset, split and augmentation.

    ``crop_padding``/``flip`` define the standard augmentation (random crop with zero padding,
    horizontal flip); the shard format records the drawn parameters per view.
    """

    dataset: str = "digits"
    # CIFAR: folder holding cifar-10-batches-py / cifar-100-python; Fashion-MNIST: the IDX files'
    # folder (default /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)
    data_dir: str | None = None
    split_seed: int = 0  # fixes the train/val/test partition (digits) and train/val (others)
    val_fraction: float = 0.1
    test_fraction: float = 0.2  # digits only: CIFAR has its own test split
    crop_padding: int = 4
    flip: bool = True
    limit_train: int | None = None  # use only the first N training samples (smoke tests)

    @property
    def num_classes(self) -> int:
        return self._facts()[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return self._facts()[1]

    def _facts(self) -> tuple[int, tuple[int, int, int]]:
        if self.dataset not in DATASET_FACTS:
            raise ConfigError(f"data.dataset: unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        return DATASET_FACTS[self.dataset]


@dataclass
class ModelConfig:
    """Architecture by registry name (see ``dard.models.available()``)."""

    arch: str = "resnet18"
    depth: int = 34  # wideresnet only
    widen_factor: int = 10  # wideresnet only
    width: float = 1.0  # cnn_small/medium/large only: channel multiplier (cnn_small 0.25 ~ 1k parameters)


@dataclass
class AttackConfig:
    """The training-time inner attack (L-inf), pixels in [0, 1].

    Paper: eps 8/255, step 2/255, 10 steps, random start. DPGD knobs are used where the method
    calls for DPGD (DARD's inner maximisation and the teacher's DPGD views).
    """

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    dpgd_loss: str = "dice"  # dice | ce | dice+ce | cw
    dpgd_schedule: str = "constant"  # constant | cosine | apgd
    dpgd_channel_mask: tuple[int, ...] = ()  # input channels whose gradient is zeroed
    dpgd_segpgd_weighting: bool = False  # SegPGD correct/fooled weights; a no-op under sign steps


@dataclass
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

    method: str = "dard"
    temperature: float = 1.0
    w_adv: float = 1 / 3
    w_rob: float = 1 / 2
    w_nat: float = 1 / 6
    w_ce: float = 0.0
    w_ce_adv: float = 0.0  # hard-label CE on the student's own adversarial example x_s
    rob_target: str = "teacher_nat"  # teacher_nat | self | teacher_adv | label
    divergence: str = "kl"
    trades_beta: float = 6.0
    ard_alpha: float = 1.0
    ard_temperature: float = 30.0


@dataclass
class OptimConfig:
    """SGD as in the paper's peers (RSLAD/ARD): lr 0.1, momentum 0.9, wd 2e-4, batch 128."""

    epochs: int = 100
    batch_size: int = 128  # global: split over DDP workers
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    lr_schedule: str = "multistep"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of epochs where lr is divided by 10
    amp: bool = False  # bf16/fp16 autocast on CUDA; ignored on CPU
    grad_clip: float | None = None


@dataclass
class RunConfig:
    """Where outputs go and how the run executes."""

    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int = 1  # epochs between validation passes (natural + PGD)
    eval_pgd_steps: int = 10
    eval_limit: int | None = 512  # validation samples per evaluation (None: all)
    progress: bool = True


@dataclass
class Config:
    """A whole run. Build with :meth:`for_dataset` to get the dataset's defaults."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def for_dataset(cls, dataset: str, **sections: dict[str, Any]) -> "Config":
        """Defaults for ``dataset`` with ``sections`` (e.g. ``attack={"steps": 5}``) applied on top."""
        if dataset not in DATASET_DEFAULTS:
            raise ConfigError(f"data.dataset: unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
        base = deep_merge(DATASET_DEFAULTS[dataset], {"data": {"dataset": dataset}})
        return from_dict(deep_merge(base, sections))

    def validate(self) -> "Config":
        validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


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
        "model": {"arch": "cnn_small", "width": 0.25},
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
    # width 1 explicitly: the dataset's student defaults (merged below this) are cnn_small at width 0.25
    "fashion-mnist": {"model": {"arch": "cnn_small", "width": 1.0}, "loss": {"method": "sat"},
                      "optim": {"epochs": 15, "lr": 0.1, "lr_schedule": "onecycle"}},
    "cifar10": {"model": {"arch": "wrn34_10"}, "loss": {"method": "trades"}},
    "cifar100": {"model": {"arch": "wrn34_10"}, "loss": {"method": "trades"}},
}


def teacher_config(dataset: str, **sections: dict[str, Any]) -> Config:
    """The dataset's default teacher recipe (``TEACHER_DEFAULTS``) with ``sections`` applied on top."""
    if dataset not in TEACHER_DEFAULTS:
        raise ConfigError(f"data.dataset: unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    return Config.for_dataset(dataset, **deep_merge(TEACHER_DEFAULTS[dataset], sections))


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first invalid field."""
    from dard.models import available  # local: models import config-free code only

    def need(cond: bool, name: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{name}: {msg}")

    for section in fields(cfg):
        for f in fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            for v in value if isinstance(value, tuple) else (value,):
                need(not isinstance(v, float) or math.isfinite(v), f"{section.name}.{f.name}",
                     f"must be a finite number, got {value}")
    d, m, a, l, o, r = cfg.data, cfg.model, cfg.attack, cfg.loss, cfg.optim, cfg.run
    need(d.dataset in DATASETS, "data.dataset", f"unknown dataset {d.dataset!r}; choose from {', '.join(DATASETS)}")
    need(0 < d.val_fraction < 1, "data.val_fraction",
         f"must be in (0, 1), got {d.val_fraction}: validation is what selection and the registry use")
    need(0 < d.test_fraction < 1, "data.test_fraction", f"must be in (0, 1), got {d.test_fraction}")
    need(d.val_fraction + d.test_fraction < 0.9, "data.val_fraction",
         f"val_fraction {d.val_fraction} + test_fraction {d.test_fraction} leave under 10 % of the data to train on")
    need(d.crop_padding >= 0, "data.crop_padding", f"must be >= 0, got {d.crop_padding}")
    need(d.limit_train is None or d.limit_train > 0, "data.limit_train", "must be positive or null")
    need(m.arch in available(), "model.arch", f"unknown architecture {m.arch!r}; choose from {', '.join(available())}")
    need(m.depth >= 10 and (m.depth - 4) % 6 == 0, "model.depth", f"WideResNet depth must be 6n+4 (e.g. 28, 34), got {m.depth}")
    need(m.widen_factor >= 1, "model.widen_factor", f"must be >= 1, got {m.widen_factor}")
    need(0 < m.width <= 16, "model.width", f"must be in (0, 16], got {m.width}")
    need(m.width == 1.0 or m.arch.startswith("cnn_"), "model.width",
         f"{m.width} scales the cnn_* models only; with {m.arch} set model.width: 1 (--set model.width=1)")
    need(_finite(a.eps) and 0 <= a.eps <= 1, "attack.eps", f"must be in [0, 1] (pixel scale, e.g. 8/255), got {a.eps}")
    need(_finite(a.step_size) and a.step_size > 0, "attack.step_size", f"must be > 0, got {a.step_size}")
    need(a.step_size <= a.eps or a.eps == 0, "attack.step_size", f"step {a.step_size:.5g} exceeds eps {a.eps:.5g}")
    need(a.steps >= 1, "attack.steps", f"must be >= 1, got {a.steps}")
    need(a.dpgd_loss in DPGD_LOSSES, "attack.dpgd_loss", f"unknown {a.dpgd_loss!r}; choose from {', '.join(DPGD_LOSSES)}")
    need(a.dpgd_schedule in STEP_SCHEDULES, "attack.dpgd_schedule", f"unknown {a.dpgd_schedule!r}; choose from {', '.join(STEP_SCHEDULES)}")
    channels = d.image_shape[0]
    need(all(0 <= c < channels for c in a.dpgd_channel_mask), "attack.dpgd_channel_mask",
         f"channels must be in [0, {channels}) for {d.dataset}, got {list(a.dpgd_channel_mask)}")
    need(l.method in METHODS, "loss.method", f"unknown method {l.method!r}; choose from {', '.join(METHODS)}")
    need(_finite(l.temperature) and l.temperature > 0, "loss.temperature", f"must be > 0, got {l.temperature}")
    need(_finite(l.ard_temperature) and l.ard_temperature > 0, "loss.ard_temperature", f"must be > 0, got {l.ard_temperature}")
    for name in ("w_adv", "w_rob", "w_nat", "w_ce", "w_ce_adv", "trades_beta", "ard_alpha"):
        value = getattr(l, name)
        need(_finite(value) and value >= 0, f"loss.{name}", f"must be >= 0, got {value}")
    need(l.ard_alpha <= 1, "loss.ard_alpha", f"must be in [0, 1], got {l.ard_alpha}")
    if l.method == "dard":
        need(l.w_adv + l.w_rob + l.w_nat + l.w_ce + l.w_ce_adv > 0, "loss.w_adv", "all DARD weights are 0: nothing to train")
    need(l.rob_target in ROB_TARGETS, "loss.rob_target", f"unknown {l.rob_target!r}; choose from {', '.join(ROB_TARGETS)}")
    need(l.divergence in DIVERGENCES, "loss.divergence", f"unknown {l.divergence!r}; choose from {', '.join(DIVERGENCES)}")
    need(o.epochs >= 1, "optim.epochs", f"must be >= 1, got {o.epochs}")
    need(o.batch_size >= 1, "optim.batch_size", f"must be >= 1, got {o.batch_size}")
    need(_finite(o.lr) and o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    need(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(o.lr_schedule in LR_SCHEDULES, "optim.lr_schedule", f"unknown {o.lr_schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
    need(all(0 < f < 1 for f in o.milestones), "optim.milestones", f"fractions of training must be in (0, 1), got {list(o.milestones)}")
    need(r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda") or r.device == "mps",
         "run.device", f"must be auto, cpu, cuda or cuda:N, got {r.device!r}")
    need(r.eval_every >= 1, "run.eval_every", f"must be >= 1, got {r.eval_every}")
    need(r.eval_limit is None or r.eval_limit >= 1, "run.eval_limit", f"must be >= 1 or null (all), got {r.eval_limit}")
    need(r.eval_pgd_steps >= 1, "run.eval_pgd_steps", f"must be >= 1, got {r.eval_pgd_steps}")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


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
    """Build and validate a Config; unknown sections or keys are errors naming them."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping, got {type(raw).__name__}")
    sections = {f.name: f for f in fields(Config)}
    unknown = {str(k) for k in raw} - set(sections)
    if unknown:
        raise ConfigError(f"config: unknown section(s) {sorted(unknown)}; known: {sorted(sections)}")
    built = {}
    hints = get_type_hints(Config)
    for name, f in sections.items():
        cls = hints[name]
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping, got {values!r}")
        known = {x.name: x for x in fields(cls)}
        extra = {str(k) for k in values} - set(known)
        if extra:
            raise ConfigError(f"{name}.{sorted(extra)[0]}: unknown key; known: {sorted(known)}")
        types = get_type_hints(cls)
        kwargs = {k: _coerce(f"{name}.{k}", v, types[k]) for k, v in values.items()}
        built[name] = cls(**kwargs)
    cfg = Config(**built)
    validate(cfg)
    return cfg


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Tuples from YAML lists; ints accepted where floats are expected; bool is not an int here."""
    text = str(hint)
    if "tuple" in text:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return tuple(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if hint is float or text in ("float | None",):
        if value is None and "None" in text:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is int or text == "int | None":
        if value is None and "None" in text:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


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
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
