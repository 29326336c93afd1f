"""The lottery-ticket paper's small networks (Frankle & Carbin, 2019): LeNet-300-100 and Conv-2/4/6.

No BatchNorm, so nothing here is channel-prunable; these are for unstructured weight pruning.
"""
from __future__ import annotations

import torch
from torch import nn

from ebtrain.errors import UserError
from ebtrain.models.registry import make_arch, register, scaled


class _PlainNet(nn.Module):
    """A `layers` stack with Glorot-normal weights and zero biases, as in the lottery-ticket paper."""

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def prunable_bns(self) -> list[tuple[str, nn.BatchNorm2d]]:
        """None: these networks have no BatchNorm."""
        return []


class LeNet300100(_PlainNet):
    """Fully connected: flattened image -> 300 -> 100 -> classes, ReLU between."""

    def __init__(self, num_classes: int, in_channels: int, width: float, image_size: int):
        super().__init__()
        self.arch = make_arch("lenet300_100", num_classes, in_channels, width, image_size)
        hidden1, hidden2 = scaled(300, width), scaled(100, width)
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * image_size ** 2, hidden1), nn.ReLU(inplace=True),
            nn.Linear(hidden1, hidden2), nn.ReLU(inplace=True), nn.Linear(hidden2, num_classes))
        self._init_weights()


class ConvNet(_PlainNet):
    """Conv-2/4/6: `num_pairs` pairs of 3x3 convs (64, 128, 256 channels), each pair followed by a
    2x2 max-pool, then fully connected 256 -> 256 -> classes."""

    def __init__(self, name: str, num_pairs: int, num_classes: int, in_channels: int, width: float,
                 image_size: int):
        super().__init__()
        self.arch = make_arch(name, num_classes, in_channels, width, image_size)
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        for base in (64, 128, 256)[:num_pairs]:
            out = scaled(base, width)
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(out, out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels, side = out, side // 2
        if side < 1:
            raise UserError(f"arch '{name}' pools {num_pairs} times: image_size {image_size} is too small")
        hidden = scaled(256, width)
        layers += [nn.Flatten(), nn.Linear(channels * side ** 2, hidden), nn.ReLU(inplace=True),
                   nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)]
        self.layers = nn.Sequential(*layers)
        self._init_weights()


@register("lenet300_100")
def lenet300_100(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 image_size: int = 32) -> LeNet300100:
    """LeNet-300-100 on flattened `in_channels` x `image_size`^2 inputs."""
    return LeNet300100(num_classes, in_channels, width, image_size)


def _register_conv(num_pairs: int) -> None:
    name = f"conv{2 * num_pairs}"

    @register(name)
    def build(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
              image_size: int = 32) -> ConvNet:
        """Frankle & Carbin's Conv-2/4/6."""
        return ConvNet(name, num_pairs, num_classes, in_channels, width, image_size)


for _pairs in (1, 2, 3):
    _register_conv(_pairs)
