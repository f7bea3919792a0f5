"""The one model factory: ConvNet, MLP, ResNet18, AlexNet and ViT for small images, or a user's model class."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ddm_ops.config import ModelParams, ParamsError, import_dotted


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


class AlexNet(nn.Module):
    """AlexNet for small images: five 3x3 convs (width, 3, 6, 4, 4 x width channels) with three 2x2 max-pools, then
    two hidden layers of 8 x width units. No dropout: it would make every gradient that matching compares random.
    He initialisation: with torch's default one the signal of this eight-layer ReLU stack without normalisation
    fades, and on digits its loss stayed at ln 10 for ten epochs (measured)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: int):
        super().__init__()
        c, h, w = in_shape
        w1, w2, w3, w4 = width, 3 * width, 6 * width, 4 * width
        self.features = nn.Sequential(
            nn.Conv2d(c, w1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w1, w2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w2, w3, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w3, w4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w4, w4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        hidden = 8 * width
        self.classifier = nn.Sequential(
            nn.Linear(w4 * (h // 8) * (w // 8), hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resnet18(in_shape: tuple[int, int, int], num_classes: int, norm: str) -> nn.Module:
    """torchvision's ResNet18 with the small-image stem (3x3 stride-1 first conv, no max-pool), as for CIFAR."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes, norm_layer=lambda c: _norm(norm, c))
    model.conv1 = nn.Conv2d(in_shape[0], 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def _vit(in_shape: tuple[int, int, int], num_classes: int, params: ModelParams) -> nn.Module:
    """torchvision's VisionTransformer: `depth` blocks of `heads` heads, embedding `width`, MLP 4 x width."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(
        image_size=in_shape[1],
        patch_size=params.patch_size,
        num_layers=params.depth,
        num_heads=params.heads,
        hidden_dim=params.width,
        mlp_dim=4 * params.width,
        num_classes=num_classes,
    )
    model.conv_proj = nn.Conv2d(in_shape[0], params.width, params.patch_size, stride=params.patch_size)
    return model


def _user_model(params: ModelParams, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    model = import_dotted("model.name", params.name)(in_shape, num_classes)
    if not isinstance(model, nn.Module):
        raise ParamsError(f"model.name = {params.name!r}: must build a torch.nn.Module from (in_shape, num_classes)")
    return model


def check_model_fits(params: ModelParams, in_shape: tuple[int, int, int]) -> None:
    """Raise ParamsError when the architecture cannot take images of `in_shape` (C, H, W)."""
    _, h, w = in_shape
    if params.name == "convnet" and min(h, w) >> params.depth == 0:
        raise ParamsError(
            f"model.depth = {params.depth}: {h}x{w} images allow at most {min(h, w).bit_length() - 1} convnet blocks"
        )
    if params.name == "alexnet" and min(h, w) < 8:
        raise ParamsError(f"model.name = 'alexnet': needs images of at least 8x8, got {h}x{w}")
    if params.name == "vit" and (h != w or h % params.patch_size):
        raise ParamsError(f"model.patch_size = {params.patch_size}: vit needs square images it divides, got {h}x{w}")


_RNG_LOCK = threading.Lock()  # layers draw their initial weights from torch's one process-wide generator


def build_model(params: ModelParams, in_shape: tuple[int, int, int], num_classes: int, seed: int) -> nn.Module:
    """Build the configured model with its initial weights drawn from `seed`.

    Safe under threads: the global generator is seeded and drawn from while no other thread builds a model, and
    the caller's generator state is restored afterwards (`fork_rng`)."""
    check_model_fits(params, in_shape)
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _construct(params, in_shape, num_classes)


def _construct(params: ModelParams, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    if params.name == "convnet":
        return ConvNet(in_shape, num_classes, params.width, params.depth, params.norm)
    if params.name == "mlp":
        return MLP(in_shape, num_classes, params.width, params.depth)
    if params.name == "alexnet":
        return AlexNet(in_shape, num_classes, params.width)
    if params.name == "resnet18":
        return _resnet18(in_shape, num_classes, params.norm)
    if params.name == "vit":
        return _vit(in_shape, num_classes, params)
    return _user_model(params, in_shape, num_classes)


def functional_mode(model: nn.Module, batchnorm: str) -> nn.Module:
    """Put a model in the mode that matching and removal use: eval (no dropout, BatchNorm with the running
    statistics of the weights passed in), or with `batchnorm` "train", BatchNorm normalising by the statistics of
    each batch without updating any running statistics. Returns the model."""
    model.eval()
    if batchnorm == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats = False
    return model


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for predictions (BatchNorm with running statistics, no dropout), then every module
    back in the mode it had (e.g. functional_mode's BatchNorm in train mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def classifier_head(model: nn.Module) -> nn.Linear:
    """The model's last linear layer (its classifier), whose input is the penultimate representation."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ParamsError("record_trajectory.features = 'penultimate' needs a model whose last layer is nn.Linear")
    return linears[-1]


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """The input of the classifier head for every image of x (N, D), computed in eval mode, `batch` at a time."""
    head, captured, parts = classifier_head(model), [], []
    handle = head.register_forward_hook(lambda m, inputs, output: captured.append(inputs[0].flatten(1)))
    try:
        with evaluating(model):
            for chunk in x.split(batch):
                captured.clear()
                out = model(chunk)
                if len(captured) != 1 or out.shape != (len(chunk), head.out_features):
                    raise ParamsError(
                        "record_trajectory.features = 'penultimate': the model's last nn.Linear is not its output "
                        "layer; use features: pixels"
                    )
                parts.append(captured[0])
    finally:
        handle.remove()
    return torch.cat(parts)
