"""EB-Train as plain functions: search for Early-Bird tickets, prune and retrain each, summarize.

    summary = eb_train(cfg, run_dir)      # the whole job, resumable

Layout of a run directory:
    config.yaml, summary.json, init.pt (weights at initialization)
    search/      metrics.jsonl, checkpoint.pt, TensorBoard events, distance_p30.png, ...
    tickets/     p30.pt (ratio, EB epoch, mask, channels kept, weights at the EB epoch)
    retrain/p30/ metrics.jsonl, checkpoint.pt, events, model.pt (the trained pruned network), result.json
    baseline/    the dense network trained for the full schedule (with --baseline)
Every phase writes result.json when it finishes, so a resumed run skips what is done and continues
the phase in progress from its checkpoint.
Every phase's result.json holds its cost (FLOPs, seconds; see flops.py), summary.json the run's
(`cost`: search, each ticket, the dense baseline, savings), and each phase folder a TensorBoard run
`flops/` with test accuracy against cumulative training FLOPs.
Under torchrun every rank runs these functions alike, training data-parallel; rank 0 alone reads and
writes the run directory and hands what it reads to the other ranks (see distributed.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint, distributed, rundir
from .config import Config
from .data import DataBundle, load_data
from .earlybird import EarlyBird, Ticket, prunable_bns
from .errors import UserError
from .flops import CostMeter, detector_ops, measure_cost, run_cost, search_total
from .models import build_model, count_params, save_model
from .monitor import distance_matrix_figure, kept_channels_figure, save_figure
from .prune import prune_channels
from .quant import BFPTraining
from .tickets import load_ticket, pruned_from_ticket, ratio_name, round_ticket, save_ticket
from .train import Hook, Trainer, resolve_device, seed_everything


class L1Sparsity(Hook):
    """Network slimming's sparsity: after backward, grad(gamma) += strength * sign(gamma) on prunable BNs.

    Under torchrun DDP has averaged the gradients over the ranks by the time backward returns, so the
    penalty is added once, to the averaged gradient, and alike on every rank (the weights are the same).
    """

    def __init__(self, model: nn.Module, strength: float):
        self.weights = [bn.weight for _, bn in prunable_bns(model)]
        self.strength = strength

    def after_backward(self, trainer: Trainer) -> None:
        grads = [w.grad for w in self.weights]
        torch._foreach_add_(grads, torch._foreach_sign([w.detach() for w in self.weights]), alpha=self.strength)


class EarlyBirdHook(Hook):
    """Runs the detector after every search epoch, saves each ticket as it emerges, stops when all have.

    Under torchrun the detector draws its masks on rank 0, which alone saves tickets and figures, and
    every rank's detector becomes a copy of rank 0's: one set of tickets, one decision to stop.
    """

    def __init__(self, detector: EarlyBird, run_dir: Path, max_epochs: int):
        self.detector = detector
        self.run_dir = run_dir
        self.max_epochs = max_epochs

    def step(self, epoch: int) -> list[Ticket]:
        """Draw the masks of epoch `epoch`: the tickets that emerged now (on rank 0; [] on the others)."""
        tickets = self.detector.step(epoch) if distributed.is_main() else []
        distributed.sync_from_main(self.detector)
        return tickets

    def after_epoch(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        for ticket in self.step(epoch):
            path = save_ticket(ticket, trainer.model, rundir.ticket_file(self.run_dir, ticket.ratio))
            print(f"Early-Bird ticket for p = {ticket.ratio:g} emerged at epoch {epoch}: {path}",
                  file=sys.stderr, flush=True)
            self.draw(trainer, epoch, ticket.ratio)
        for ratio in self.detector.ratios:
            tag = f"eb/{ratio_name(ratio)}"
            distance = self.detector.last_distance(ratio)
            queue = self.detector.queue(ratio)
            values = {}
            if distance is not None:
                values[f"{tag}/distance"] = distance
                metrics[f"eb_{ratio_name(ratio)}_distance"] = distance
            if queue:
                values[f"{tag}/queue_max"] = max(queue)
            trainer.monitor.scalars(epoch, values)
        trainer.stop = self.should_stop(epoch)

    def should_stop(self, epoch: int) -> bool:
        return self.detector.done or epoch >= self.max_epochs

    def draw(self, trainer: Trainer, epoch: int, ratio: float) -> None:
        """The epoch-by-epoch mask-distance matrix, to TensorBoard and as PNG in the search folder."""
        ticket = self.detector.emerged.get(ratio)
        fig = distance_matrix_figure(self.detector.distance_matrix(ratio), self.detector.epochs, ratio,
                                     ticket.epoch if ticket else None)
        trainer.monitor.figure(f"eb/{ratio_name(ratio)}/distance_matrix", fig, epoch)
        save_figure(fig, rundir.distance_figure(self.run_dir, ratio))

    def state_dict(self) -> dict:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state)


# ---- phases ------------------------------------------------------------------------------------
def _progress(cfg: Config) -> bool:
    return cfg.run.progress == "on" or (cfg.run.progress == "auto" and sys.stderr.isatty())


def _dense_model(cfg: Config, data: DataBundle) -> nn.Module:
    seed_everything(cfg.train.seed)
    return build_model(cfg.model.arch, num_classes=data.num_classes, in_channels=data.in_channels,
                       width=cfg.model.width, image_size=data.image_size)


def _cost_meter(model: nn.Module, cfg: Config, data: DataBundle, start_flops: float = 0) -> CostMeter:
    """Measures the model's FLOPs at the training batch size and meters them through a phase."""
    return CostMeter(measure_cost(model, tuple(data.train.images.shape[1:]), cfg.train.batch_size), start_flops)


