"""Pre-activation bottleneck ResNet for CIFAR with channel selection, as in network slimming.

The residual stream is never pruned, so the BN that opens each block (and the BN before the
classifier) keeps its full width; a ChannelSelection layer after it hands the next conv only the
kept channels. The inner channels of a block (after bn2 and bn3) are cut physically.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ebtrain.errors import UserError
from ebtrain.models.registry import ChannelPlan, Cut, check_channels, init_weights, make_arch, register, scaled

EXPANSION = 4
STAGE_WIDTHS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)


class ChannelSelection(nn.Module):
    """Passes on only the channels whose `mask` entry is True (all of them when dense)."""

    def __init__(self, num_channels: int, num_selected: int):
        super().__init__()
        # Until a state dict says which, a pruned selection keeps the first channels; for a freshly
        # initialized network any choice is as good as another.
        mask = torch.zeros(num_channels, dtype=torch.bool)
        mask[:num_selected] = True
        self.register_buffer("mask", mask)
        self.register_buffer("index", torch.empty(0, dtype=torch.long), persistent=False)
        self._sync()

    def _sync(self) -> None:
        # The indices are cached so forward never waits on the device to find them.
        self.index = self.mask.nonzero().squeeze(1)
        self.dense = bool(self.mask.all())

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._sync()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dense else x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} of {self.mask.numel()}"


class Bottleneck(nn.Module):
    """bn1 -> select -> relu -> conv1 1x1 -> bn2 -> relu -> conv2 3x3 -> bn3 -> relu -> conv3 1x1, + x.

    `cfg` = (channels selected from the input, conv1 out, conv2 out).
    """

    def __init__(self, inplanes: int, planes: int, cfg: list[int], stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = ChannelSelection(inplanes, cfg[0])
        self.conv1 = nn.Conv2d(cfg[0], cfg[1], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cfg[1])
        self.conv2 = nn.Conv2d(cfg[1], cfg[2], 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cfg[2])
        self.conv3 = nn.Conv2d(cfg[2], planes * EXPANSION, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        reshapes = stride != 1 or inplanes != planes * EXPANSION
        self.downsample = (nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False)
                           if reshapes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.select(self.bn1(x))))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + (x if self.downsample is None else self.downsample(x))


def _block_plan(depth: int, width: float) -> list[tuple[int, int, int]]:
    """(input channels, planes, stride) of every block, in network order."""
    if depth < 11 or (depth - 2) % 9:
        raise UserError(f"preresnet depth must be 9n+2 (11, 20, 29, ..., 56, 101, 164), got {depth}")
    blocks_per_stage = (depth - 2) // 9
    plan, inplanes = [], scaled(STAGE_WIDTHS[0], width)
    for base, stride in zip(STAGE_WIDTHS, STAGE_STRIDES):
        planes = scaled(base, width)
        for b in range(blocks_per_stage):
            plan.append((inplanes, planes, stride if b == 0 else 1))
            inplanes = planes * EXPANSION
    return plan


def default_cfg(depth: int, width: float) -> list[int]:
    """Dense channel config: (selected inputs, conv1 out, conv2 out) per block, then the final width."""
    plan = _block_plan(depth, width)
    return [c for inplanes, planes, _ in plan for c in (inplanes, planes, planes)] + \
        [plan[-1][1] * EXPANSION]


class PreResNet(nn.Module):
    """Pre-activation bottleneck ResNet, depth 9n+2, stages of 16/32/64 (x width) planes."""

    def __init__(self, name: str, depth: int, cfg: list[int] | None, num_classes: int,
                 in_channels: int, width: float, image_size: int):
        super().__init__()
        plan = _block_plan(depth, width)
        cfg = check_channels(default_cfg(depth, width) if cfg is None else cfg, name, 3 * len(plan) + 1)
        self.arch = make_arch(name, num_classes, in_channels, width, image_size, depth=depth, cfg=cfg)
        final_width = plan[-1][1] * EXPANSION
        for (inplanes, _, _), selected in zip(plan + [(final_width, 0, 0)], cfg[::3]):
            if selected > inplanes:
                raise UserError(f"arch '{name}': cfg selects {selected} of {inplanes} channels")
        self.conv1 = nn.Conv2d(in_channels, plan[0][0], 3, padding=1, bias=False)
        blocks = [Bottleneck(inplanes, planes, cfg[3 * i:3 * i + 3], stride)
                  for i, (inplanes, planes, stride) in enumerate(plan)]
        per_stage = len(plan) // len(STAGE_WIDTHS)
        self.layers = nn.Sequential(*(nn.Sequential(*blocks[s:s + per_stage])
                                      for s in range(0, len(blocks), per_stage)))
        self.bn = nn.BatchNorm2d(final_width)
        self.select = ChannelSelection(final_width, cfg[-1])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cfg[-1], num_classes)
        init_weights(self, bn_weight=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.conv1(x))
        x = self.relu(self.select(self.bn(x)))
        return self.fc(self.pool(x).flatten(1))

    def prunable_bns(self) -> list[tuple[str, nn.BatchNorm2d]]:
        """Every BN: bn1s and the final bn through their channel selection, bn2/bn3 physically."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, nn.BatchNorm2d)]

    def channel_plan(self, indices: dict[str, torch.Tensor]) -> ChannelPlan:
        """bn2 and bn3 are cut physically with the convs around them; bn1 and the final bn keep the residual
        stream whole and narrow their channel selection instead."""
        cfg: list = []
        cuts: dict[str, Cut] = {}
        masks: dict[str, torch.Tensor] = {}

        def select(name: str, bn: str) -> torch.Tensor:
            """Narrow channel selection `name` to the kept channels of `bn`; return which of the
            channels it passed on so far it still passes on (the cut of the next layer's input)."""
            selection: ChannelSelection = self.get_submodule(name)
            keep = torch.zeros_like(selection.mask)
            keep[indices[bn]] = True
            still = keep[selection.index].nonzero().squeeze(1)
            if len(still) == 0:
                raise ValueError(f"keep mask removes every channel that {name} selects")
            masks[f"{name}.mask"] = selection.mask & keep
            return still

        for name, block in self.named_modules():
            if isinstance(block, Bottleneck):
                inputs = select(f"{name}.select", f"{name}.bn1")
                mid, out = indices[f"{name}.bn2"], indices[f"{name}.bn3"]
                cuts[f"{name}.conv1"], cuts[f"{name}.bn2"] = (mid, inputs), (mid, None)
                cuts[f"{name}.conv2"], cuts[f"{name}.bn3"] = (out, mid), (out, None)
                cuts[f"{name}.conv3"] = (None, out)
                cfg += [len(inputs), len(mid), len(out)]
        inputs = select("select", "bn")
        cuts["fc"] = (None, inputs)
        cfg.append(len(inputs))
        return ChannelPlan(cfg, cuts, masks)


def _register(name: str, default_depth: int | None) -> None:
    @register(name)
    def build(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32,
              depth: int = default_depth or 56, cfg: list[int] | None = None) -> PreResNet:
        """PreResNet of `depth` (9n+2); `cfg` (absolute channel counts) replaces the dense default."""
        if default_depth is not None and depth != default_depth:
            raise UserError(f"arch '{name}' has depth {default_depth}; use arch 'preresnet' with "
                            f"depth={depth}")
        return PreResNet(name, depth, cfg, num_classes, in_channels, width, image_size)


for _name, _depth in (("preresnet", None), ("preresnet56", 56), ("preresnet101", 101),
                      ("preresnet164", 164)):
    _register(_name, _depth)
