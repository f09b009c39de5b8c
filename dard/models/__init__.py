"""Model registry: small CNNs (digits), ResNet-18, MobileNetV2, WideResNet (RobustBench keys)."""
from dard.models import mobilenetv2, resnet, small_cnn, wideresnet  # noqa: F401  (registration)
from dard.models.io import ModelFileError, NonFiniteWeightsError, file_sha256, load_model, load_teacher, save_model
from dard.models.registry import Normalize, available, build, count_parameters, knobs, unwrap

__all__ = ["ModelFileError", "NonFiniteWeightsError", "Normalize", "available", "build", "build_for", "count_parameters",
           "file_sha256", "load_model", "load_teacher", "load_teacher_for", "save_model", "unwrap", "arch_kwargs"]


def build_for(model_cfg, data_cfg):
    """The configured architecture sized for the dataset of ``data_cfg`` (classes, input channels)."""
    return build(model_cfg.arch, data_cfg.num_classes, data_cfg.image_shape[0], **arch_kwargs(model_cfg))


def load_teacher_for(path, data_cfg, arch: str | None = None, *, data: bytes | None = None):
    """:func:`load_teacher` checked against the dataset of ``data_cfg`` (classes, input channels);
    ``arch`` None: what a dard file says (a bare state dict needs it). Returns (model, header)."""
    return load_teacher(path, arch, data_cfg.num_classes, data_cfg.image_shape[0], data=data)


def arch_kwargs(model_cfg) -> dict:
    """The architecture's own knobs (``model.kwargs``) as the model file records them: those at
    their default left out, so a file does not depend on how its config spelled them."""
    defaults = knobs(model_cfg.arch)
    return {k: v for k, v in model_cfg.kwargs.items() if defaults.get(k) != v}