def _initial_weights(run_dir: Path) -> dict:
    path = run_dir / rundir.INIT_FILE
    if not path.exists():
        raise UserError(f"--init rewind needs the initial weights '{path}' written by the search")
    return checkpoint.load(path)


def _save_phase(result: dict, model: nn.Module, out_dir: Path, **extra) -> None:
    """Write the trained network (model.pt, with `extra` entries) and then result.json, which marks the
    phase finished; under torchrun from rank 0 only."""
    if distributed.is_main():
        save_model(model.cpu(), out_dir / rundir.MODEL_FILE, **extra)
        checkpoint.atomic_write_json(result, out_dir / rundir.RESULT_FILE)


def _search_flops(ticket_path: Path) -> float:
    """What the search that drew the ticket spent, where a retrain's cumulative FLOPs start (0 if unknown)."""
    search = rundir.finished(rundir.search_dir(rundir.run_of_ticket(ticket_path)))
    return search_total(search["cost"])["flops"] if search and "cost" in search else 0


def run_search(cfg: Config, run_dir: Path, data: DataBundle, device: torch.device) -> dict:
    """Train the dense network with the L1 penalty until every ratio's ticket has emerged."""
    out_dir = rundir.search_dir(run_dir)
    done = rundir.finished(out_dir)
    if done is not None:
        return done
    model = _dense_model(cfg, data)
    if distributed.is_main() and not (run_dir / rundir.INIT_FILE).exists():
        checkpoint.atomic_save(model.state_dict(), run_dir / rundir.INIT_FILE)
    s = cfg.search
    detector = EarlyBird(model, ratios=s.ratios, eps=s.eps, queue_length=s.queue_length, rule=s.eb_rule,
                         min_keep=s.min_keep)
    max_epochs = s.max_search_epochs or cfg.train.epochs
    meter = _cost_meter(model, cfg, data)  # before BFP hooks attach: FLOPs are counted at full precision
    hooks: list[Hook] = [L1Sparsity(model, s.sparsity)] if s.sparsity > 0 else []
    if s.precision == "bfp8":  # rounds the weights at once: init.pt above keeps the fp32 initialization
        hooks.append(BFPTraining(model, bits=s.bits, seed=cfg.train.seed, device=device))
    eb_hook = EarlyBirdHook(detector, run_dir, max_epochs)
    trainer = Trainer(model, data, cfg.train, device=device, out_dir=out_dir, hooks=[*hooks, eb_hook, meter],
                      end_epoch=min(max_epochs, cfg.train.epochs), progress=_progress(cfg),
                      tensorboard=cfg.run.tensorboard, name="search")
    if trainer.resume():
        trainer.stop = eb_hook.should_stop(trainer.epoch)  # killed after the last epoch's checkpoint
    else:
        eb_hook.step(0)  # the mask at initialization starts the distance matrix
    result = trainer.fit()
    channels = [bn.num_features for _, bn in prunable_bns(model)]
    cost = {**meter.finish(trainer), "detector_ops": detector_ops(sum(channels), len(detector.ratios),
                                                                  len(detector.epochs)),
            # a bfp search's multiply-adds are 8-bit (or --bits) operations, not fp32 ones
            "flops_precision": "fp32" if s.precision == "fp32" else f"bfp{s.bits}"}
    result.update(precision=s.precision, **({"bits": s.bits} if s.precision == "bfp8" else {}))
    result.update(cost=cost, detector=detector.summary(), pending=detector.pending,
                  tickets={ratio_name(r): str(rundir.ticket_file(Path(), r)) for r in detector.emerged})
    if distributed.is_main():
        for ratio in detector.ratios:
            eb_hook.draw(trainer, trainer.epoch, ratio)
        names = [name for name, _ in prunable_bns(model)]
        kept = {t.ratio: t.mask.kept_per_layer() for t in detector.emerged.values()}
        save_figure(kept_channels_figure(names, channels, kept), rundir.kept_channels_figure(run_dir))
        if detector.pending:
            last = ", ".join(f"p = {r:g}: last distances {[round(d, 4) for d in detector.queue(r)]}"
                             for r in detector.pending)
            print(f"No Early-Bird ticket emerged within {trainer.epoch} epochs for {last} (eps = {s.eps:g}); "
                  "raise --eps or --max-search-epochs to find one", file=sys.stderr, flush=True)
        checkpoint.atomic_write_json(result, out_dir / rundir.RESULT_FILE)
    trainer.monitor.close()
    return result


