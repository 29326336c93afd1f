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
from .config import Config, load_yaml, rounding_multiple
from .data import DataBundle, derived_seed, load_data
from .errors import UserError
from .figures import drawing_epochs_figure, save_figure
from .channel_flops import forward_flops
from .flops import run_cost, search_total
from .models import build_model, count_params, save_model
from .prune import prune_channels
from .report import drawing_epochs_panel
from .search import cost_meter, run_search, show_progress
from .tickets import load_ticket, pruned_from_ticket, ratio_name, round_ticket, ticket_name
from .train import Trainer, new_model, resolve_device, seed_everything


# ---- phases ------------------------------------------------------------------------------------
def reinit_seed(cfg: Config) -> int:
    """The seed of `--init reinit`'s fresh weights: --reinit-seed, or with -1 one derived from --seed by the
    lottery's rule for its reinit control (a hash of 'reinit' and the seed), so it is not the seed of the
    dense initialization the ticket came from."""
    return cfg.search.reinit_seed if cfg.search.reinit_seed >= 0 else derived_seed("reinit", cfg.train.seed, bits=32)


def _rewind_weights(run_dir: Path, epoch: int, eb_epoch: int) -> dict:
    """The dense weights the search saved after `epoch` (RUN/init.pt for 0); UserError saying why when it has
    none for that epoch."""
    if epoch > eb_epoch:
        raise UserError(f"--rewind-epoch {epoch}: the ticket emerged at epoch {eb_epoch}, and rewinding goes back "
                        f"along the search to at most that epoch (at {eb_epoch} it starts where --init eb does)")
    path = rundir.rewind_file(run_dir, epoch)
    if path.exists():
        return checkpoint.load(path)
    config = run_dir / rundir.CONFIG_FILE  # read here, on rank 0 (rundir.saved_config would broadcast)
    saved = load_yaml(config).search.rewind_epoch if config.is_file() else None
    why = (f"the search ran with --rewind-epoch {saved}, so it saved the weights of epoch {saved} and of the "
           "initialization (--rewind-epoch 0) only" if saved not in (None, epoch) else
           "the search has not written them: it has not reached that epoch, or the file was removed")
    raise UserError(f"--init rewind --rewind-epoch {epoch} needs '{path}': {why}; search again with "
                    f"--rewind-epoch {epoch} to rewind there")


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


def retrain_start(cfg: Config, ticket: dict, ticket_path: Path, init: str) -> tuple[nn.Module, int, dict]:
    """Where a retrain of `ticket` (as `round_ticket` left it) starts: the pruned network, the global epoch it
    has reached (training goes on from the next), and what the result records of the init's own setting.

    init: 'eb' the EB weights at the EB epoch; 'reinit' fresh random weights (seed `reinit_seed(cfg)`) at
    epoch 0; 'rewind' the kept weights of the search after epoch k = cfg.search.rewind_epoch (0: the
    initialization, RUN/init.pt) at epoch k, so the learning rate continues the schedule from there.
    """
    dense, pruned = pruned_from_ticket(ticket)
    if init == "reinit":
        seed = reinit_seed(cfg)
        seed_everything(seed)
        fresh = build_model(**pruned.arch)
        # fresh weights; PreResNet's channel-selection masks are structure, not weights: keep them
        fresh.load_state_dict({k: v for k, v in pruned.state_dict().items() if k.endswith("mask")}, strict=False)
        return fresh, 0, {"reinit_seed": seed, "reinit_seed_derived": cfg.search.reinit_seed < 0}
    if init == "rewind":
        k = cfg.search.rewind_epoch
        dense.load_state_dict(distributed.from_main(_rewind_weights, rundir.run_of_ticket(ticket_path), k,
                                                    ticket["epoch"]))
        return prune_channels(dense, ticket["keep"]), k, {"rewind_epoch": k}
    return pruned, ticket["epoch"], {}


