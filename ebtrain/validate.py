"""Every check of a user's input that can run before any training: settings, the arch against the data,
a ticket against the run it is retrained in. Each raises UserError with one line naming the bad value
and what is allowed, so a mistake costs seconds, never a traceback or a half-made run directory.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import Config
from .data import DataBundle
from .earlybird import prunable_bns
from .errors import UserError
from .models import build_model, list_models


def validate(cfg: Config) -> None:
    """Check settings before any work starts; raises UserError naming the bad value."""
    if cfg.model.arch not in list_models():
        build_model(cfg.model.arch)  # raises the registry's own "unknown arch" message
    ratios, milestones = cfg.search.ratios, cfg.train.milestones
    checks = [
        (len(ratios) > 0, "--ratios: give at least one pruning ratio in (0, 1)"),
        (all(0 < r < 1 for r in ratios), f"--ratios {_values(ratios)}: each must lie in (0, 1)"),
        (0 < cfg.search.eps < 1, f"--eps {cfg.search.eps}: must lie in (0, 1)"),
        (0 <= cfg.search.min_keep < 1, f"--min-keep {cfg.search.min_keep}: must lie in [0, 1)"),
        (cfg.search.queue_length >= 2, f"--queue-length {cfg.search.queue_length}: must be at least 2"),
        (cfg.search.sparsity >= 0, f"--sparsity {cfg.search.sparsity}: must be 0 or more"),
        (cfg.search.max_search_epochs >= 0, f"--max-search-epochs {cfg.search.max_search_epochs}: must be 0 or more"),
        (2 <= cfg.search.bits <= 24, f"--bits {cfg.search.bits}: must lie between 2 and 24"),
        (cfg.search.round_channels >= 0, f"--round-channels {cfg.search.round_channels}: must be 1 or more, or 0 "
                                          "(auto)"),
        (cfg.search.precision == "fp32" or cfg.train.optimizer == "sgd",
         f"--precision {cfg.search.precision} rounds SGD's momentum: use --optimizer sgd"),
        (cfg.train.epochs > 0, f"--epochs {cfg.train.epochs}: must be positive"),
        (cfg.train.batch_size > 0, f"--batch-size {cfg.train.batch_size}: must be positive"),
        (cfg.train.eval_batch_size > 0, f"--eval-batch-size {cfg.train.eval_batch_size}: must be positive"),
        (0 < cfg.train.lr < math.inf, f"--lr {cfg.train.lr}: must be a positive number"),
        (0 <= cfg.train.momentum < 1, f"--momentum {cfg.train.momentum}: must lie in [0, 1)"),
        (0 <= cfg.train.weight_decay < math.inf, f"--weight-decay {cfg.train.weight_decay}: must be 0 or more"),
        (0 < cfg.train.gamma < math.inf, f"--gamma {cfg.train.gamma}: must be a positive number"),
        (cfg.model.width > 0, f"--width {cfg.model.width}: must be positive"),
        (all(0 < m < cfg.train.epochs and (m < 1 or float(m).is_integer()) for m in milestones),
         f"--milestones {_values(milestones)}: each must be a fraction in (0, 1) or a whole epoch inside the "
         f"{cfg.train.epochs}-epoch schedule"),
        (cfg.data.train_subset >= 0, f"--train-subset {cfg.data.train_subset}: must be 0 (all) or positive"),
        (cfg.data.val_size >= 0, f"--val-size {cfg.data.val_size}: must be 0 (none) or positive"),
        (cfg.data.dataset != "synthetic" or cfg.data.num_classes >= 2,
         f"--num-classes {cfg.data.num_classes}: a classifier needs at least 2 classes"),
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


def check_ticket_names(names: list[str], ratios: list) -> None:
    if len(set(names)) < len(names):
        raise UserError(f"--ratios {_values(ratios)}: each ratio once (ratios that round to the same percent share "
                        f"a ticket file: {', '.join(names)})")


def _values(values: list) -> str:
    """A list of numbers as the flag takes it: [0.3, 1.5] -> '0.3 1.5'."""
    return " ".join(f"{v:g}" for v in values)


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
