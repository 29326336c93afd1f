"""Model registry: a model is a name plus keyword arguments (timm style).

Every constructor takes `(num_classes, in_channels, width, image_size, **family_kwargs)` and every
model records those arguments in `model.arch`, so `build_model(**model.arch)` rebuilds the same
architecture, and a saved model is just its `arch` plus its state dict.

A family is one file (vgg.py, resnet.py, ...): its model class, `prunable_bns()` (the BatchNorm layers whose
channels the Early-Bird search scores and pruning removes) and `channel_plan(indices)` (how the network
shrinks to the kept channels), and the names it registers with `register`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ebtrain.checkpoint import atomic_save, load
from ebtrain.errors import UserError
from ebtrain.models.registry import (ChannelPlan, Cut, build_model, check_channels, init_weights, list_models,
                                     make_arch, register, scaled)
# each family registers its models on import, in this order (the order `ebtrain models` lists them in)
from ebtrain.models import vgg, preresnet, resnet, lenet  # noqa: F401

__all__ = ["ChannelPlan", "Cut", "build_model", "check_channels", "count_params", "init_weights", "list_models",
           "load_model", "make_arch", "register", "save_model", "scaled"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics not counted)."""
    return sum(p.numel() for p in model.parameters())


def save_model(model: nn.Module, path: str | Path, **extra: Any) -> None:
    """Save `model` (its `arch` and state dict) plus any `extra` entries to `path` atomically."""
    clash = {"arch", "state_dict"} & set(extra)
    if clash:
        raise ValueError(f"save_model: extra entries may not be named {sorted(clash)}")
    atomic_save({"arch": model.arch, "state_dict": model.state_dict(), **extra}, path)


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model written by `save_model` and return it in eval mode on the CPU."""
    try:
        saved = load(path)
    except FileNotFoundError:
        raise UserError(f"model file {path} does not exist") from None
    except Exception as error:  # torch.load raises many types for a file that is not a checkpoint
        raise UserError(f"{path} is not a model file ({type(error).__name__}: {error})") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("arch"), dict)
            and "name" in saved["arch"] and "state_dict" in saved):
        raise UserError(f"{path} is not a model file (no 'arch' and 'state_dict' entries)")
    model = build_model(**saved["arch"])
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as error:
        raise UserError(f"{path}: weights do not fit its arch {saved['arch']['name']}: {error}") from None
    return model.eval()
