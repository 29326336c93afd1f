"""Post-activation ResNets (He et al., 2016): ResNet-20/32/56 for CIFAR, ResNet-18 with a CIFAR stem (3x3 conv,
no max-pool), and ResNet-18 and ResNet-50 in their ImageNet form (7x7 stride-2 conv and a 3x3 stride-2 max-pool
before the four stages; bottleneck blocks in ResNet-50).

Only the channels inside a block can be pruned (after bn1 of a basic block, after bn1 and bn2 of a bottleneck):
every other BN feeds the residual sum, whose width all blocks of a stage share.
"""
from __future__ import annotations

import torch
from torch import nn

from ebtrain.models.registry import ChannelPlan, Cut, check_channels, init_weights, make_arch, register, scaled


def _shortcut(inplanes: int, planes: int, stride: int) -> nn.Module:
    """The identity, or a strided 1x1 conv and BN where the block changes the width or the resolution."""
    if stride != 1 or inplanes != planes:
        return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    return nn.Identity()


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), two 3x3 convs; `inner` = [conv1's output channels]."""

    expansion = 1  # the block's output channels per channel of its stage width
    inner_layers = 1  # conv/BN pairs inside the block (prunable), before the last one, which feeds the sum

    def __init__(self, inplanes: int, inner: list[int], planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, inner[0], 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner[0])
        self.conv2 = nn.Conv2d(inner[0], planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(inplanes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)): 1x1 to inner[0], 3x3 to inner[1]
    (strided, as in torchvision's ResNet v1.5), 1x1 to `planes` (4 x the stage width)."""

    expansion = 4
    inner_layers = 2

    def __init__(self, inplanes: int, inner: list[int], planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, inner[0], 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner[0])
        self.conv2 = nn.Conv2d(inner[0], inner[1], 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner[1])
        self.conv3 = nn.Conv2d(inner[1], planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(inplanes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _stem(kind: str, in_channels: int, planes: int) -> nn.Sequential:
    """cifar: 3x3 conv at full resolution; imagenet: 7x7 stride-2 conv, then 3x3 stride-2 max-pool (a quarter of
    the side before the first stage)."""
    if kind == "cifar":
        return nn.Sequential(nn.Conv2d(in_channels, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes),
                             nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(in_channels, planes, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(planes),
                         nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))


class ResNet(nn.Module):
    """A stem, stages of `blocks[s]` blocks each, stride 2 at the start of every stage but the first, global
    average pooling and one linear layer.

    `cfg` holds the inner widths of every block in network order (one per basic block, two per bottleneck;
    absolute, already width-scaled).
    """

    def __init__(self, name: str, block: type[BasicBlock | Bottleneck], stem: str, stage_widths: tuple[int, ...],
                 blocks: tuple[int, ...], cfg: list[int] | None, num_classes: int, in_channels: int, width: float,
                 image_size: int):
        super().__init__()
        planes = [scaled(w, width) for w in stage_widths]
        default = [p for p, n in zip(planes, blocks) for _ in range(n * block.inner_layers)]
        cfg = check_channels(default if cfg is None else cfg, name, len(default))
        self.arch = make_arch(name, num_classes, in_channels, width, image_size, cfg=cfg)
        self.stem = _stem(stem, in_channels, planes[0])
        layers, inplanes, inner = [], planes[0], iter(cfg)
        for s, (stage_planes, n) in enumerate(zip(planes, blocks)):
            stage = []
            for b in range(n):
                widths = [next(inner) for _ in range(block.inner_layers)]
                stage.append(block(inplanes, widths, stage_planes * block.expansion, 2 if s > 0 and b == 0 else 1))
                inplanes = stage_planes * block.expansion
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        init_weights(self, bn_weight=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))

    def _blocks(self) -> list[tuple[str, BasicBlock | Bottleneck]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, (BasicBlock, Bottleneck))]

    def prunable_bns(self) -> list[tuple[str, nn.BatchNorm2d]]:
        """The inner BNs of every block (bn1; bn1 and bn2 of a bottleneck), in network order."""
        return [(f"{name}.bn{i}", getattr(block, f"bn{i}")) for name, block in self._blocks()
                for i in range(1, block.inner_layers + 1)]

    def channel_plan(self, indices: dict[str, torch.Tensor]) -> ChannelPlan:
        """Inside each block, along its chain of convs: conv i and bn i lose the channels bn i drops, and
        conv i+1 those inputs; the last conv keeps its outputs (they join the residual sum)."""
        cfg: list = []
        cuts: dict[str, Cut] = {}
        for name, block in self._blocks():
            previous = None  # the kept channels of the conv before, which are this conv's inputs
            for i in range(1, block.inner_layers + 2):
                kept = indices[f"{name}.bn{i}"] if i <= block.inner_layers else None
                cuts[f"{name}.conv{i}"] = (kept, previous)
                if kept is not None:
                    cuts[f"{name}.bn{i}"] = (kept, None)
                    cfg.append(len(kept))
                previous = kept
        return ChannelPlan(cfg, cuts, {})


def _register(name: str, stage_widths: tuple[int, ...], blocks: tuple[int, ...],
              block: type[BasicBlock | Bottleneck] = BasicBlock, stem: str = "cifar") -> None:
    @register(name)
    def build(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32,
              cfg: list[int] | None = None) -> ResNet:
        """Post-activation ResNet; `cfg` (inner widths of every block, absolute) replaces the default."""
        return ResNet(name, block, stem, stage_widths, blocks, cfg, num_classes, in_channels, width, image_size)


for _name, _blocks in (("resnet20", 3), ("resnet32", 5), ("resnet56", 9)):
    _register(_name, (16, 32, 64), (_blocks,) * 3)
_register("resnet18", (64, 128, 256, 512), (2, 2, 2, 2))
# Their own names, not resnet18 chosen by image size: a saved resnet18 (any image size) must rebuild as it was.
_register("resnet18_imagenet", (64, 128, 256, 512), (2, 2, 2, 2), stem="imagenet")
_register("resnet50_imagenet", (64, 128, 256, 512), (3, 4, 6, 3), block=Bottleneck, stem="imagenet")
