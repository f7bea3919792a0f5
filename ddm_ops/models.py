"""The one model factory: DC-style ConvNet (conv-norm-relu-pool blocks) and an MLP."""

from __future__ import annotations

import torch
from torch import nn

from ddm_ops.config import ModelParams


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instancenorm":  # as in Dataset Condensation: per-sample, per-channel, affine
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class ConvNet(nn.Module):
    """depth x [conv3x3 -> norm -> relu -> avgpool2], then a linear classifier."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: int, depth: int, norm: str):
        super().__init__()
        c, h, w = in_shape
        if min(h, w) >> depth == 0:
            raise ValueError(
                f"model.depth = {depth}: too deep for {h}x{w} images (at most {min(h, w).bit_length() - 1})"
            )
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), _norm(norm, width), nn.ReLU(), nn.AvgPool2d(2)]
            c, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(c * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """depth hidden layers of `width` ReLU units."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: int, depth: int):
        super().__init__()
        d = in_shape[0] * in_shape[1] * in_shape[2]
        layers: list[nn.Module] = [nn.Flatten()]
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(params: ModelParams, in_shape: tuple[int, int, int], num_classes: int, seed: int) -> nn.Module:
    """Build the configured model with its initial weights drawn from `seed`."""
    torch.manual_seed(seed)
    if params.name == "convnet":
        return ConvNet(in_shape, num_classes, params.width, params.depth, params.norm)
    return MLP(in_shape, num_classes, params.width, params.depth)
