"""Early-Bird tickets: channel scores, masks, mask distances and the detector.

Pure functions on tensors plus one small stateful class (`EarlyBird`); nothing here trains. A mask
covers the channels of every prunable BatchNorm layer, concatenated in layer order, and marks each
channel kept (True) or pruned (False).

Typical use from a training loop::

    detector = EarlyBird(model, ratios=(0.3, 0.5, 0.7), eps=0.1)
    detector.step(0)                      # the mask at initialization (optional)
    for epoch in range(1, epochs + 1):
        train_one_epoch(model)
        for ticket in detector.step(epoch):
            save(ticket)                  # ticket.mask, ticket.epoch, and the model's weights now
        if detector.done:
            break

Tickets sized by cost: `EarlyBird(model, ratios=(), flops_targets=(0.5,), input_shape=(3, 32, 32))` draws
the mask of the highest-ranked channels whose pruned network costs at most half the dense forward FLOPs
(`draw_flops_mask`; its tickets are named 'f50', and `emerged['f50']` holds one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from torch import nn

from .channel_flops import ChannelFlops

RULES = ("paper", "reference")


def prunable_bns(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BatchNorm layers whose channels can be physically removed, as (name, module) pairs.

    Uses `model.prunable_bns()` when the model defines it (ebtrain's models do, e.g. a post-activation
    ResNet leaves out the BNs that feed the residual sum); otherwise every `nn.BatchNorm2d` in module
    order, so a user's own model works as long as all of its BNs can be pruned.
    """
    if hasattr(model, "prunable_bns"):
        return list(model.prunable_bns())
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def channel_scores(model: nn.Module) -> list[torch.Tensor]:
    """|gamma| of every prunable BN layer: detached float32 CPU tensors, one per layer, in order.

    The layers are concatenated on the model's device and copied to the host once, so a GPU run pays
    one synchronisation per call rather than one per layer.
    """
    bns = prunable_bns(model)
    if not bns:
        raise ValueError("the model has no prunable BatchNorm2d layers, so there are no channel scores")
    for name, bn in bns:
        if bn.weight is None:
            raise ValueError(f"BatchNorm layer {name!r} has affine=False: no gamma to score channels by")
    flat = torch.cat([bn.weight.detach().reshape(-1) for _, bn in bns]).abs().float().cpu()
    return list(flat.split([bn.weight.numel() for _, bn in bns]))


