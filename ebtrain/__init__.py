"""ebtrain: find Early-Bird tickets and train them.

The pieces a user's own code calls:
    EarlyBird, draw_mask, mask_distance   the detector and its pure functions
    build_model, list_models              the architecture registry
    prune_channels, load_pruned           mask -> physically smaller network; load one from disk
"""
from .earlybird import ChannelMask, EarlyBird, Ticket, channel_scores, draw_mask, mask_distance
from .models import build_model, list_models
from .prune import load_pruned, prune_channels

__version__ = "0.1.0"

__all__ = ["ChannelMask", "EarlyBird", "Ticket", "build_model", "channel_scores", "draw_mask", "list_models",
           "load_pruned", "mask_distance", "prune_channels", "__version__"]
