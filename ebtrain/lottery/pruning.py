"""Pruning strategies of the lottery-ticket experiments: which masks each round draws.

`WeightPruning` (unstructured, the lottery-ticket paper's) prunes conv and linear weights by magnitude,
layer-wise or globally; `ChannelPruning` (structured, for comparison with Early-Bird tickets) draws
channel masks from the BatchNorm weights. Both answer the same questions: the dense masks, a round's
masks from trained weights, the parameter masks that hold during training, and what remains.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import LotteryConfig
from ..earlybird import draw_mask, prunable_bns
from ..errors import UserError
from ..models import count_params
from ..prune import prune_channels
from .masks import Masks, magnitude_masks, mask_density, prunable_weights


class WeightPruning:
    """Unstructured magnitude pruning of every conv and linear weight, layer-wise or global (one ranking over
    the layers whose rate is not 0, at `rate`; a layer at rate 0 is not pruned either way).

    A mask set maps each weight's state-dict key to a bool tensor of the weight's shape.
    """

    def __init__(self, model: nn.Module, cfg: LotteryConfig):
        self.kinds = prunable_weights(model)
        self.shapes = {name: model.state_dict()[name].shape for name in self.kinds}
        conv = cfg.rate if cfg.conv_rate < 0 else cfg.conv_rate
        fc = cfg.rate if cfg.fc_rate < 0 else cfg.fc_rate
        output = fc / 2 if cfg.output_rate < 0 else cfg.output_rate
        self.rates = {name: {"conv": conv, "fc": fc, "output": output}[kind] for name, kind in self.kinds.items()}
        self.global_rate = cfg.rate if cfg.global_pruning else None
        # global pruning ranks only the layers the recipe prunes: one at rate 0 (the lottery-ticket paper's
        # VGG-19 and ResNet-18 leave the output layer whole) keeps every weight, and its small initial
        # weights do not go first
        self.ranked = [name for name, rate in self.rates.items() if rate > 0]
        if cfg.global_pruning and not self.ranked:
            raise UserError("--global-pruning: every layer's rate is 0 (--conv-rate, --fc-rate, --output-rate), "
                            "so nothing would be pruned")

    def dense(self) -> Masks:
        """Masks that keep every weight (round 0)."""
        return {name: torch.ones(shape, dtype=torch.bool) for name, shape in self.shapes.items()}

    def density(self, round_: int) -> dict[str, float] | float:
        """Fraction of weights a round leaves: (1 - rate)^round per layer, or when global over all the layers
        it ranks (those with a nonzero rate)."""
        if self.global_rate is not None:
            return (1 - self.global_rate) ** round_
        return {name: (1 - rate) ** round_ for name, rate in self.rates.items()}

    def prune(self, state: dict[str, torch.Tensor], masks: Masks, round_: int) -> Masks:
        """The masks of `round_`, from trained weights `state` and the masks they trained under."""
        if self.global_rate is None:
            return magnitude_masks(state, masks, self.density(round_))
        ranked = magnitude_masks(state, {name: masks[name] for name in self.ranked}, self.density(round_))
        return {name: ranked.get(name, mask) for name, mask in masks.items()}

    def param_masks(self, masks: Masks) -> Masks:
        """The masks by parameter name: the weight masks themselves."""
        return masks

    def remaining(self, masks: Masks) -> dict:
        """Percent of weights kept, overall and per layer (biases are not pruned and not counted)."""
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        return {"overall": 100 * kept / total, "layers": {n: 100 * d for n, d in mask_density(masks).items()}}


class ChannelPruning:
    """Structured pruning: each round's channel mask drawn from the BatchNorm weights |gamma| with
    `earlybird.draw_mask` (one global ranking, the Early-Bird paper's masks); a pruned channel's BN weight
    and bias are held at zero, which switches the channel off (see `prune.switch_off_channels`).

    A mask set maps each prunable BN layer's name to a bool vector over its channels.
    """

    def __init__(self, model: nn.Module, cfg: LotteryConfig):
        self.template = model
        self.layers = [name for name, _ in prunable_bns(model)]
        if not self.layers:
            raise UserError(f"--structured needs BatchNorm layers to draw channel masks from; arch "
                            f"'{model.arch['name']}' has none (use unstructured pruning)")
        self.sizes = [bn.num_features for _, bn in prunable_bns(model)]
        self.rate = cfg.rate

    def dense(self) -> Masks:
        """Masks that keep every channel (round 0)."""
        return {name: torch.ones(size, dtype=torch.bool) for name, size in zip(self.layers, self.sizes)}

    def ratio(self, round_: int) -> float:
        """Fraction of all channels a round prunes: 1 - (1 - rate)^round."""
        return 1 - (1 - self.rate) ** round_

    def prune(self, state: dict[str, torch.Tensor], masks: Masks, round_: int) -> Masks:
        """The masks of `round_`, from trained weights `state` and the masks they trained under."""
        # channels pruned before score -1, so the global ranking takes them first and masks stay nested
        scores = [state[f"{n}.weight"].detach().abs().float().cpu().masked_fill(~masks[n], -1.0) for n in self.layers]
        drawn = draw_mask(scores, self.ratio(round_)).per_layer()
        return {n: keep & masks[n] for n, keep in zip(self.layers, drawn)}

    def param_masks(self, masks: Masks) -> Masks:
        """The masks by parameter name: each BN layer's channel mask over its weight and its bias."""
        return {f"{n}.{p}": keep for n, keep in masks.items() for p in ("weight", "bias")}

    def remaining(self, masks: Masks) -> dict:
        """Percent of parameters the physically pruned network keeps; per layer, percent of channels."""
        pruned = prune_channels(self.template, [masks[n] for n in self.layers])
        return {"overall": 100 * count_params(pruned) / count_params(self.template),
                "layers": {n: 100 * d for n, d in mask_density(masks).items()}}


Pruning = WeightPruning | ChannelPruning


def make_pruning(model: nn.Module, cfg: LotteryConfig) -> Pruning:
    """The pruning strategy the settings ask for."""
    return ChannelPruning(model, cfg) if cfg.structured else WeightPruning(model, cfg)