@dataclass(frozen=True)
class ChannelMask:
    """Which channels of the prunable BN layers survive, for one pruning ratio.

    keep: bool [N], True = kept; the layers' channels concatenated in layer order.
    sizes: channels per layer; they sum to N.
    kept_back: how many channels the per-layer floor (at least one, or `min_keep` of the layer) protected
        that the plain global ranking would have pruned (see `draw_mask`).
    Two masks compare equal when all three fields are equal.
    """

    keep: torch.Tensor
    sizes: tuple[int, ...]
    kept_back: int = 0

    def __post_init__(self) -> None:
        if self.keep.dtype != torch.bool or self.keep.dim() != 1:
            raise ValueError(f"keep must be a 1-D bool tensor, "
                             f"got {self.keep.dtype} of shape {tuple(self.keep.shape)}")
        if sum(self.sizes) != self.keep.numel():
            raise ValueError(f"sizes sum to {sum(self.sizes)} but keep has {self.keep.numel()} channels")
        if self.kept_back < 0:
            raise ValueError(f"kept_back must be >= 0, got {self.kept_back}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChannelMask):
            return NotImplemented
        return (self.sizes == other.sizes and self.kept_back == other.kept_back
                and torch.equal(self.keep.cpu(), other.keep.cpu()))

    def __hash__(self) -> int:
        return hash((self.sizes, self.kept_back, self.num_pruned))

    def per_layer(self) -> list[torch.Tensor]:
        """The keep vector split into one bool tensor per layer."""
        return list(self.keep.split(list(self.sizes)))

    def kept_per_layer(self) -> list[int]:
        """Number of kept channels in each layer."""
        return [int(layer.sum()) for layer in self.per_layer()]

    @property
    def num_pruned(self) -> int:
        """Number of pruned channels over all layers."""
        return int((~self.keep).sum())


def _channel_count(fraction: float, n: int, *, round_up: bool = False) -> int:
    """floor(fraction * n), or ceil(fraction * n) when `round_up`, where a product within 1e-9 of an
    integer counts as that integer.

    The float product misses the integer a user means by a few units in the last place (0.7 * 90 is
    62.99999999999999, 0.07 * 100 is 7.000000000000001), which floor and ceil would turn into a whole
    channel; 1e-9 is far above that error and far below a fraction of a channel anyone asks for.
    """
    product = fraction * n
    return math.ceil(product - 1e-9) if round_up else math.floor(product + 1e-9)


def draw_mask(scores: Sequence[torch.Tensor], ratio: float, min_keep: float = 0.0) -> ChannelMask:
    """Prune the floor(ratio * N) globally smallest channel scores, keeping a floor of channels per layer.

    All N channels are ranked together by (score, layer index, channel index), ascending, so ties
    (e.g. all gammas 0.5 at initialization) break by position and the pruned count is exact whatever
    the values. Each layer's max(1, ceil(min_keep * its channels)) highest-ranked channels (its largest
    scores; ties: the highest channel indices, the last the ranking would reach) are protected and never
    pruned; the floor(ratio * N) lowest-ranked unprotected channels are pruned instead, so the count
    stays exact. With min_keep 0 (the paper's global ranking) that protects one channel per layer, so no
    layer is emptied; a min_keep of 0.1 keeps at least a tenth of every layer, which spares a narrow
    network the one- to five-channel layers that the global ranking can leave at high ratios.
    `kept_back` counts the protected channels that the plain ranking would have pruned. If
    floor(ratio * N) exceeds the unprotected channels, all of those are pruned and `num_pruned` falls
    short of floor(ratio * N); the shortfall is among the `kept_back` channels. These floors and
    ceilings read a product within 1e-9 of an integer as that integer: ratio 0.7 of N = 90 prunes 63
    channels, although the float product is 62.99999999999999.

    Scores must be finite: NaN or inf gammas mean training diverged and no ranking is meaningful.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must lie strictly between 0 and 1, got {ratio}")
    sizes, order, protected = _ranking(scores, min_keep)
    num_to_prune = _channel_count(ratio, order.numel())
    unprotected_order = order[~protected[order]]
    keep = torch.ones(order.numel(), dtype=torch.bool)
    keep[unprotected_order[:num_to_prune]] = False
    kept_back = int(protected[order[:num_to_prune]].sum())
    return ChannelMask(keep=keep, sizes=sizes, kept_back=kept_back)


def _ranking(scores: Sequence[torch.Tensor], min_keep: float
             ) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    """(layer sizes, every channel ranked by (score, layer, channel) ascending, the protected channels):
    the ranking and the per-layer floor that `draw_mask` and `draw_flops_mask` share."""
    _check_min_keep(min_keep)
    if not scores:
        raise ValueError("no layers to draw a mask from")
    sizes = tuple(int(s.numel()) for s in scores)
    if 0 in sizes:
        raise ValueError(f"every layer needs at least one channel, got sizes {sizes}")
    flat = torch.cat([s.detach().reshape(-1).cpu() for s in scores]).double()
    if not torch.isfinite(flat).all():
        raise ValueError("channel scores contain NaN or inf (did training diverge?)")
    n = flat.numel()
    # Stable sort over the concatenation: equal scores stay in (layer, channel) order.
    order = torch.sort(flat, stable=True).indices
    starts = torch.tensor((0,) + sizes[:-1]).cumsum(0)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    protected = torch.zeros(n, dtype=torch.bool)
    for start, size, layer_rank in zip(starts.tolist(), sizes, rank.split(list(sizes))):
        floor = max(1, _channel_count(min_keep, size, round_up=True))
        protected[start + layer_rank.topk(floor).indices] = True
    return sizes, order, protected


class FlopsCounter(Protocol):
    """What `draw_flops_mask` needs to know of a network (`ebtrain.channel_flops.ChannelFlops` is one):
    its dense forward FLOPs, the FLOPs of keeping kept[j] channels of every prunable layer j, and what one
    more channel of layer j adds to that."""
    dense: int

    def flops(self, kept: list[int]) -> int: ...

    def add_cost(self, kept: list[int], j: int) -> int: ...


def draw_flops_mask(scores: Sequence[torch.Tensor], target: float, counter: FlopsCounter,
                    min_keep: float = 0.0) -> ChannelMask:
    """Keep the highest-ranked channels whose network costs at most `target` x the dense forward FLOPs.

    The ranking, its ties and the per-layer floor are `draw_mask`'s: the floor's channels are always kept,
    then the other channels are taken from the highest-ranked down, each one kept if the network's forward
    FLOPs with it stay within floor(target x dense) and skipped otherwise (the scan goes on, so a cheap
    channel further down may still fit where an expensive one did not). Keeping a channel never lowers the
    FLOPs and never lowers what another channel adds, so in the mask drawn no pruned channel can be added
    back within the budget, and the kept channels are the longest prefix of the ranking that fits plus
    those that still fit after it. If the floor alone costs more than the budget, the mask keeps the floor.
    `kept_back` counts the protected channels ranked below the lowest-ranked channel the scan kept
    (all of them if it kept none): those the ranking alone would not have reached.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"FLOPs target must lie strictly between 0 and 1, got {target}")
    sizes, order, protected = _ranking(scores, min_keep)
    if tuple(getattr(counter, "sizes", sizes)) != sizes:
        raise ValueError(f"the FLOPs counter is for prunable layers of {tuple(counter.sizes)} channels, "
                         f"the scores have {sizes}")
    layer_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).tolist()
    keep = protected.clone()
    kept = [int(k.sum()) for k in keep.split(list(sizes))]
    budget = math.floor(target * counter.dense)
    spent = counter.flops(kept)
    lowest_kept = None
    for channel in order.flip(0)[~protected[order.flip(0)]].tolist():
        j = layer_of[channel]
        cost = counter.add_cost(kept, j)
        if spent + cost <= budget:
            keep[channel] = True
            kept[j] += 1
            spent += cost
            lowest_kept = channel
    rank = torch.empty(order.numel(), dtype=torch.long)
    rank[order] = torch.arange(order.numel())
    below = rank[protected] < (rank[lowest_kept] if lowest_kept is not None else order.numel())
    return ChannelMask(keep=keep, sizes=sizes, kept_back=int(below.sum()))


