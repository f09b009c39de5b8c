"""Model registry: small CNNs (digits), ResNet-18, MobileNetV2, WideResNet (RobustBench keys)."""
from dard.models import mobilenetv2, resnet, small_cnn, wideresnet  # noqa: F401  (registration)
from dard.models.io import ModelFileError, NonFiniteWeightsError, file_sha256, load_model, load_teacher, save_model
from dard.models.registry import Normalize, available, build, count_parameters, unwrap

__all__ = ["ModelFileError", "NonFiniteWeightsError", "Normalize", "available", "build", "build_for", "count_parameters",
           "file_sha256", "load_model", "load_teacher", "save_for", "save_model", "unwrap"]


def build_for(model_cfg, dataset: str):
    """The configured architecture sized for ``dataset`` (classes, input channels)."""
    from dard.config import IMAGE_SHAPE, NUM_CLASSES

    return build(model_cfg.arch, NUM_CLASSES[dataset], IMAGE_SHAPE[dataset][0], **arch_kwargs(model_cfg))


def save_for(path, model, model_cfg, dataset: str, meta: dict | None = None):
    """:func:`save_model` for a model built by :func:`build_for` (same facts); returns the path."""
    from dard.config import IMAGE_SHAPE, NUM_CLASSES

    return save_model(path, model, arch=model_cfg.arch, num_classes=NUM_CLASSES[dataset],
                      in_channels=IMAGE_SHAPE[dataset][0], dataset=dataset, arch_kwargs=arch_kwargs(model_cfg), meta=meta)


def arch_kwargs(model_cfg) -> dict:
    return {"depth": model_cfg.depth, "widen_factor": model_cfg.widen_factor} if model_cfg.arch == "wideresnet" else {}
