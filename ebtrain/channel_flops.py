"""Forward FLOPs of a channel-pruned network as a function of the channels each prunable layer keeps.

`ChannelFlops(model, input_shape)` measures the dense network once (PyTorch's FLOP counter on a meta copy,
the convention of flops.py: 2 per multiply-add of conv and linear layers) and learns from the family's
`channel_plan` which layer axes shrink with which prunable BN: it asks the plan for every BN in turn with
one channel of that BN dropped and sees which conv or linear axis (output or input channels) loses one.
A conv (groups 1) or linear layer costs unit x out x in FLOPs, so the pruned network's forward FLOPs are

    F(k) = constant + sum over layers of unit_l * out_l(k) * in_l(k),

with out_l and in_l either the dense size or the kept count k_j of the BN that axis follows. That is the
count `measure_cost` gives for the physically pruned network, exactly, in integers (tests check it for
every family), at the cost of a few multiplications: the detector evaluates it channel by channel.
Couplings come from the plan itself: a channel pruned in VGG's layer removes its conv's output and the
next conv's input; in PreResNet a bn1's channel selection narrows only the next conv's input (the
residual stream stays whole); in a post-activation ResNet only the block's inner axis shrinks.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class LayerCost:
    """One layer that computes: its name in the model, channels (or features) in and out, its own
    parameters, and its forward FLOPs per image."""

    name: str
    kind: str
    in_channels: int | None
    out_channels: int | None
    params: int
    forward_flops: int


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, tuple[LayerCost, ...]]:
    """Forward FLOPs of one image, in total and per leaf module that computes (`model` on the meta device)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *input_shape, device="meta"))
    counts = counter.get_flop_counts()
    root = type(model).__name__  # the counter names modules '<RootClass>.<qualified name>'
    layers = []
    for name, module in model.named_modules():
        flops = sum(counts.get(f"{root}.{name}", {}).values())
        if flops and next(module.children(), None) is None:
            layers.append(LayerCost(
                name=name, kind=type(module).__name__,
                in_channels=getattr(module, "in_channels", getattr(module, "in_features", None)),
                out_channels=getattr(module, "out_channels", getattr(module, "out_features", None)),
                params=sum(p.numel() for p in module.parameters()), forward_flops=int(flops)))
    return int(counter.get_total_flops()), tuple(layers)


@dataclass(frozen=True)
class _Term:
    """unit * out * in of one layer; an axis follows prunable layer `out_layer` / `in_layer` (its kept
    count) or is fixed at `out` / `in_`."""
    unit: int
    out_layer: int | None
    out: int
    in_layer: int | None
    in_: int