def _check_min_keep(min_keep: float) -> None:
    if not 0.0 <= min_keep < 1.0:
        raise ValueError(f"min_keep {min_keep} is outside the allowed range [0, 1): "
                         "it is the fraction of each layer's channels a mask always keeps")


def _keep_vector(mask: ChannelMask | torch.Tensor) -> torch.Tensor:
    if isinstance(mask, ChannelMask):
        return mask.keep
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"expected a ChannelMask or a bool tensor, got {type(mask).__name__}"
                         + (f" of dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else ""))
    return mask


def mask_distance(a: ChannelMask | torch.Tensor, b: ChannelMask | torch.Tensor) -> float:
    """Normalized Hamming distance: the fraction of channels on which two masks differ, in [0, 1].

    Accepts ChannelMasks or bool tensors of the same shape; two ChannelMasks must also have the same
    layer sizes, since masks of differently shaped networks are not comparable.
    """
    if isinstance(a, ChannelMask) and isinstance(b, ChannelMask) and a.sizes != b.sizes:
        raise ValueError(f"masks have different layer sizes: {a.sizes} vs {b.sizes}")
    ka, kb = _keep_vector(a), _keep_vector(b)
    if ka.shape != kb.shape:
        raise ValueError(f"masks have different shapes: {tuple(ka.shape)} vs {tuple(kb.shape)}")
    if ka.numel() == 0:
        raise ValueError("cannot measure the distance between empty masks")
    return int((ka.cpu() != kb.cpu()).sum()) / ka.numel()


def jaccard(a: ChannelMask | torch.Tensor, b: ChannelMask | torch.Tensor) -> float:
    """Jaccard index |a and b| / |a or b|: of the entries either mask keeps, the fraction both keep
    (1.0 when neither keeps any). ChannelMasks, or bool tensors of one shape (any masks, weights too)."""
    ka, kb = _keep_vector(a), _keep_vector(b)
    union = int((ka | kb).sum())
    return int((ka & kb).sum()) / union if union else 1.0


def ratio_name(ratio: float) -> str:
    """0.3 -> 'p30': the name of a ratio's ticket (its file, its retrain folder, its keys and tags)."""
    return f"p{ratio * 100:g}"


def target_name(target: float) -> str:
    """0.5 -> 'f50': the name of a FLOPs target's ticket."""
    return f"f{target * 100:g}"


@dataclass
class Ticket:
    """An Early-Bird ticket: the mask for `ratio` drawn at `epoch`, when the detector's rule fired.

    A FLOPs target's ticket has `flops_target` set, and `ratio` is the fraction of channels its mask prunes.
    flops_fraction: the pruned network's forward FLOPs over the dense network's (None when the detector
    counts no FLOPs). name: 'p30' for ratio 0.3, 'f50' for FLOPs target 0.5.

    distances: what the rule looked at when it fired. Rule "paper": the FIFO queue of consecutive-epoch
    mask distances, oldest first. Rule "reference": the distances from the newest mask to each older
    mask in the window, oldest first.
    The weights are not part of the ticket: the caller saves the model at the epoch it is returned.
    """

    ratio: float
    epoch: int
    mask: ChannelMask
    distances: list[float]
    flops_target: float | None = None
    flops_fraction: float | None = None

    @property
    def name(self) -> str:
        return ratio_name(self.ratio) if self.flops_target is None else target_name(self.flops_target)

    @property
    def key(self) -> float | str:
        """The detector's key of the ticket's track: the ratio, or the FLOPs target's name."""
        return self.ratio if self.flops_target is None else self.name


@dataclass
class _Track:
    """Everything the detector remembers for one ratio or FLOPs target."""

    ratio: float | None
    flops_target: float | None = None
    masks: list[ChannelMask] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)
    ticket: Ticket | None = None


