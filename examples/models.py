"""The network of the question bnguard started from: a ResNet-18-style stack of residual blocks."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """Two 3x3 convolutions, each followed by BatchNorm; optionally a 1x1 convolution on the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1, project: bool = False, bn_momentum: float | None = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride) if project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SeedNet(nn.Module):
    """7x7 stride-2 stem with BatchNorm and max-pool, four stages of two blocks (widths w, 2w, 4w, 8w),
    global average pooling and a linear head. Each stage opens with a 1x1 projection on its shortcut;
    the projections carry no BatchNorm, so there are 17 BatchNorm layers, as in the original question."""

    def __init__(self, num_classes: int, width: int = 16, in_channels: int = 3, bn_momentum: float | None = 0.1):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width, momentum=bn_momentum),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, cin = [], width
        for stage in range(4):
            cout = width * 2**stage
            blocks += [
                Residual(cin, cout, 1 if stage == 0 else 2, project=True, bn_momentum=bn_momentum),
                Residual(cout, cout, bn_momentum=bn_momentum),
            ]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
