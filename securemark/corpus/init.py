"""The weight initialization torchvision's VGG and MobileNetV2 share: Kaiming-normal convolutions (fan out),
BatchNorm at 1 and 0, Linear layers N(0, 0.01), biases 0."""

from __future__ import annotations

from torch import nn


def torchvision_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
