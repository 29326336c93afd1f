"""What the lottery experiments measure beyond each network's own record: statistics over the seeds,
how much the tickets of different seeds overlap, how far kept and pruned weights moved, and how each
round's channel ticket compares with an Early-Bird ticket. Pure functions on records and masks.
"""
from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..earlybird import channel_scores, draw_mask, jaccard, mask_distance
from ..errors import UserError
from ..models import build_model
from ..tickets import load_ticket
from .masks import Masks
from .pruning import ChannelPruning

# The measurements of every trained network that lottery.json sums up over the seeds.
METRICS = ("test_acc_early", "test_acc_final", "early_stop_iter", "train_acc_final", "val_loss_min", "seconds")


def by_arm(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by arm, the arms in the order they first appear."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["arm"], []).append(record)
    return groups


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "min": float(np.min(values)),
            "max": float(np.max(values))}


def round_statistics(result: dict) -> dict:
    """One round's entry of lottery.json: fraction remaining, per layer, seconds, and per arm each of
    METRICS as mean, std, min and max over the seeds."""
    arms = {arm: {m: _stats([rec[m] for rec in runs]) for m in METRICS} for arm, runs in by_arm(result["records"]).items()}
    return {"round": result["round"], "remaining": result["remaining"], "layers": result["layers"],
            "seconds": result["seconds"], "arms": arms}


def expected_jaccard(a: float, b: float) -> float:
    """The Jaccard index two independent uniformly random masks of densities `a` and `b` would have:
    each entry is kept by both with probability ab and by either with a + b - ab."""
    either = a + b - a * b
    return a * b / either if either else 1.0


def mask_overlap(masks_by_seed: dict[int, Masks]) -> dict:
    """Mean pairwise Jaccard index of the seeds' masks, per layer and over all layers, next to what two
    independent random masks of the same densities would give (`expected_jaccard`)."""
    pairs = list(itertools.combinations(masks_by_seed.values(), 2))

    def compare(get: Callable[[Masks], torch.Tensor]) -> dict[str, float]:
        return {"observed": float(np.mean([jaccard(get(a), get(b)) for a, b in pairs])),
                "random": float(np.mean([expected_jaccard(float(get(a).float().mean()), float(get(b).float().mean()))
                                         for a, b in pairs]))}

    names = list(next(iter(masks_by_seed.values())))
    return {"overall": compare(lambda m: torch.cat([m[n].reshape(-1) for n in names])),
            "layers": {n: compare(lambda m, n=n: m[n]) for n in names}}


def weight_movement(initial: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], masks: Masks) -> dict:
    """Mean |trained - initial| over the weights `masks` keeps and over those it prunes, per tensor
    and overall (Frankle & Carbin: a winning ticket's weights move further than the rest)."""
    def means(deltas: list[torch.Tensor], keeps: list[torch.Tensor]) -> dict[str, float | None]:
        delta, keep = torch.cat([d.reshape(-1) for d in deltas]), torch.cat([k.reshape(-1) for k in keeps])
        return {"kept": float(delta[keep].mean()) if keep.any() else None,
                "pruned": float(delta[~keep].mean()) if (~keep).any() else None}

    deltas = {n: (trained[n].float() - initial[n].float()).abs() for n in masks}
    return {"overall": means(list(deltas.values()), list(masks.values())),
            "layers": {n: means([deltas[n]], [masks[n]]) for n in masks}}


def mean_nested(items: list[dict]) -> dict:
    """Elementwise mean of dicts of equal structure (None where any value is None)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: mean_nested([item[k] for item in items]) for k in first}
    return None if any(v is None for v in items) else float(np.mean(items))


def load_eb_ticket(path: str, template: nn.Module) -> dict:
    """An EB-Train ticket file, checked to be of this run's network."""
    ticket = load_ticket(path)
    if ticket["arch"] != template.arch:
        raise UserError(f"--eb-ticket {path}: its network {ticket['arch']} is not this run's {template.arch}")
    return ticket


def eb_overlap(ticket: dict, pruning: ChannelPruning, masks_by_round: dict[int, Masks]) -> list[dict]:
    """Each round's IMP channel ticket against the Early-Bird ticket's mask at the same pruning ratio
    (drawn from the EB weights with `draw_mask`): Jaccard index, its random expectation, mask distance."""
    model = build_model(**ticket["arch"])
    model.load_state_dict(ticket["state_dict"])
    scores = channel_scores(model)
    rows = []
    for r, masks in masks_by_round.items():
        eb = draw_mask(scores, pruning.ratio(r)).keep
        imp = torch.cat([masks[n] for n in pruning.layers])
        rows.append({"round": r, "ratio": pruning.ratio(r), "jaccard": jaccard(eb, imp),
                     "random": expected_jaccard(float(eb.float().mean()), float(imp.float().mean())),
                     "distance": mask_distance(eb, imp)})
    return rows
