"""The Early-Bird search: train the dense network with the L1 penalty on the BatchNorm weights, draw the
masks after every epoch, save each ratio's (and FLOPs target's) ticket as it emerges, stop when all have.

    result = run_search(cfg, run_dir, data, device)   # RUN/search/, RUN/tickets/pNN.pt (fNN.pt), RUN/init.pt

With --rewind-epoch K it also saves the dense weights after epoch K (RUN/rewindK.pt) for `--init rewind`.

The phase is resumable: a finished search (RUN/search/result.json) is read back, an unfinished one
continues from its checkpoint with the detector's history. Under torchrun every rank trains alike and
rank 0 alone draws masks and writes tickets and figures.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from . import checkpoint, distributed, rundir
from .config import Config
from .data import DataBundle
from .channel_flops import ChannelFlops
from .earlybird import EarlyBird, Ticket, channel_scores, draw_mask, prunable_bns
from .flops import CostMeter, detector_ops, measure_cost
from .figures import distance_matrix_figure, kept_channels_figure, save_figure
from .quant import BFPTraining
from .tickets import save_ticket, ticket_label
from .train import Hook, Trainer, new_model


class L1Sparsity(Hook):
    """Network slimming's sparsity: after backward, grad(gamma) += strength * sign(gamma) on prunable BNs.

    `scales` (one float per prunable BN, or None for all 1) weighs each layer's penalty:
    grad(gamma_c) += strength * scale_c * sign(gamma_c); `flops_scales` gives MorphNet's FLOPs weights.
    Under torchrun DDP has averaged the gradients over the ranks by the time backward returns, so the
    penalty is added once, to the averaged gradient, and alike on every rank (the weights are the same).
    """

    def __init__(self, model: nn.Module, strength: float, scales: list[float] | None = None):
        self.weights = [bn.weight for _, bn in prunable_bns(model)]
        self.strength = strength
        self.scales = scales

    def after_backward(self, trainer: Trainer) -> None:
        grads = [w.grad for w in self.weights]
        signs = torch._foreach_sign([w.detach() for w in self.weights])
        if self.scales is not None:
            torch._foreach_mul_(signs, self.scales)
        torch._foreach_add_(grads, signs, alpha=self.strength)


def flops_scales(counter: ChannelFlops) -> list[float]:
    """Per prunable layer, the weight of its channels' L1 penalty under `--sparsity-weight flops` (MorphNet's
    FLOPs regularizer, Gordon et al. 2018): the forward FLOPs one channel costs in the dense network (its
    conv's output map plus the next layer's input slice, `ChannelFlops.channel_costs`), divided by the mean
    of that cost over all prunable channels, so the mean weight is 1 and --sparsity keeps its scale."""
    costs = counter.channel_costs()
    mean = sum(c * n for c, n in zip(costs, counter.sizes)) / sum(counter.sizes)
    if mean == 0:
        raise ValueError("no prunable channel costs any FLOPs: nothing to weigh the penalty by")
    return [c / mean for c in costs]


class EarlyBirdHook(Hook):
    """Runs the detector after every search epoch, saves each ticket as it emerges, stops when all have.

    Under torchrun the detector draws its masks on rank 0, which alone saves tickets and figures, and
    every rank's detector becomes a copy of rank 0's: one set of tickets, one decision to stop.
    """

    def __init__(self, detector: EarlyBird, run_dir: Path, max_epochs: int, draw_epochs: Sequence[int] = ()):
        self.detector = detector
        self.run_dir = run_dir
        self.max_epochs = max_epochs
        self.draw_epochs = sorted(int(e) for e in draw_epochs)

    def step(self, epoch: int) -> list[Ticket]:
        """Draw the masks of epoch `epoch`: the tickets that emerged now (on rank 0; [] on the others)."""
        tickets = self.detector.step(epoch) if distributed.is_main() else []
        distributed.sync_from_main(self.detector)
        return tickets

    def after_epoch(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        for ticket in self.step(epoch):
            path = save_ticket(ticket, trainer.model, rundir.ticket_file(self.run_dir, ticket.name))
            print(f"Early-Bird ticket for {ticket_label(ticket)} emerged at epoch {epoch}: {path}",
                  file=sys.stderr, flush=True)
            self.draw(trainer, epoch, ticket.key)
        if epoch in self.draw_epochs and distributed.is_main():
            self.draw_tickets(trainer.model, epoch)
        for key in self.detector.keys:
            name = self.detector.name(key)
            tag = f"eb/{name}"
            distance = self.detector.last_distance(key)
            queue = self.detector.queue(key)
            values = {}
            if distance is not None:
                values[f"{tag}/distance"] = distance
                metrics[f"eb_{name}_distance"] = distance
            if queue:
                values[f"{tag}/queue_max"] = max(queue)
            trainer.monitor.scalars(epoch, values)
        trainer.stop = self.should_stop(epoch)

    def should_stop(self, epoch: int) -> bool:
        drawn = not self.draw_epochs or epoch >= self.draw_epochs[-1]
        return (self.detector.done and drawn) or epoch >= self.max_epochs

    def draw_tickets(self, model: nn.Module, epoch: int) -> None:
        """Save every ratio's ticket of epoch `epoch` (--draw-epochs): the mask the detector would draw now,
        whether or not its ticket has emerged."""
        scores = channel_scores(model)
        for ratio in self.detector.ratios:
            ticket = Ticket(ratio, epoch, draw_mask(scores, ratio, self.detector.min_keep), [])
            save_ticket(ticket, model, rundir.drawn_ticket_file(self.run_dir, ratio, epoch), drawn=True)

    def draw(self, trainer: Trainer, epoch: int, key: float | str) -> None:
        """The epoch-by-epoch mask-distance matrix of a ratio or a ticket name ('f50'), to TensorBoard and
        as PNG in the search folder."""
        name = self.detector.name(key)
        ticket = next((t for t in self.detector.emerged.values() if t.name == name), None)
        fig = distance_matrix_figure(self.detector.distance_matrix(key), self.detector.epochs,
                                     key if isinstance(key, float) else name,
                                     ticket.epoch if ticket else None)
        trainer.monitor.figure(f"eb/{name}/distance_matrix", fig, epoch)
        save_figure(fig, rundir.distance_figure(self.run_dir, name))

    def state_dict(self) -> dict:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state)


class SaveWeights(Hook):
    """Saves the dense weights after epoch `epoch` to `path` (for `--init rewind --rewind-epoch`), before
    that epoch's checkpoint, so a search resumed from any later checkpoint finds them on disk."""

    def __init__(self, epoch: int, path: Path):
        self.epoch = epoch
        self.path = path

    def after_epoch(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        if epoch == self.epoch and distributed.is_main():
            weights = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
            checkpoint.atomic_save(weights, self.path)


# ---- the phase --------------------------------------------------------------------------------
def show_progress(cfg: Config) -> bool:
    """Whether a phase draws progress bars (--progress auto: when stderr is a terminal)."""
    return cfg.run.progress == "on" or (cfg.run.progress == "auto" and sys.stderr.isatty())


def cost_meter(model: nn.Module, cfg: Config, data: DataBundle, start_flops: float = 0) -> CostMeter:
    """Measures the model's FLOPs at the training batch size and meters them through a phase."""
    return CostMeter(measure_cost(model, data.input_shape, cfg.train.batch_size), start_flops)


def run_search(cfg: Config, run_dir: Path, data: DataBundle, device: torch.device) -> dict:
    """Train the dense network with the L1 penalty until every ratio's ticket has emerged."""
    out_dir = rundir.search_dir(run_dir)
    done = rundir.finished(out_dir)
    if done is not None:
        return done
    model = new_model(cfg, data, cfg.train.seed)  # the baseline starts from the same weights
    if distributed.is_main() and not (run_dir / rundir.INIT_FILE).exists():
        checkpoint.atomic_save(model.state_dict(), run_dir / rundir.INIT_FILE)
    s = cfg.search
    weighted = s.sparsity > 0 and s.sparsity_weight == "flops"
    counter = ChannelFlops(model, data.input_shape) if s.flops_targets or weighted else None
    detector = EarlyBird(model, ratios=s.ratios, eps=s.eps, queue_length=s.queue_length, rule=s.eb_rule,
                         min_keep=s.min_keep, flops_targets=s.flops_targets, flops_counter=counter)
    max_epochs = s.max_search_epochs or cfg.train.epochs
    meter = cost_meter(model, cfg, data)  # before BFP hooks attach: FLOPs are counted at full precision
    scales = flops_scales(counter) if weighted else None
    hooks: list[Hook] = [L1Sparsity(model, s.sparsity, scales)] if s.sparsity > 0 else []
    if s.precision == "bfp8":  # rounds the weights at once: init.pt above keeps the fp32 initialization
        hooks.append(BFPTraining(model, bits=s.bits, seed=cfg.train.seed, device=device))
    if s.rewind_epoch:
        hooks.append(SaveWeights(s.rewind_epoch, rundir.rewind_file(run_dir, s.rewind_epoch)))
    eb_hook = EarlyBirdHook(detector, run_dir, max_epochs, s.draw_epochs)
    trainer = Trainer(model, data, cfg.train, device=device, out_dir=out_dir, hooks=[*hooks, eb_hook, meter],
                      end_epoch=min(max_epochs, cfg.train.epochs), progress=show_progress(cfg),
                      tensorboard=cfg.run.tensorboard, name="search")
    if trainer.resume():
        trainer.stop = eb_hook.should_stop(trainer.epoch)  # killed after the last epoch's checkpoint
    else:
        eb_hook.step(0)  # the mask at initialization starts the distance matrix
    result = trainer.fit()
    channels = [bn.num_features for _, bn in prunable_bns(model)]
    cost = {**meter.finish(trainer), "detector_ops": detector_ops(sum(channels), len(detector.keys),
                                                                  len(detector.epochs)),
            # a bfp search's multiply-adds are 8-bit (or --bits) operations, not fp32 ones
            "flops_precision": "fp32" if s.precision == "fp32" else f"bfp{s.bits}"}
    result.update(precision=s.precision, **({"bits": s.bits} if s.precision == "bfp8" else {}))
    result.update(cost=cost, detector=detector.summary(), pending=detector.pending,
                  tickets={t.name: str(rundir.ticket_file(Path(), t.name)) for t in detector.emerged.values()},
                  drawn_tickets={rundir.drawn_ticket_name(r, e): str(rundir.drawn_ticket_file(Path(), r, e))
                                 for e in eb_hook.draw_epochs if e <= trainer.epoch for r in detector.ratios})
    if distributed.is_main():
        for key in detector.keys:
            eb_hook.draw(trainer, trainer.epoch, key)
        names = [name for name, _ in prunable_bns(model)]
        kept = {t.key: t.mask.kept_per_layer() for t in detector.emerged.values()}
        save_figure(kept_channels_figure(names, channels, kept), rundir.kept_channels_figure(run_dir))
        if detector.pending:
            last = ", ".join(f"{f'p = {k:g}' if isinstance(k, float) else k}: last distances {[round(d, 4) for d in detector.queue(k)]}"
                             for k in detector.pending)
            print(f"No Early-Bird ticket emerged within {trainer.epoch} epochs for {last} (eps = {s.eps:g}); "
                  "raise --eps or --max-search-epochs to find one", file=sys.stderr, flush=True)
        checkpoint.atomic_write_json(result, out_dir / rundir.RESULT_FILE)
    trainer.monitor.close()
    return result
