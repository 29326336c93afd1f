"""Channel pruning: a keep mask over the prunable BNs -> a physically smaller network.

The new network is the same family built with a smaller channel config (`arch["cfg"]`); the kept
slices of every conv, BN and linear layer are copied into it. Which layers shrink, and how, each family
says itself beside its `prunable_bns()`: `model.channel_plan(indices)` (see models/vgg.py), so this
module knows no family. Correctness reference: in eval mode the pruned network computes what the dense
network computes with the pruned channels switched off (BN weight and bias zeroed), see
`switch_off_channels`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ebtrain.errors import UserError
from ebtrain.models import build_model, load_model

load_pruned = load_model


def kept_channels(keep: list[torch.Tensor]) -> list[int]:
    """Number of kept channels in each layer of a keep mask."""
    return [int(k.sum()) for k in keep]


def round_keep(keep: list[torch.Tensor], scores: list[torch.Tensor], multiple: int) -> list[torch.Tensor]:
    """`keep` with each layer's kept count rounded up to a multiple of `multiple`, never above the
    layer's size: the layer's pruned channels with the highest `scores` are kept again (ties: lowest
    channel index first). GPU tensor cores work on channel counts in multiples of 8: a layer of 37
    channels costs as much as one of 40, or more where it falls back to slower kernels, so rounding
    up trades a few FLOPs for full-speed kernels (scripts/bench_train.py measures both). `multiple`
    1 returns `keep` unchanged.
    """
    if multiple < 1:
        raise ValueError(f"channels can only be rounded to a multiple of 1 or more, got {multiple}")
    rounded = []
    for k, s in zip(keep, scores, strict=True):
        k = torch.as_tensor(k, dtype=torch.bool)
        kept = int(k.sum())
        target = min(-(-kept // multiple) * multiple, k.numel())
        # the kept channels sort last, so the first `target - kept` are the best of the pruned ones
        order = torch.sort(s.detach().float().cpu().masked_fill(k.cpu(), -float("inf")), descending=True,
                           stable=True).indices
        added = torch.zeros_like(k)
        added[order[:target - kept].to(k.device)] = True
        rounded.append(k | added)
    return rounded


def switch_off_channels(model: nn.Module, keep: list[torch.Tensor]) -> nn.Module:
    """A copy of the dense `model` whose pruned channels output zero (their BN weight and bias zeroed)."""
    keep = _checked_keep(model, keep)
    switched = copy.deepcopy(model)
    with torch.no_grad():
        for (_, bn), k in zip(switched.prunable_bns(), keep):
            bn.weight[~k] = 0
            bn.bias[~k] = 0
    return switched


def prune_channels(model: nn.Module, keep: list[torch.Tensor]) -> nn.Module:
    """A new, smaller model of the same family holding only the channels `keep` marks True.

    `keep` has one bool tensor per entry of `model.prunable_bns()`, in that order. The new model is
    on the same device and in the same train/eval mode as `model`, which is left untouched.
    """
    keep = _checked_keep(model, keep)
    names = [name for name, _ in model.prunable_bns()]
    for name, k in zip(names, keep):
        if not k.any():
            raise ValueError(f"keep mask removes every channel of {name}")
    if not hasattr(model, "channel_plan"):
        raise TypeError(f"no channel pruning for {type(model).__name__}: its family states no channel_plan()")
    cfg, cuts, replaced = model.channel_plan({name: k.nonzero().squeeze(1) for name, k in zip(names, keep)})
    state = model.state_dict()
    for layer, (out_idx, in_idx) in cuts.items():
        for key, tensor in model.get_submodule(layer).state_dict(prefix=f"{layer}.").items():
            state[key] = _cut(tensor, out_idx, in_idx)
    state.update(replaced)
    device = next(model.parameters()).device
    pruned = build_model(**{**model.arch, "cfg": cfg}).to(device)
    pruned.load_state_dict(state)  # strict: any layer the plan forgot fails loudly here
    return pruned.train(model.training)


def _checked_keep(model: nn.Module, keep: list[torch.Tensor]) -> list[torch.Tensor]:
    """`keep` as bool masks on the model's device, checked against its prunable BNs."""
    bns = model.prunable_bns() if hasattr(model, "prunable_bns") else []
    if not bns:
        raise UserError(f"arch '{getattr(model, 'arch', {}).get('name', type(model).__name__)}' has "
                        "no prunable channels (no BatchNorm layers); use unstructured weight pruning")
    if len(keep) != len(bns):
        raise ValueError(f"keep has {len(keep)} masks, the model has {len(bns)} prunable BNs")
    device = bns[0][1].weight.device
    masks = [torch.as_tensor(k).to(device=device, dtype=torch.bool) for k in keep]
    for (name, bn), k in zip(bns, masks):
        if k.shape != (bn.num_features,):
            raise ValueError(f"keep mask for {name} has shape {tuple(k.shape)}, "
                             f"expected ({bn.num_features},)")
    return masks


def _cut(tensor: torch.Tensor, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None) -> torch.Tensor:
    # Conv/linear weights are (out, in, ...); BN weights, biases and running stats are (out,); the
    # BN's 0-d batch counter has no channel axis and stays as it is.
    if out_idx is not None and tensor.dim() >= 1:
        tensor = tensor.index_select(0, out_idx)
    if in_idx is not None and tensor.dim() >= 2:
        tensor = tensor.index_select(1, in_idx)
    return tensor
