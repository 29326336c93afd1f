"""EB-Train as plain functions: search for Early-Bird tickets, prune and retrain each, summarize.

    summary = eb_train(cfg, run_dir)      # the whole job (`ebtrain search`), resumable
    summary = dense_job(cfg, run_dir)     # `ebtrain train`: the dense network alone

The phases: `search.run_search` (search/, tickets/), `retrain_ticket` (retrain/pNN/), `train_baseline`
(baseline/); rundir.py names every file. Every phase writes result.json when it finishes, so a resumed run
skips what is done and continues the phase in progress from its checkpoint.
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
from .config import Config, rounding_multiple
from .data import DataBundle, load_data
from .errors import UserError
from .flops import run_cost, search_total
from .models import build_model, count_params, save_model
from .prune import prune_channels
from .search import cost_meter, run_search, show_progress
from .tickets import load_ticket, pruned_from_ticket, ratio_name, round_ticket, ticket_name
from .train import Trainer, new_model, resolve_device, seed_everything


# ---- phases ------------------------------------------------------------------------------------
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
    multiple = rounding_multiple(cfg.search, device.type)
    ticket = round_ticket(load_ticket(ticket_path), multiple)  # the EB mask stays on disk
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
    meter = cost_meter(pruned, cfg, data, _search_flops(ticket_path))
    trainer = Trainer(pruned, data, cfg.train, device=device, out_dir=out_dir, hooks=[meter], start_epoch=start,
                      progress=show_progress(cfg), tensorboard=cfg.run.tensorboard,
                      name=f"retrain {ticket_name(ticket)} ({init})")
    trainer.resume()
    result = trainer.fit()
    trainer.monitor.close()
    result.update(cost=meter.finish(trainer))
    dense_flops = cost_meter(dense, cfg, data).cost.forward_flops_per_image
    result.update(ticket=ticket_name(ticket), flops_target=ticket.get("flops_target"),
                  flops_fraction=meter.cost.forward_flops_per_image / dense_flops)
    result.update(ratio=ticket["ratio"], eb_epoch=ticket["epoch"], init=init, precision="fp32",
                  channels_kept=sum(ticket["kept_channels"]), channels_total=sum(ticket["dense_channels"]),
                  kept_per_layer=ticket["kept_channels"], kept_back=ticket["kept_back"],
                  round_channels=multiple, channels_rounded_added=ticket["channels_rounded_added"],
                  params_dense=count_params(dense), params_pruned=count_params(pruned))
    _save_phase(result, trainer.model, out_dir, ratio=ticket["ratio"], eb_epoch=ticket["epoch"])
    return result


def train_baseline(cfg: Config, out_dir: Path, data: DataBundle, device: torch.device) -> dict:
    """The dense baseline: the same initialization as the search, no sparsity, the full schedule."""
    done = rundir.finished(out_dir)
    if done is not None:
        return done
    model = new_model(cfg, data, cfg.train.seed)  # the search's initial weights
    meter = cost_meter(model, cfg, data)
    trainer = Trainer(model, data, cfg.train, device=device, out_dir=out_dir, hooks=[meter],
                      progress=show_progress(cfg), tensorboard=cfg.run.tensorboard, name="dense")
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


def eb_train(cfg: Config, run_dir: Path, data: DataBundle | None = None, device: torch.device | None = None) -> dict:
    """The main job: search, then prune and retrain every ticket, then summary.json. `data` and `device`
    default to those the settings name."""
    device = device or resolve_device(cfg.train.device)
    data = data or load_data(cfg.data, seed=cfg.train.seed)
    summary = _summary_head(cfg, device)
    search = run_search(cfg, run_dir, data, device)
    summary["search"] = search
    summary["tickets"] = {}
    if cfg.search.retrain:
        drawn = {v.get("name", ratio_name(float(r))): v["eb_epoch"]
                 for block in ("ratios", "flops_targets") for r, v in search["detector"].get(block, {}).items()}
        for name, path in search["tickets"].items():
            eb_epoch = drawn[name]
            if cfg.search.init == "eb" and eb_epoch >= cfg.train.epochs:
                if distributed.is_main():
                    print(f"ebtrain: the ticket {name} emerged at the schedule's last epoch, so no epoch is left to "
                          "retrain it: raise --epochs or stop the search earlier (--max-search-epochs)",
                          file=sys.stderr, flush=True)
                continue
            summary["tickets"][name] = retrain_ticket(cfg, run_dir / path,
                                                      rundir.retrain_dir(run_dir, name, cfg.search.init),
                                                      data, device, cfg.search.init)
    if cfg.search.baseline:
        summary["baseline"] = train_baseline(cfg, rundir.baseline_dir(run_dir), data, device)
    summary["cost"] = run_cost(search["cost"], summary["tickets"],
                               summary.get("baseline", {}).get("cost"), cfg.train.epochs)
    summary["cost"]["search"]["flops_precision"] = search["cost"].get("flops_precision", "fp32")
    _save_summary(summary, run_dir)
    return summary


def dense_job(cfg: Config, run_dir: Path, data: DataBundle | None = None, device: torch.device | None = None) -> dict:
    """`ebtrain train`: the dense network for the full schedule, its result as summary.json. `data` and
    `device` default to those the settings name."""
    device = device or resolve_device(cfg.train.device)
    data = data or load_data(cfg.data, seed=cfg.train.seed)
    result = train_baseline(cfg, run_dir, data, device)
    summary = {**_summary_head(cfg, device), "baseline": result}
    _save_summary(summary, run_dir)
    return summary
