"""The model registry and what every family's file builds on: a model is a name plus keyword arguments.

Kept apart from `ebtrain.models` (which imports the families so that they register) so that the family
files import it without importing their own package back.
"""
from __future__ import annotations

import difflib
import inspect
import numbers
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ebtrain.errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model constructor available to `build_model` under `name`."""
    def decorate(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = constructor
        return constructor
    return decorate


def list_models() -> list[str]:
    """Names of all registered models, in registration order."""
    return list(_REGISTRY)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                image_size: int = 32, **kwargs: Any) -> nn.Module:
    """Build the registered model `name`; `kwargs` are the family's own options (`depth`, `cfg`)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name).lower(), list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown arch '{name}'{hint}: choose from {', '.join(_REGISTRY)}")
    constructor = _REGISTRY[name]
    accepted = inspect.signature(constructor).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        family = sorted(set(accepted) - {"num_classes", "in_channels", "width", "image_size"})
        raise UserError(f"arch '{name}' takes no option {', '.join(unknown)} "
                        f"(its own options: {', '.join(family) or 'none'})")
    return constructor(num_classes=num_classes, in_channels=in_channels, width=width,
                       image_size=image_size, **kwargs)


def make_arch(name: str, num_classes: int, in_channels: int, width: float, image_size: int,
              **family: Any) -> dict:
    """Check the uniform constructor arguments and return them as a model's JSON-able `arch` dict."""
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels),
                        ("image_size", image_size)):
        if not _positive_int(value):
            raise UserError(f"{what} must be a positive integer, got {value!r}")
    if not width > 0:
        raise UserError(f"width must be positive, got {width!r}")
    return {"name": name, "num_classes": int(num_classes), "in_channels": int(in_channels),
            "width": float(width), "image_size": int(image_size), **family}


def check_channels(cfg: list, arch: str, length: int | None = None) -> list[int]:
    """`cfg` as plain ints, or a UserError if it is not `length` positive channel counts."""
    if length is not None and len(cfg) != length:
        raise UserError(f"arch '{arch}' needs a cfg of {length} channel counts, got {len(cfg)}")
    if not all(_positive_int(c) for c in cfg):
        raise UserError(f"arch '{arch}': channel counts must be positive integers, got {cfg}")
    return [int(c) for c in cfg]


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def scaled(channels: int, width: float) -> int:
    """`channels` times the width multiplier, rounded, never below one."""
    return max(1, int(round(channels * width)))


def init_weights(model: nn.Module, bn_weight: float) -> None:
    """Conv: He normal (fan_out); BN: weight `bn_weight`, bias 0; linear: N(0, 0.01), bias 0.

    Network slimming starts BN weights at 0.5 rather than 1 so the L1 sparsity penalty can spread
    the scaling factors apart early; the Early-Bird reference code keeps that.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, bn_weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


# ---- channel plans: how a family's network shrinks (prune.prune_channels does the cutting) ----------------
# A cut: (kept output-channel indices, kept input-channel indices) of one layer; None keeps that axis whole.
Cut = tuple[torch.Tensor | None, torch.Tensor | None]


class ChannelPlan(NamedTuple):
    """What a family's `channel_plan(indices)` returns: `indices` maps each prunable BN's name to the indices
    of its kept channels; the plan is the smaller network's `cfg`, the cut of every layer that shrinks
    (conv, BN or linear, by module name), and state entries to replace outright (channel-selection masks)."""
    cfg: list
    cuts: dict[str, Cut]
    replace: dict[str, torch.Tensor]