def retrain_ticket(cfg: Config, ticket_path: Path, out_dir: Path, data: DataBundle, device: torch.device,
                   init: str = "eb") -> dict:
    """Train the pruned network of a ticket through the rest of the schedule, with a fresh optimizer, from
    where `retrain_start` puts `init`: 'eb' (EB weights, epochs EB+1 to the end), 'reinit' (fresh weights,
    the full schedule), 'rewind' (the search's kept weights of --rewind-epoch k, epochs k+1 to the end)."""
    done = rundir.finished(out_dir)
    if done is not None:
        return done
    multiple = rounding_multiple(cfg.search, device.type)
    ticket = round_ticket(load_ticket(ticket_path), multiple)  # the EB mask stays on disk
    pruned, start, setting = retrain_start(cfg, ticket, ticket_path, init)
    if start >= cfg.train.epochs:
        raise UserError(f"the retrain ({init}) starts after epoch {start}, at or past the schedule's "
                        f"{cfg.train.epochs} epochs: nothing is left to retrain")
    meter = cost_meter(pruned, cfg, data, _search_flops(ticket_path))
    trainer = Trainer(pruned, data, cfg.train, device=device, out_dir=out_dir, hooks=[meter], start_epoch=start,
                      progress=show_progress(cfg), tensorboard=cfg.run.tensorboard,
                      name=f"retrain {ticket_name(ticket)} ({init})")
    trainer.resume()
    result = trainer.fit()
    trainer.monitor.close()
    result.update(cost=meter.finish(trainer))
    dense = build_model(**ticket["arch"]).to("meta")  # shapes only: its forward FLOPs and parameter count
    dense_flops, _ = forward_flops(dense, data.input_shape)
    result.update(ticket=ticket_name(ticket), flops_target=ticket.get("flops_target"),
                  flops_fraction=meter.cost.forward_flops_per_image / dense_flops)
    result.update(ratio=ticket["ratio"], eb_epoch=ticket["epoch"], init=init, **setting, precision="fp32",
                  drawn=ticket.get("drawn", False),
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
    if device.type == "cpu":  # so do CPU results: another thread count adds up the products in another order
        head["threads"] = torch.get_num_threads()
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
            if cfg.search.init == "rewind" and cfg.search.rewind_epoch > eb_epoch:
                if distributed.is_main():
                    print(f"ebtrain: the ticket {name} emerged at epoch {eb_epoch}, before --rewind-epoch "
                          f"{cfg.search.rewind_epoch}: rewinding goes back to at most a ticket's EB epoch, so it is "
                          "not retrained", file=sys.stderr, flush=True)
                continue
            out = rundir.retrain_dir(run_dir, name, cfg.search.init, cfg.search.rewind_epoch, cfg.search.reinit_seed)
            summary["tickets"][name] = retrain_ticket(cfg, run_dir / path, out, data, device, cfg.search.init)
        summary["tickets"].update(_retrain_drawn(cfg, run_dir, search, data, device))
    if cfg.search.baseline:
        summary["baseline"] = train_baseline(cfg, rundir.baseline_dir(run_dir), data, device)
    if search.get("drawn_tickets") and cfg.search.retrain and distributed.is_main():
        save_figure(drawing_epochs_figure([drawing_epochs_panel(summary)]), rundir.drawing_epochs_figure(run_dir))
    summary["cost"] = run_cost(search["cost"], summary["tickets"],
                               summary.get("baseline", {}).get("cost"), cfg.train.epochs)
    summary["cost"]["search"]["flops_precision"] = search["cost"].get("flops_precision", "fp32")
    _save_summary(summary, run_dir)
    return summary


def _retrain_drawn(cfg: Config, run_dir: Path, search: dict, data: DataBundle, device: torch.device) -> dict:
    """Retrain the tickets drawn at fixed epochs (--draw-epochs), each from the weights of its epoch."""
    results = {}
    for epoch in sorted(int(e) for e in cfg.search.draw_epochs):
        for ratio in cfg.search.ratios:
            name = rundir.drawn_ticket_name(ratio, epoch)
            if name in search.get("drawn_tickets", {}):
                results[name] = retrain_ticket(cfg, rundir.drawn_ticket_file(run_dir, ratio, epoch),
                                               rundir.retrain_dir(run_dir, ratio, cfg.search.init,
                                                                  cfg.search.rewind_epoch, cfg.search.reinit_seed,
                                                                  drawn_at=epoch),
                                               data, device, cfg.search.init)
    return results


def dense_job(cfg: Config, run_dir: Path, data: DataBundle | None = None, device: torch.device | None = None) -> dict:
    """`ebtrain train`: the dense network for the full schedule, its result as summary.json. `data` and
    `device` default to those the settings name."""
    device = device or resolve_device(cfg.train.device)
    data = data or load_data(cfg.data, seed=cfg.train.seed)
    result = train_baseline(cfg, run_dir, data, device)
    summary = {**_summary_head(cfg, device), "baseline": result}
    _save_summary(summary, run_dir)
    return summary
