"""Post-activation ResNets with basic blocks: ResNet-20/32/56 for CIFAR (He et al., 2016) and
ResNet-18 with a CIFAR stem (3x3 conv, no max-pool).

Only the channels inside a block (after conv1/bn1) can be pruned: every other BN feeds the residual
sum, whose width all blocks of a stage share.
"""
from __future__ import annotations

import torch
from torch import nn

from ebtrain.models.registry import ChannelPlan, Cut, check_channels, init_weights, make_arch, register, scaled


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); `inner` = conv1's output channels."""

    def __init__(self, inplanes: int, inner: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, inner, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stages of basic blocks, stride 2 at the start of every stage but the first.

    `cfg` holds the inner width of every block (absolute, already width-scaled).
    """

    def __init__(self, name: str, stage_widths: tuple[int, ...], blocks_per_stage: int,
                 cfg: list[int] | None, num_classes: int, in_channels: int, width: float,
                 image_size: int):
        super().__init__()
        planes = [scaled(w, width) for w in stage_widths]
        plan = [(planes[s], 2 if s > 0 and b == 0 else 1)
                for s in range(len(planes)) for b in range(blocks_per_stage)]
        cfg = check_channels([p for p, _ in plan] if cfg is None else cfg, name, len(plan))
        self.arch = make_arch(name, num_classes, in_channels, width, image_size, cfg=cfg)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, planes[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(planes[0]), nn.ReLU(inplace=True))
        blocks, inplanes = [], planes[0]
        for (block_planes, stride), inner in zip(plan, cfg):
            blocks.append(BasicBlock(inplanes, inner, block_planes, stride))
            inplanes = block_planes
        self.layers = nn.Sequential(*(nn.Sequential(*blocks[s:s + blocks_per_stage])
                                      for s in range(0, len(blocks), blocks_per_stage)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        init_weights(self, bn_weight=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))

    def prunable_bns(self) -> list[tuple[str, nn.BatchNorm2d]]:
        """The bn1 of every block, in network order."""
        return [(f"{name}.bn1", m.bn1) for name, m in self.named_modules() if isinstance(m, BasicBlock)]

    def channel_plan(self, indices: dict[str, torch.Tensor]) -> ChannelPlan:
        """Inside each block: conv1 and bn1 lose the channels bn1 drops, conv2 those inputs."""
        cfg: list = []
        cuts: dict[str, Cut] = {}
        for name, block in self.named_modules():
            if isinstance(block, BasicBlock):
                kept = indices[f"{name}.bn1"]
                cuts[f"{name}.conv1"], cuts[f"{name}.bn1"] = (kept, None), (kept, None)
                cuts[f"{name}.conv2"] = (None, kept)
                cfg.append(len(kept))
        return ChannelPlan(cfg, cuts, {})


def _register(name: str, stage_widths: tuple[int, ...], blocks_per_stage: int) -> None:
    @register(name)
    def build(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32,
              cfg: list[int] | None = None) -> ResNet:
        """Post-activation ResNet; `cfg` (inner width per block, absolute) replaces the default."""
        return ResNet(name, stage_widths, blocks_per_stage, cfg, num_classes, in_channels, width,
                      image_size)


for _name, _blocks in (("resnet20", 3), ("resnet32", 5), ("resnet56", 9)):
    _register(_name, (16, 32, 64), _blocks)
_register("resnet18", (64, 128, 256, 512), 2)
