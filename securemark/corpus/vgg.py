"""VGG-11 with batch norm in the layout of torchvision.models.vgg, its channels scaled by ``width / 64``."""

from __future__ import annotations

import torch
from torch import nn

from securemark.corpus.init import torchvision_init

CFG_A: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def make_layers(cfg: list[int | str], in_channels: int, width: int) -> nn.Sequential:
    """Conv 3x3 + BatchNorm + ReLU per number in ``cfg`` (scaled by width/64), a 2x2 max pool per 'M'."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out = int(v) * width // 64
            layers += [
                nn.Conv2d(in_channels, out, kernel_size=3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            in_channels = out
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, features: nn.Sequential, channels: int, num_classes: int = 10, hidden: int = 4096) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )
        torchvision_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg11_bn(num_classes: int = 10, in_channels: int = 3, width: int = 64, hidden: int = 4096) -> VGG:
    return VGG(make_layers(CFG_A, in_channels, width), 512 * width // 64, num_classes, hidden)
