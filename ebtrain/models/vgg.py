"""CIFAR VGG as in network slimming (Liu et al., 2017) and the Early-Bird reference code.

One conv3x3-BN-ReLU per number of a channel list, a max-pool at each 'M', global average pooling and
one linear layer. A pruned VGG is the same class built from a list with smaller numbers.
"""
from __future__ import annotations

import torch
from torch import nn

from ebtrain.errors import UserError
from ebtrain.models.registry import ChannelPlan, Cut, check_channels, init_weights, make_arch, register, scaled

DEFAULT_CFGS: dict[str, list] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512],
}


class VGG(nn.Module):
    """VGG built from `cfg`: channel counts (absolute, already width-scaled) and 'M' for max-pool."""

    def __init__(self, name: str, cfg: list, num_classes: int, in_channels: int, width: float,
                 image_size: int):
        super().__init__()
        cfg = _check_cfg(cfg, name)
        self.arch = make_arch(name, num_classes, in_channels, width, image_size, cfg=cfg)
        layers: list[nn.Module] = []
        channels = in_channels
        for entry in cfg:
            if entry == "M":
                # ceil_mode keeps odd sides alive (28 -> 14 -> 7 -> 4 -> 2), so MNIST-sized and
                # 8x8 inputs go through all four pools.
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, entry, 3, padding=1, bias=False),
                           nn.BatchNorm2d(entry), nn.ReLU(inplace=True)]
                channels = entry
        self.features = nn.Sequential(*layers)
        # On 32x32 input the features end at 2x2, where this equals the reference's AvgPool2d(2).
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self, bn_weight=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def prunable_bns(self) -> list[tuple[str, nn.BatchNorm2d]]:
        """Every BN: each one's channels can be cut from its conv and from the next conv."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, nn.BatchNorm2d)]

    def channel_plan(self, indices: dict[str, torch.Tensor]) -> ChannelPlan:
        """Each conv loses the channels its BN drops, the next conv (or the classifier) those inputs."""
        cfg: list = []
        cuts: dict[str, Cut] = {}
        previous = None  # the first conv reads the whole image
        for i, layer in enumerate(self.features):
            if isinstance(layer, nn.MaxPool2d):
                cfg.append("M")
            elif isinstance(layer, nn.Conv2d):
                conv, bn = f"features.{i}", f"features.{i + 1}"  # every conv is followed by its BN
                kept = indices[bn]
                cuts[conv], cuts[bn] = (kept, previous), (kept, None)
                cfg.append(len(kept))
                previous = kept
        cuts["classifier"] = (None, previous)
        return ChannelPlan(cfg, cuts, {})


def _check_cfg(cfg: list, name: str) -> list:
    if not any(entry != "M" for entry in cfg):
        raise UserError(f"arch '{name}': cfg needs at least one channel count, got {cfg}")
    channels = check_channels([entry for entry in cfg if entry != "M"], name)
    counts = iter(channels)
    return ["M" if entry == "M" else next(counts) for entry in cfg]


def _register(name: str) -> None:
    @register(name)
    def build(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32,
              cfg: list | None = None) -> VGG:
        """CIFAR VGG; `cfg` (absolute channel counts and 'M') replaces the width-scaled default."""
        if cfg is None:
            cfg = [entry if entry == "M" else scaled(entry, width) for entry in DEFAULT_CFGS[name]]
        return VGG(name, cfg, num_classes, in_channels, width, image_size)


for _name in DEFAULT_CFGS:
    _register(_name)
