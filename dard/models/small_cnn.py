"""Small CNNs for the embedded digits (8x8 grey), also valid on 28x28 grey and 32x32 RGB.

``cnn_small`` (~14k parameters) is the digits student; ``cnn_medium`` (~114k) and ``cnn_large``
(~0.5M parameters, ~25x the student's FLOPs on 8x8) are digits teachers
(``benchmarks/results/teacher-digits.md``). ``width`` (``model.kwargs.width``) scales every layer's
channels (rounded, at least 1): cnn_small at width 0.25 has ~1k parameters, at 0.5 ~3.8k.
"""
from __future__ import annotations

from torch import nn

from dard.models.registry import default_normalize, register


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, widths: tuple[int, ...], strides: tuple[int, ...], num_classes: int, in_channels: int,
                 width: float = 1.0):
        super().__init__()
        widths = tuple(max(1, round(w * width)) for w in widths)
        self.normalize = default_normalize(in_channels)
        layers, c = [], in_channels
        for w, s in zip(widths, strides):
            layers.append(_block(c, w, s))
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(self.normalize(x))).flatten(1))


def _check(width: float = 1.0) -> list[str]:
    return [] if 0 < width <= 16 else [f"width: must be in (0, 16], got {width}"]


@register("cnn_small")
def cnn_small(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> SmallCNN:
    return SmallCNN((16, 32, 32), (1, 2, 1), num_classes, in_channels, width)


@register("cnn_medium")
def cnn_medium(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> SmallCNN:
    return SmallCNN((64, 64, 128), (1, 2, 1), num_classes, in_channels, width)


@register("cnn_large")
def cnn_large(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> SmallCNN:
    return SmallCNN((64, 128, 128, 256), (1, 2, 1, 2), num_classes, in_channels, width)


cnn_small.check = cnn_medium.check = cnn_large.check = _check