def retrain_ticket(cfg: Config, ticket_path: Path, out_dir: Path, data: DataBundle, device: torch.device,
                   init: str = "eb") -> dict:
    """Train the pruned network of a ticket through the rest of the schedule.

    init: 'eb' continues from the EB weights at global epoch EB+1 with a fresh optimizer; 'reinit'
    trains the same pruned architecture from a fresh random initialization for the full schedule;
    'rewind' resets the kept weights to their values at initialization (RUN/init.pt) and trains the
    full schedule.
    """
    done = rundir.finished(out_dir)
    if done is not None:
        return done
    ticket = round_ticket(load_ticket(ticket_path), cfg.search.round_channels)  # the EB mask stays on disk
    dense, pruned = pruned_from_ticket(ticket)
    start = ticket["epoch"]
    if init == "reinit":
        seed_everything(cfg.train.seed)
        fresh = build_model(**pruned.arch)
        # fresh weights; PreResNet's channel-selection masks are structure, not weights: keep them
        fresh.load_state_dict({k: v for k, v in pruned.state_dict().items() if k.endswith("mask")}, strict=False)
        pruned, start = fresh, 0
    elif init == "rewind":
        dense.load_state_dict(distributed.from_main(_initial_weights, rundir.run_of_ticket(ticket_path)))
        pruned = prune_channels(dense, ticket["keep"])
        start = 0
    if start >= cfg.train.epochs:
        raise UserError(f"the ticket was drawn at epoch {start}, at or past the schedule's {cfg.train.epochs} "
                        "epochs: nothing is left to retrain")
    meter = _cost_meter(pruned, cfg, data, _search_flops(ticket_path))
    trainer = Trainer(pruned, data, cfg.train, device=device, out_dir=out_dir, hooks=[meter], start_epoch=start,
                      progress=_progress(cfg), tensorboard=cfg.run.tensorboard,
                      name=f"retrain {ratio_name(ticket['ratio'])} ({init})")
    trainer.resume()
    result = trainer.fit()
    trainer.monitor.close()
    result.update(cost=meter.finish(trainer))
    result.update(ratio=ticket["ratio"], eb_epoch=ticket["epoch"], init=init, precision="fp32",
                  channels_kept=sum(ticket["kept_channels"]), channels_total=sum(ticket["dense_channels"]),
                  kept_per_layer=ticket["kept_channels"], kept_back=ticket["kept_back"],
                  round_channels=cfg.search.round_channels, channels_rounded_added=ticket["channels_rounded_added"],
                  params_dense=count_params(dense), params_pruned=count_params(pruned))
    _save_phase(result, trainer.model, out_dir, ratio=ticket["ratio"], eb_epoch=ticket["epoch"])
    return result


