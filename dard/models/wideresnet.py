"""WideResNet (Zagoruyko & Komodakis) with RobustBench's module names, the usual robust teacher.

The attribute names (``conv1``, ``block1.layer.0.bn1``, ``convShortcut``, ``bn1``, ``fc`` ...)
match ``robustbench/model_zoo/architectures/wide_resnet.py``, so RobustBench's CIFAR-10 L-inf
WideResNet checkpoints (e.g. TRADES WRN-34-10 with ``sub_block1=True``, WRN-28-10 models) load
with ``load_state_dict(strict=True)``. Like those models it expects raw [0, 1] inputs: no
normalisation by default (``normalize=True`` adds CIFAR statistics, as non-persistent buffers).
WRN-34-10: 46.2M parameters; WRN-28-10: 36.5M (10 classes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dard.models.registry import Normalize, default_normalize, register


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        # Pre-activation; when the shapes differ the shortcut sees the activated input (as upstream).
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))
            out = x
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.equal_in_out else self.convShortcut(x))


class NetworkBlock(nn.Module):
    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(num_layers)
        ])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10, in_channels: int = 3,
                 sub_block1: bool = False, drop_rate: float = 0.0, normalize: bool = False):
        super().__init__()
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = default_normalize(in_channels) if normalize else Normalize((0.0,) * in_channels, (1.0,) * in_channels)
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        if sub_block1:  # present (unused in forward) in the TRADES WRN-34-10 checkpoint
            self.sub_block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.n_channels = ch[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register("wideresnet")
def wideresnet(num_classes: int = 10, in_channels: int = 3, depth: int = 34, widen_factor: int = 10,
               sub_block1: bool = False, drop_rate: float = 0.0, normalize: bool = False) -> WideResNet:
    return WideResNet(depth, widen_factor, num_classes, in_channels, sub_block1, drop_rate, normalize)


def _check(depth: int = 34, widen_factor: int = 10, drop_rate: float = 0.0, **_) -> list[str]:
    return ([] if depth >= 10 and (depth - 4) % 6 == 0 else [f"depth: WideResNet depth must be 6n+4 (e.g. 28, 34), "
                                                             f"got {depth}"]) + \
        ([] if widen_factor >= 1 else [f"widen_factor: must be >= 1, got {widen_factor}"]) + \
        ([] if 0 <= drop_rate < 1 else [f"drop_rate: must be in [0, 1), got {drop_rate}"])


@register("wrn34_10")
def wrn34_10(num_classes: int = 10, in_channels: int = 3, sub_block1: bool = False, drop_rate: float = 0.0,
             normalize: bool = False) -> WideResNet:
    return WideResNet(34, 10, num_classes, in_channels, sub_block1, drop_rate, normalize)


@register("wrn28_10")
def wrn28_10(num_classes: int = 10, in_channels: int = 3, sub_block1: bool = False, drop_rate: float = 0.0,
             normalize: bool = False) -> WideResNet:
    return WideResNet(28, 10, num_classes, in_channels, sub_block1, drop_rate, normalize)


wideresnet.check = wrn34_10.check = wrn28_10.check = _check