class EarlyBird:
    """Early-Bird ticket detector: call `step` once per epoch; it says when each ratio's mask has settled.

    Every call draws one mask per ratio from the current BN gammas and records it. A ratio's ticket
    emerges once, at the first call where its rule fires; afterwards its masks are still recorded (for
    `distance_matrix`) but it never emerges again.

    rule "paper" (You et al. 2020): a FIFO queue holds the distances between consecutively recorded
        masks, at most `queue_length` of them; the ticket emerges when the queue is full and its maximum
        is below eps. With queue_length 5 that takes at least 6 recorded masks.
    rule "reference" (the authors' code): a window of the last `queue_length` masks; the ticket emerges
        when the window is full and the newest mask is within eps (d < eps, strict like the paper rule;
        the original code tests d <= eps) of each older mask. Takes at least `queue_length` masks.
    min_keep: the fraction of each layer's channels every mask keeps (see `draw_mask`); 0, the paper's
        global ranking, keeps at least one.
    flops_targets: fractions of the dense network's forward FLOPs; for each the detector draws the mask of
        `draw_flops_mask` and keeps a queue of its own, under the same rule. FLOPs are counted by
        `flops_counter`, or by `ChannelFlops(model, input_shape)` (input_shape: one image, (C, H, W)).
        Given either, every ticket carries its `flops_fraction`.

    Keys: a ratio's track is keyed by the ratio itself (0.3), a FLOPs target's by its name ('f50'); the
    queries (`queue`, `masks`, `distance_matrix`, ...) take either key or a name ('p30'), and `emerged`
    and `pending` use the keys.

    Epochs are labels, not counters: `step()` with no argument continues from the previous label + 1
    (the first call is 0, meant for the initialization). A loop that skips the initialization mask
    should pass `step(epoch)` explicitly so the labels match training epochs. Labels must increase but
    may skip: distances are always between consecutively *recorded* masks.
    """

    def __init__(self, model: nn.Module, ratios: Sequence[float] = (0.3, 0.5, 0.7), eps: float = 0.1,
                 queue_length: int = 5, rule: str = "paper", min_keep: float = 0.0,
                 flops_targets: Sequence[float] = (), input_shape: tuple[int, ...] | None = None,
                 flops_counter: FlopsCounter | None = None) -> None:
        ratios = [float(r) for r in ratios]
        targets = [float(t) for t in flops_targets]
        if not ratios and not targets:
            raise ValueError("ratios is empty: give at least one pruning ratio (or FLOPs target) in (0, 1)")
        for what, values, name in (("pruning ratio", ratios, ratio_name), ("FLOPs target", targets, target_name)):
            for v in values:
                if not 0.0 < v < 1.0:
                    raise ValueError(f"{what} {v} is outside the allowed range (0, 1)")
            if len(set(values)) != len(values):
                raise ValueError(f"{what}s contain duplicates: {values}; each may appear once")
            if len({name(v) for v in values}) != len(values):
                raise ValueError(f"{what}s {values} share ticket names {[name(v) for v in values]}: "
                                 "give values that differ in their percent")
        if flops_counter is None and input_shape is not None:
            flops_counter = ChannelFlops(model, tuple(input_shape))
        if targets and flops_counter is None:
            raise ValueError("flops_targets need a way to count FLOPs: pass input_shape (C, H, W) or flops_counter")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps {eps} is outside the allowed range (0, 1)")
        if isinstance(queue_length, bool) or not isinstance(queue_length, int) or queue_length < 2:
            raise ValueError(f"queue_length {queue_length!r} is not allowed: it must be an integer >= 2")
        if rule not in RULES:
            raise ValueError(f"rule {rule!r} is not allowed: choose one of {', '.join(RULES)}")
        _check_min_keep(min_keep)
        self.model = model
        self.ratios = tuple(ratios)
        self.flops_targets = tuple(targets)
        self.flops_counter = flops_counter
        self.eps = float(eps)
        self.queue_length = queue_length
        self.rule = rule
        self.min_keep = float(min_keep)
        self._epochs: list[int] = []
        self._tracks = self._new_tracks()

    def _new_tracks(self) -> dict[float | str, _Track]:
        return {**{r: _Track(r) for r in self.ratios},
                **{target_name(t): _Track(None, flops_target=t) for t in self.flops_targets}}

    @property
    def keys(self) -> list[float | str]:
        """Every track's key: the ratios, then the FLOPs targets' names ('f50'), in the order given."""
        return list(self._tracks)

    def name(self, key: float | str) -> str:
        """The ticket name of a track: 'p30' for ratio 0.3, 'f50' for FLOPs target 0.5."""
        track = self._track(key)
        return ratio_name(track.ratio) if track.flops_target is None else target_name(track.flops_target)

    # -- recording ----------------------------------------------------------------------------

    def step(self, epoch: int | None = None) -> list[Ticket]:
        """Draw and record the mask of every ratio and FLOPs target now; return the tickets that emerged
        at this call."""
        epoch = self._next_epoch(epoch)
        scores = channel_scores(self.model)
        masks = {key: draw_mask(scores, t.ratio, self.min_keep) if t.flops_target is None
                 else draw_flops_mask(scores, t.flops_target, self.flops_counter, self.min_keep)
                 for key, t in self._tracks.items()}
        return self._record(epoch, masks)

    def flops_fraction(self, mask: ChannelMask) -> float | None:
        """The forward FLOPs of the network `mask` cuts over the dense network's (None: no FLOPs counter)."""
        counter = self.flops_counter
        return None if counter is None else counter.flops(mask.kept_per_layer()) / counter.dense

    def _next_epoch(self, epoch: int | None) -> int:
        if epoch is None:
            return self._epochs[-1] + 1 if self._epochs else 0
        if self._epochs and epoch <= self._epochs[-1]:
            raise ValueError(f"epoch {epoch} is not after the last recorded epoch {self._epochs[-1]}; "
                             "epochs must increase")
        return int(epoch)

    def _record(self, epoch: int, masks: dict[float | str, ChannelMask]) -> list[Ticket]:
        """Append one mask per track and apply the rule; shared by `step` and `load_state_dict`."""
        key = self.keys[0]
        first = masks[key]
        if self._epochs and first.sizes != self._tracks[key].masks[-1].sizes:
            raise ValueError(f"the prunable layers changed size since the last step: "
                             f"{self._tracks[key].masks[-1].sizes} -> {first.sizes}")
        self._epochs.append(epoch)
        emerged = []
        for key, track in self._tracks.items():
            mask = masks[key]
            track.masks.append(mask)
            if self.rule == "paper":
                if len(track.masks) >= 2:
                    newest = mask_distance(track.masks[-2], track.masks[-1])
                    track.queue = (track.queue + [newest])[-self.queue_length:]
                full = len(track.queue) == self.queue_length
            else:
                window = track.masks[-self.queue_length:]
                track.queue = [mask_distance(older, window[-1]) for older in window[:-1]]
                full = len(window) == self.queue_length
            if track.ticket is None and full and max(track.queue) < self.eps:
                ratio = track.ratio if track.flops_target is None else mask.num_pruned / mask.keep.numel()
                track.ticket = Ticket(ratio=ratio, epoch=epoch, mask=mask, distances=list(track.queue),
                                      flops_target=track.flops_target, flops_fraction=self.flops_fraction(mask))
                emerged.append(track.ticket)
        return emerged

    # -- queries ------------------------------------------------------------------------------

    def _track(self, key: float | str) -> _Track:
        for k, track in self._tracks.items():
            if isinstance(key, str):
                if key == (k if isinstance(k, str) else ratio_name(k)):
                    return track
            elif not isinstance(k, str) and math.isclose(k, key, rel_tol=1e-9, abs_tol=1e-12):
                return track
        raise ValueError(f"{'ticket' if isinstance(key, str) else 'ratio'} {key} is not tracked; this detector "
                         f"tracks {self.keys}")

    @property
    def done(self) -> bool:
        """True once every ratio's and FLOPs target's ticket has emerged."""
        return all(t.ticket is not None for t in self._tracks.values())

    @property
    def emerged(self) -> dict[float | str, Ticket]:
        """Tickets found so far, by key (a ratio, or a FLOPs target's name; a new dict, in the order of `keys`)."""
        return {r: t.ticket for r, t in self._tracks.items() if t.ticket is not None}

    @property
    def pending(self) -> list[float | str]:
        """Keys whose ticket has not emerged yet, in the order of `keys`."""
        return [r for r, t in self._tracks.items() if t.ticket is None]

    @property
    def epochs(self) -> list[int]:
        """Epoch labels of all recorded masks, in order."""
        return list(self._epochs)

    def last_distance(self, ratio: float | str) -> float | None:
        """Distance between the two most recently recorded masks of `ratio` (None before two exist).

        This is the same quantity under both rules: the curve to plot per epoch.
        """
        masks = self._track(ratio).masks
        return mask_distance(masks[-2], masks[-1]) if len(masks) >= 2 else None

    def queue(self, ratio: float | str) -> list[float]:
        """The distances the rule currently looks at (see `Ticket.distances`), oldest first."""
        return list(self._track(ratio).queue)

    def masks(self, ratio: float | str) -> list[ChannelMask]:
        """Every recorded mask of `ratio`, one per entry of `epochs`."""
        return list(self._track(ratio).masks)

    def distance_matrix(self, ratio: float | str) -> torch.Tensor:
        """[E, E] float64 pairwise mask distances over all recorded epochs (symmetric, zero diagonal).

        Entries equal `mask_distance` exactly: Hamming counts are integers computed in float64 via
        |a| + |b| - 2 a.b, then divided by N.
        """
        masks = self._track(ratio).masks
        if not masks:
            return torch.zeros(0, 0, dtype=torch.float64)
        keep = torch.stack([m.keep.cpu() for m in masks]).double()
        counts = keep.sum(1)
        hamming = counts[:, None] + counts[None, :] - 2.0 * keep @ keep.T
        return hamming / keep.shape[1]

    def summary(self) -> dict:
        """JSON-able overview: the settings and, per ratio (under "ratios", keyed by str(ratio)) and per
        FLOPs target (under "flops_targets", keyed by str(target)), the ticket's name, the EB epoch or None,
        the last distance, the current queue's maximum, and of the ticket's mask (or of the latest mask
        while the ticket is pending; None before any step) kept_back, the fraction of channels it keeps
        and, with a FLOPs counter, the fraction of the dense forward FLOPs its network costs."""
        blocks: dict[str, dict] = {"ratios": {}, "flops_targets": {}}
        for key, track in self._tracks.items():
            mask = track.ticket.mask if track.ticket else (track.masks[-1] if track.masks else None)
            block, value = (("ratios", track.ratio) if track.flops_target is None
                            else ("flops_targets", track.flops_target))
            blocks[block][str(value)] = {
                "name": self.name(key),
                "eb_epoch": track.ticket.epoch if track.ticket else None,
                "last_distance": self.last_distance(key),
                "queue_max": max(track.queue) if track.queue else None,
                "kept_back": mask.kept_back if mask else None,
                "channels_fraction": 1 - mask.num_pruned / mask.keep.numel() if mask else None,
                "flops_fraction": self.flops_fraction(mask) if mask else None,
            }
        if not self.flops_targets:
            del blocks["flops_targets"]
        return {"rule": self.rule, "eps": self.eps, "queue_length": self.queue_length,
                "min_keep": self.min_keep, "epochs_recorded": len(self._epochs), **blocks}

    # -- persistence --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The recorded history as plain tensors, lists and dicts (torch.save-able, weights_only-safe).

        Only the settings, epoch labels and masks are stored; queues and tickets are derived from them.
        """
        sizes = list(self._tracks[self.keys[0]].masks[0].sizes) if self._epochs else []
        return {
            "version": 1,
            "ratios": list(self.ratios),
            "flops_targets": list(self.flops_targets),
            "eps": self.eps,
            "queue_length": self.queue_length,
            "rule": self.rule,
            "min_keep": self.min_keep,
            "epochs": list(self._epochs),
            "sizes": sizes,
            "keep": [torch.stack([m.keep.cpu() for m in t.masks]) if t.masks
                     else torch.zeros(0, 0, dtype=torch.bool) for t in self._tracks.values()],
            "kept_back": [[m.kept_back for m in t.masks] for t in self._tracks.values()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a history saved by `state_dict`, replacing this detector's.

        The settings must match this detector's (a different eps or rule would have decided differently,
        so the saved history could not be continued faithfully). Queues and tickets are rebuilt by
        replaying the saved masks through the same rule, so continuing afterwards makes exactly the
        decisions an uninterrupted detector would have made.
        """
        if state.get("version") != 1:
            raise ValueError(f"unsupported EarlyBird state version {state.get('version')!r} (expected 1)")
        saved = {"ratios": tuple(float(r) for r in state["ratios"]),
                 "flops_targets": tuple(float(t) for t in state.get("flops_targets", ())), "eps": float(state["eps"]),
                 "queue_length": int(state["queue_length"]), "rule": state["rule"],
                 # states saved before the per-layer floor existed drew with the floor of one channel
                 "min_keep": float(state.get("min_keep", 0.0))}
        for name, value in saved.items():
            if value != getattr(self, name):
                raise ValueError(f"saved detector has {name}={value!r} "
                                 f"but this one has {getattr(self, name)!r}")
        self._epochs = []
        self._tracks = self._new_tracks()
        sizes = tuple(int(s) for s in state["sizes"])
        for i, epoch in enumerate(state["epochs"]):
            masks = {r: ChannelMask(keep=state["keep"][j][i].clone(), sizes=sizes,
                                    kept_back=int(state["kept_back"][j][i]))
                     for j, r in enumerate(self.keys)}
            self._record(int(epoch), masks)
