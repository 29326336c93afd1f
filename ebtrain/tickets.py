"""The ticket file: what the search writes when an Early-Bird ticket emerges, and the networks made from it.

A ticket file (RUN/tickets/pNN.pt, see rundir.py for where) is a dict:
    kind            "ebtrain-ticket"
    ratio, epoch    the pruning ratio and the epoch the ticket emerged at (a FLOPs target's ticket: the
                    fraction of channels its mask prunes)
    flops_target, flops_fraction   the FLOPs target (None for a ratio's ticket) and the pruned network's
                    forward FLOPs over the dense network's (None when the search counted none)
    layers          names of the prunable BatchNorm layers, in order
    keep            one bool tensor per layer: the channel mask
    kept_channels, dense_channels, kept_back   channels kept and in the dense network per layer; how many
                    channels the keep-one-per-layer rule kept back
    distances       the detector's last mask distances
    drawn           True for a ticket drawn at a fixed epoch (--draw-epochs), not by the detector (absent
                    in ticket files written before it existed: False)
    arch            the dense network's `model.arch` (build_model(**arch) rebuilds it)
    state_dict      the dense network's weights at the EB epoch
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from . import checkpoint, distributed
from .earlybird import Ticket, channel_scores, prunable_bns, ratio_name, target_name
from .errors import UserError
from .models import build_model
from .prune import kept_channels, prune_channels, round_keep

TICKET_KIND = "ebtrain-ticket"


def ticket_name(ticket: dict) -> str:
    """The name of a ticket read from its file: 'p30' for ratio 0.3, 'f50' for FLOPs target 0.5."""
    target = ticket.get("flops_target")
    return ratio_name(ticket["ratio"]) if target is None else target_name(target)


def ticket_label(ticket: dict | Ticket) -> str:
    """What a message calls a ticket: 'p = 0.3', or 'FLOPs target 0.5'."""
    target = ticket.flops_target if isinstance(ticket, Ticket) else ticket.get("flops_target")
    ratio = ticket.ratio if isinstance(ticket, Ticket) else ticket["ratio"]
    return f"p = {ratio:g}" if target is None else f"FLOPs target {target:g}"


def save_ticket(ticket: Ticket, model: nn.Module, path: Path, drawn: bool = False) -> Path:
    """Write a ticket file: ratio, EB epoch, mask per layer, channels kept, and the weights of `model` now;
    `drawn`: the ticket was drawn at a fixed epoch rather than by the detector."""
    names = [name for name, _ in prunable_bns(model)]
    checkpoint.atomic_save({
        "kind": TICKET_KIND, "ratio": ticket.ratio, "epoch": ticket.epoch, "layers": names,
        "keep": ticket.mask.per_layer(), "kept_channels": ticket.mask.kept_per_layer(),
        "dense_channels": list(ticket.mask.sizes), "kept_back": ticket.mask.kept_back,
        "distances": ticket.distances, "arch": model.arch, "drawn": drawn,
        "flops_target": ticket.flops_target, "flops_fraction": ticket.flops_fraction,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }, path)
    return path


def load_ticket(path: str | Path) -> dict:
    """Read a ticket file written by the search; a file that is not one raises UserError.
    Under torchrun rank 0 reads it and every rank gets its contents."""
    return distributed.from_main(_read_ticket, Path(path))


def _read_ticket(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"ticket file '{path}' not found")
    try:
        ticket = checkpoint.load(path)
    except (checkpoint.UnreadableFile, OSError) as e:
        raise UserError(f"'{path}' is not a readable ticket file ({e})") from None
    if not isinstance(ticket, dict) or ticket.get("kind") != TICKET_KIND:
        raise UserError(f"'{path}' is not an ebtrain ticket file (those are written to RUN/tickets/)")
    return ticket


def dense_from_ticket(ticket: dict) -> nn.Module:
    """The dense network with the ticket's weights, those at the EB epoch; UserError if the weights or
    the masks do not fit the ticket's arch (a damaged ticket, or one edited by hand)."""
    dense = build_model(**ticket["arch"])
    what = f"the ticket for {ticket_label(ticket)} does not fit its arch {ticket['arch']['name']}"
    try:
        dense.load_state_dict(ticket["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{what}: {' '.join(str(e).split())[:300]}") from None
    sizes = [bn.num_features for _, bn in prunable_bns(dense)]
    if [len(k) for k in ticket["keep"]] != sizes:
        raise UserError(f"{what}: it has masks for layers of {[len(k) for k in ticket['keep']]} channels, the arch "
                        f"has {sizes}")
    return dense


def pruned_from_ticket(ticket: dict) -> tuple[nn.Module, nn.Module]:
    """(dense network with the EB weights, the physically pruned network with the kept slices)."""
    dense = dense_from_ticket(ticket)
    return dense, prune_channels(dense, ticket["keep"])


def round_ticket(ticket: dict, multiple: int) -> dict:
    """The ticket with each layer's kept channels rounded up to a multiple of `multiple` (`round_keep`,
    by |gamma| at the EB epoch): its `keep` and `kept_channels` then describe the network that is cut
    and trained, and `channels_rounded_added` counts the channels the rounding kept again."""
    keep = round_keep(ticket["keep"], channel_scores(dense_from_ticket(ticket)), multiple)
    return {**ticket, "keep": keep, "kept_channels": kept_channels(keep),
            "channels_rounded_added": sum(kept_channels(keep)) - sum(ticket["kept_channels"])}
