"""Weight masks of the lottery-ticket experiments: which weights a ticket keeps.

A mask set maps a tensor's name (a weight's state-dict key, or a BatchNorm layer's name for channel
masks) to a bool tensor of its shape: True = kept. Pure functions on tensors; no training here.
"""
from __future__ import annotations

import torch
from torch import nn

Masks = dict[str, torch.Tensor]


def prunable_weights(model: nn.Module) -> dict[str, str]:
    """Every conv and linear weight by state-dict key -> its kind: 'conv', 'fc', or 'output' (the last
    linear layer, which the lottery-ticket paper prunes at a lower rate)."""
    kinds = {f"{name}.weight": "conv" if isinstance(m, nn.Conv2d) else "fc"
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    linears = [key for key, kind in kinds.items() if kind == "fc"]
    if linears:
        kinds[linears[-1]] = "output"
    return kinds


def magnitude_masks(weights: dict[str, torch.Tensor], masks: Masks, density: dict[str, float] | float) -> Masks:
    """Keep the largest-magnitude weights among those `masks` keeps; prune the rest.

    `density` per layer (the fraction of the layer's weights left afterwards, layer-wise pruning) or one
    float (global pruning: one ranking over all layers together). The kept count is round(density * n),
    never more than is kept already; ties break by position, so the result is deterministic.
    """
    names = list(masks)
    scores = [weights[n].detach().abs().float().reshape(-1).masked_fill(~masks[n].reshape(-1), -1.0) for n in names]
    if isinstance(density, dict):
        kept = [_top(s, round(density[n] * s.numel())) for n, s in zip(names, scores)]
    else:
        kept = _top(torch.cat(scores), round(density * sum(s.numel() for s in scores))).split(
            [s.numel() for s in scores])
    return {n: k.view_as(masks[n]) & masks[n] for n, k in zip(names, kept)}


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool vector marking the `count` highest scores (pruned entries score -1 and come last)."""
    count = min(count, int((scores >= 0).sum()))
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[:count]] = True
    return keep


def random_masks(masks: Masks, generator: torch.Generator) -> Masks:
    """Masks that keep as many entries of each tensor as `masks` does, at random positions."""
    out = {}
    for name, mask in masks.items():
        keep = torch.zeros(mask.numel(), dtype=torch.bool)
        keep[torch.randperm(mask.numel(), generator=generator)[:int(mask.sum())]] = True
        out[name] = keep.view(mask.shape).to(mask.device)
    return out


def apply_masks(tensors: dict[str, torch.Tensor], masks: Masks) -> None:
    """Set the pruned entries of `tensors` (a state dict, or stacked masks over stacked weights) to zero, in place."""
    with torch.no_grad():
        for name, mask in masks.items():
            tensors[name].masked_fill_(~mask, 0.0)


def mask_density(masks: Masks) -> dict[str, float]:
    """Fraction of entries kept, per tensor."""
    return {name: float(mask.float().mean()) for name, mask in masks.items()}
