"""Every check of a user's input that can run before any training: settings, the arch against the data,
a ticket against the run it is retrained in. Each raises UserError with one line naming the bad value
and what is allowed, so a mistake costs seconds, never a traceback or a half-made run directory.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import Config, check_allowed
from .data import DataBundle
from .earlybird import prunable_bns
from .errors import UserError
from .models import build_model, list_models
from .tickets import ratio_name, target_name


def validate(cfg: Config) -> None:
    """Check settings before any work starts; raises UserError naming the bad value.

    Each setting's own bounds and choices are declared beside its field (config.py) and checked by
    `config.check_allowed`; what is checked here is how settings fit together and with the disk."""
    if cfg.model.arch not in list_models():
        build_model(cfg.model.arch)  # raises the registry's own "unknown arch" message
    check_allowed(cfg)
    milestones, draws, epochs = cfg.train.milestones, cfg.search.draw_epochs, cfg.train.epochs
    checks = [
        (cfg.search.precision == "fp32" or cfg.train.optimizer == "sgd",
         f"--precision {cfg.search.precision} rounds SGD's momentum: use --optimizer sgd"),
        (all(0 < m < cfg.train.epochs and (m < 1 or float(m).is_integer()) for m in milestones),
         f"--milestones {_values(milestones)}: each must be a fraction in (0, 1) or a whole epoch inside the "
         f"{cfg.train.epochs}-epoch schedule"),
        (all(float(e).is_integer() and 1 <= e < epochs for e in draws),
         f"--draw-epochs {_values(draws)}: each must be a whole epoch from 1 to {epochs - 1}, so that some of "
         f"the {epochs}-epoch schedule is left to retrain its tickets"),
        (not draws or not cfg.search.max_search_epochs or max(draws) <= cfg.search.max_search_epochs,
         f"--draw-epochs {_values(draws)}: the search stops at --max-search-epochs "
         f"{cfg.search.max_search_epochs}, before the last of them"),
        (cfg.search.rewind_epoch < cfg.train.epochs,
         f"--rewind-epoch {cfg.search.rewind_epoch}: must be below --epochs {cfg.train.epochs} (a ticket rewound to "
         "epoch K trains epochs K+1 to the end)"),
        (not cfg.search.max_search_epochs or cfg.search.rewind_epoch <= cfg.search.max_search_epochs,
         f"--rewind-epoch {cfg.search.rewind_epoch}: the search stops by --max-search-epochs "
         f"{cfg.search.max_search_epochs}, before it"),
    ]
    checks += [(Path(folder).is_dir() or not Path(folder).exists(), f"{flag} {folder}: is a file, not a folder")
               for flag, folder in (("--out", cfg.run.out), ("--runs-dir", cfg.run.runs_dir)) if folder]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


PROBE_WIDTH = 1e-9  # every layer at one channel: models.scaled() never goes below that


def check_model(cfg: Config, data: DataBundle, early_bird: bool) -> None:
    """Check, before any training, that the arch takes the data's images and can train on every batch
    of them, and for the Early-Bird search that it has BatchNorm layers to draw masks from.

    A copy of the arch at the smallest width is enough (what is checked does not depend on the width),
    so this costs a few milliseconds. Raises UserError naming the value and what is allowed.
    """
    s = data.image_size
    shape = dict(num_classes=data.num_classes, in_channels=data.in_channels, image_size=s)
    probe = build_model(cfg.model.arch, width=PROBE_WIDTH, **shape)  # raises the arch's own word on the image size
    if early_bird and not prunable_bns(probe):
        with_bn = [name for name in list_models() if prunable_bns(build_model(name, width=PROBE_WIDTH, **shape))]
        raise UserError(f"--arch {cfg.model.arch} has no BatchNorm layers to draw Early-Bird masks from: choose "
                        f"one of {', '.join(with_bn)} (or run `ebtrain train` or `ebtrain lottery` with it)")
    n, batch = len(data.train), cfg.train.batch_size
    if min(batch, n % batch or batch) == 1:  # every epoch ends with a batch of one image
        try:
            with torch.no_grad():
                probe.train()(torch.zeros(1, data.in_channels, s, s))
        except ValueError:  # BatchNorm in training: "Expected more than 1 value per channel"
            raise UserError(f"--batch-size {batch} leaves a batch of 1 image ({n} training images), and "
                            f"{cfg.model.arch} cannot train on one {s}x{s} image (its BatchNorm needs more than one "
                            "value per channel): choose a --batch-size that leaves 0 or at least 2 images over"
                            ) from None


def check_ticket_names(cfg: Config) -> None:
    """Each ratio and FLOPs target of the search gets a ticket file of its own (p30.pt for 0.3, f50.pt for a
    FLOPs target of 0.5), and the search has at least one of them."""
    s = cfg.search
    if not s.ratios and not s.flops_targets:
        raise UserError("--ratios is empty and no --flops-targets are given: name at least one pruning ratio or "
                        "FLOPs target in (0, 1) to draw a ticket for")
    for flag_name, what, values, name in (("--ratios", "ratio", s.ratios, ratio_name),
                                          ("--flops-targets", "target", s.flops_targets, target_name)):
        names = [name(v) for v in values]
        if len(set(names)) < len(names):
            raise UserError(f"{flag_name} {_values(values)}: each {what} once ({what}s that round to the same percent "
                            f"share a ticket file: {', '.join(names)})")


def _values(values: list) -> str:
    """A list of numbers as the flag takes it: [0.3, 1.5] -> '0.3 1.5'."""
    return " ".join(f"{v:.10g}" for v in values)


def check_ticket_fits(cfg: Config, data: DataBundle, ticket: dict, path: str) -> None:
    """A ticket's pruned network keeps the ticket's architecture and takes the images it was drawn on."""
    arch = ticket["arch"]
    for flag, given, wanted in (("--arch", cfg.model.arch, arch["name"]), ("--width", cfg.model.width, arch["width"])):
        if given != wanted:
            raise UserError(f"{flag} {given}: '{path}' is a ticket of {arch['name']} at width {arch['width']:g}, and "
                            f"its pruned network keeps that architecture: drop {flag}")

    def images(channels: int, size: int, classes: int) -> str:
        return f"{channels}x{size}x{size} images in {classes} classes"

    wanted = images(arch["in_channels"], arch["image_size"], arch["num_classes"])
    given = images(data.in_channels, data.image_size, data.num_classes)
    if given != wanted:
        raise UserError(f"'{path}' is a ticket for {wanted}, but --dataset {cfg.data.dataset} gives {given}: "
                        "retrain it on the data it was drawn on")