def train_dense(cfg: Config, out_dir: Path, data: DataBundle, device: torch.device) -> dict:
    """The dense baseline: the same initialization as the search, no sparsity, the full schedule."""
    done = rundir.finished(out_dir)
    if done is not None:
        return done
    model = _dense_model(cfg, data)
    meter = _cost_meter(model, cfg, data)
    trainer = Trainer(model, data, cfg.train, device=device, out_dir=out_dir, hooks=[meter],
                      progress=_progress(cfg), tensorboard=cfg.run.tensorboard, name="dense")
    trainer.resume()
    result = trainer.fit()
    trainer.monitor.close()
    result.update(cost=meter.finish(trainer))
    result.update(params=count_params(model), precision="fp32")
    _save_phase(result, trainer.model, out_dir)
    return result


def _summary_head(cfg: Config, device: torch.device) -> dict:
    """What a summary starts with: the network, the data, the schedule, where it trained."""
    head = {"arch": cfg.model.arch, "dataset": cfg.data.dataset, "width": cfg.model.width,
            "epochs": cfg.train.epochs, "device": str(device)}
    if distributed.world_size() > 1:  # results depend on it (each process's BatchNorm sees its share of a batch)
        head["processes"] = distributed.world_size()
    return head


def _save_summary(summary: dict, run_dir: Path) -> None:
    if distributed.is_main():
        checkpoint.atomic_write_json(summary, run_dir / rundir.SUMMARY_FILE)


def eb_train(cfg: Config, run_dir: Path, data: DataBundle | None = None) -> dict:
    """The main job: search, then prune and retrain every ticket, then summary.json."""
    device = resolve_device(cfg.train.device)
    data = data or load_data(cfg.data, seed=cfg.train.seed)
    summary = _summary_head(cfg, device)
    search = run_search(cfg, run_dir, data, device)
    summary["search"] = search
    summary["tickets"] = {}
    if cfg.search.retrain:
        drawn = {ratio_name(float(r)): (float(r), v["eb_epoch"]) for r, v in search["detector"]["ratios"].items()}
        for name, path in search["tickets"].items():
            ratio, eb_epoch = drawn[name]
            if cfg.search.init == "eb" and eb_epoch >= cfg.train.epochs:
                if distributed.is_main():
                    print(f"ebtrain: the ticket {name} emerged at the schedule's last epoch, so no epoch is left to "
                          "retrain it: raise --epochs or stop the search earlier (--max-search-epochs)",
                          file=sys.stderr, flush=True)
                continue
            summary["tickets"][name] = retrain_ticket(cfg, run_dir / path,
                                                      rundir.retrain_dir(run_dir, ratio, cfg.search.init),
                                                      data, device, cfg.search.init)
    if cfg.search.baseline:
        summary["baseline"] = train_dense(cfg, rundir.baseline_dir(run_dir), data, device)
    summary["cost"] = run_cost(search["cost"], {name: t["cost"] for name, t in summary["tickets"].items()},
                               summary.get("baseline", {}).get("cost"), cfg.train.epochs)
    summary["cost"]["search"]["flops_precision"] = search["cost"].get("flops_precision", "fp32")
    _save_summary(summary, run_dir)
    return summary


def dense_only(cfg: Config, run_dir: Path, data: DataBundle | None = None) -> dict:
    """`ebtrain train`: the dense network for the full schedule, its result as summary.json."""
    device = resolve_device(cfg.train.device)
    data = data or load_data(cfg.data, seed=cfg.train.seed)
    result = train_dense(cfg, run_dir, data, device)
    summary = {**_summary_head(cfg, device), "baseline": result}
    _save_summary(summary, run_dir)
    return summary