class ChannelFlops:
    """Exact forward FLOPs per image of the network a channel mask cuts from `model` (see the module doc).

    dense: the dense network's forward FLOPs per image. `flops(kept)` takes the kept count of each
    prunable BN (in `prunable_bns` order); `add_cost(kept, j)` is what keeping one more channel of layer
    j adds; `channel_costs()` what each layer's channel costs in the dense network.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]):
        if not hasattr(model, "channel_plan") or not hasattr(model, "prunable_bns"):
            raise TypeError(f"cannot count the FLOPs of a pruned {type(model).__name__}: its family states no "
                            "channel_plan() (ebtrain's models do)")
        bns = list(model.prunable_bns())
        self.sizes = tuple(bn.num_features for _, bn in bns)
        shadow = copy.deepcopy(model).to("meta")
        self.dense, layers = forward_flops(shadow, tuple(input_shape))
        follows = _axes_followed(model, [name for name, _ in bns], self.sizes)
        terms, counted = [], 0
        for layer in layers:
            module = model.get_submodule(layer.name)
            out_layer, in_layer = follows.get(layer.name, (None, None))
            if out_layer is None and in_layer is None:
                continue  # its cost never changes: part of the constant
            if not isinstance(module, (nn.Conv2d, nn.Linear)) or getattr(module, "groups", 1) != 1:
                raise TypeError(f"cannot count the FLOPs of pruned layer {layer.name} ({layer.kind}): only "
                                "ungrouped Conv2d and Linear layers shrink with a channel mask")
            out, in_ = layer.out_channels, layer.in_channels
            unit, rest = divmod(layer.forward_flops, out * in_)
            if rest:
                raise ValueError(f"{layer.name}: {layer.forward_flops} FLOPs are not a multiple of {out} x {in_}")
            for axis, size in ((out_layer, out), (in_layer, in_)):
                if axis is not None and size != self.sizes[axis]:
                    raise ValueError(f"{layer.name} has {size} channels where its BN has {self.sizes[axis]}: "
                                     "FLOPs are counted for masks drawn on a dense network")
            terms.append(_Term(unit, out_layer, out, in_layer, in_))
            counted += layer.forward_flops
        self.constant = self.dense - counted
        self._terms = terms
        self._by_layer: list[list[_Term]] = [[] for _ in self.sizes]
        for term in terms:
            for axis in {term.out_layer, term.in_layer} - {None}:
                self._by_layer[axis].append(term)

    def flops(self, kept: list[int]) -> int:
        """Forward FLOPs per image of the network that keeps kept[j] channels of prunable layer j."""
        return self.constant + sum(t.unit * _count(t.out_layer, t.out, kept) * _count(t.in_layer, t.in_, kept)
                                   for t in self._terms)

    def fraction(self, kept: list[int]) -> float:
        """flops(kept) / dense."""
        return self.flops(kept) / self.dense

    def add_cost(self, kept: list[int], j: int) -> int:
        """flops(kept with one more channel in layer j) - flops(kept); never negative."""
        cost = 0
        for t in self._by_layer[j]:
            out, in_ = _count(t.out_layer, t.out, kept), _count(t.in_layer, t.in_, kept)
            grown_out = out + (t.out_layer == j)
            grown_in = in_ + (t.in_layer == j)
            cost += t.unit * (grown_out * grown_in - out * in_)
        return cost

    def channel_costs(self) -> list[int]:
        """Per prunable layer, the forward FLOPs that go away when one of its channels alone is removed
        from the dense network: its conv's output map for that channel plus the next layer's input slice."""
        dense = list(self.sizes)
        costs = []
        for j in range(len(dense)):
            fewer = dense[:j] + [dense[j] - 1] + dense[j + 1:]
            costs.append(self.add_cost(fewer, j))
        return costs


def _count(layer: int | None, fixed: int, kept: list[int]) -> int:
    return fixed if layer is None else kept[layer]


def _axes_followed(model: nn.Module, names: list[str], sizes: tuple[int, ...]) -> dict[str, tuple[int | None, int | None]]:
    """{layer name: (prunable layer its output axis follows, the one its input axis follows)} from the plan:
    drop one channel of BN j, and every axis that loses one follows j."""
    def lengths(indices: dict[str, torch.Tensor]) -> dict[str, tuple[int | None, int | None]]:
        cuts = model.channel_plan(indices).cuts
        return {layer: tuple(None if idx is None else len(idx) for idx in cut) for layer, cut in cuts.items()}

    full = {name: torch.arange(size) for name, size in zip(names, sizes)}
    base = lengths(full)
    follows: dict[str, list[int | None]] = {}
    for j, (name, size) in enumerate(zip(names, sizes)):
        if size < 2:
            continue  # a layer of one channel always keeps it: nothing of it ever shrinks
        for layer, counts in lengths({**full, name: torch.arange(size - 1)}).items():
            for axis in (0, 1):
                if counts[axis] is not None and counts[axis] != base[layer][axis]:
                    slot = follows.setdefault(layer, [None, None])
                    if slot[axis] is not None or base[layer][axis] - counts[axis] != 1:
                        raise ValueError(f"cannot count the FLOPs of {layer}: its channels follow more than one "
                                         "prunable BN")
                    slot[axis] = j
    return {layer: (slot[0], slot[1]) for layer, slot in follows.items()}
