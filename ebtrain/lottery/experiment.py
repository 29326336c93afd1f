"""The lottery-ticket experiment (Frankle & Carbin, 2019) as one plain function:

    summary = run_lottery(cfg, run_dir)      # resumable; writes RUN/lottery.json and the plots

Round 0 trains the dense network of every seed. Each later round prunes (magnitude of the previous
round's trained ticket, or of the dense network with --one-shot), resets the kept weights to their
initial values (or to iteration K of the dense run with --rewind-iter), and trains three arms for the
same number of iterations: the ticket, `reinit` (the ticket's mask, fresh random weights) and
`random-prune` (a random mask with the ticket's per-layer sparsity, the ticket's starting weights).
Masks hold through training: a pruned weight is zero, its gradient is zeroed before every optimizer
step, so it gets no update, momentum or weight decay. With --structured the masks are channel masks
drawn from the BatchNorm weights (the Early-Bird masks) instead, for comparison with an EB ticket.

Every network is measured the same way: validation loss every --eval-every iterations, the iteration
of its minimum (the early-stopping iteration) and the test accuracy of the weights then, test and
train accuracy at the end, the fraction of weights remaining per layer. After the last round come the
analyses (analyses.py): the overlap of the tickets of different seeds, the movement of kept and pruned
weights in the dense training, and with --eb-ticket the overlap of each round's channel ticket with
the Early-Bird mask of its ratio.

All networks of a round (arms x seeds) train together as one batched model where the architecture
allows (population.py), with results equal to training them one at a time to float tolerance.

Layout of a run directory:
    config.yaml, lottery.json, lottery_accuracy.png, lottery_early_stop.png, TensorBoard events
    roundNN/  result.json (every network's measurements), state.pt (the tickets' masks and trained
              weights per seed), TensorBoard events (validation curves)
A round is done when its result.json exists; a resumed run skips done rounds and redoes the one cut off.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint
from ..config import Config, LotteryConfig
from ..data import DataBundle, derived_seed, load_data
from ..errors import UserError
from ..monitor import Monitor
from ..rundir import LOTTERY_FILE
from ..train import new_model, resolve_device
from .analyses import (METRICS, by_arm, eb_overlap, load_eb_ticket, mask_overlap, mean_nested, round_statistics,
                       weight_movement)
from .figures import save_plots
from .masks import Masks, random_masks
from .population import Member, can_batch, train_members
from .pruning import Pruning, make_pruning

RESULT_FILE = "result.json"
STATE_FILE = "state.pt"


def seeds_of(cfg: Config) -> list[int]:
    """The seeds of the run's independent repetitions: train.seed, train.seed + 1, ..."""
    return [cfg.train.seed + i for i in range(cfg.lottery.seeds)]


def arms_of(cfg: LotteryConfig) -> list[str]:
    """The arms a round trains: the ticket and the controls that are on."""
    return ["ticket"] + [arm for arm, on in (("reinit", cfg.reinit), ("random-prune", cfg.random_prune)) if on]


def initial_state(cfg: Config, data: DataBundle, seed: int) -> dict[str, torch.Tensor]:
    """The dense network's weights at initialization for `seed` (EB-Train's, for the same seed)."""
    return new_model(cfg, data, seed).state_dict()


def check_config(cfg: Config, data: DataBundle) -> None:
    """Check the lottery settings against each other and the data; raises UserError naming the bad one."""
    L = cfg.lottery
    checks = [
        (1 <= L.eval_every <= L.iterations, f"--eval-every {L.eval_every}: must lie in 1..--iterations"),
        (0 <= L.rewind_iter < L.iterations, f"--rewind-iter {L.rewind_iter}: must lie in 0..--iterations - 1"),
        (data.val is not None, "the lottery experiment stops early on a validation split: set --val-size N"),
        (data.loader == "memory", "the lottery experiment trains from data held in memory: --loader memory"),
        (not (L.structured and L.global_pruning), "--global-pruning is for weights; --structured channel masks "
                                                  "are drawn globally already"),
        (not L.eb_ticket or L.structured, "--eb-ticket compares channel masks: it needs --structured"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    template = new_model(cfg, data)
    make_pruning(template, L)
    if L.eb_ticket:
        load_eb_ticket(L.eb_ticket, template)


def run_lottery(cfg: Config, run_dir: Path, data: DataBundle | None = None,
                device: torch.device | None = None) -> dict:
    """The whole experiment: every round, then the analyses; writes and returns lottery.json's content.
    `data` and `device` default to those the settings name."""
    device = device or resolve_device(cfg.train.device)
    data = data or load_data(cfg.data, seed=cfg.train.seed)
    check_config(cfg, data)
    L = cfg.lottery
    seeds = seeds_of(cfg)
    pruning = make_pruning(new_model(cfg, data), L)
    monitor = Monitor(run_dir if cfg.run.tensorboard else None)
    done = next((r for r in range(L.rounds + 1) if not (run_dir / _round_name(r) / RESULT_FILE).exists()),
                L.rounds + 1)
    if done:
        monitor.purge_from(done - 1)  # drop round summaries a killed run wrote past its last finished round
    results = []
    for r in range(L.rounds + 1):
        if r >= done:
            _run_round(cfg, data, device, pruning, seeds, r, run_dir)
        result = checkpoint.load_json(run_dir / _round_name(r) / RESULT_FILE)
        results.append(result)
        if r >= done:
            _log_round(monitor, result)
            save_plots(summarize(cfg, pruning, results, device), run_dir)
    monitor.close()
    summary = summarize(cfg, pruning, results, device)
    summary.update(_analyses(cfg, data, pruning, seeds, run_dir))
    checkpoint.atomic_write_json(summary, run_dir / LOTTERY_FILE)
    save_plots(summary, run_dir)
    return summary


def _round_name(r: int) -> str:
    return f"round{r:02d}"


def _load_state(run_dir: Path, r: int) -> dict:
    return checkpoint.load(run_dir / _round_name(r) / STATE_FILE)


def _members(cfg: Config, data: DataBundle, pruning: Pruning, seeds: list[int], r: int,
             run_dir: Path) -> tuple[list[Member], dict[int, Masks]]:
    """Round r's networks and the tickets' masks per seed. Round 0: the dense network of every seed."""
    L = cfg.lottery
    if r == 0:
        masks = pruning.dense()
        return [Member(s, "ticket", initial_state(cfg, data, s), pruning.param_masks(masks)) for s in seeds], \
            {s: masks for s in seeds}
    dense = _load_state(run_dir, 0)
    source = dense if L.one_shot else _load_state(run_dir, r - 1)
    members, tickets = [], {}
    for s in seeds:
        masks = pruning.prune(source["final"][s], source["masks"][s], r)
        start = dense["rewind"][s] if L.rewind_iter else initial_state(cfg, data, s)
        tickets[s] = masks
        for arm in arms_of(L):
            if arm == "ticket":
                members.append(Member(s, arm, start, pruning.param_masks(masks)))
            elif arm == "reinit":
                fresh = initial_state(cfg, data, derived_seed("reinit", s, r, bits=32))
                members.append(Member(s, arm, fresh, pruning.param_masks(masks)))
            else:
                generator = torch.Generator().manual_seed(derived_seed("random-prune", s, r, bits=32))
                members.append(Member(s, arm, start, pruning.param_masks(random_masks(masks, generator))))
    return members, tickets


def _run_round(cfg: Config, data: DataBundle, device: torch.device, pruning: Pruning, seeds: list[int], r: int,
               run_dir: Path) -> None:
    """Train round r's networks and write its state.pt and then result.json (which marks it done)."""
    L = cfg.lottery
    out = run_dir / _round_name(r)
    if out.exists():
        shutil.rmtree(out)  # a round cut off by a kill starts again from its beginning
    members, tickets = _members(cfg, data, pruning, seeds, r, run_dir)
    remaining = {s: pruning.remaining(masks) for s, masks in tickets.items()}
    print(f"round {r}/{L.rounds}: {remaining[seeds[0]]['overall']:.2f}% of the weights remain; training "
          f"{len(members)} networks for {L.iterations} iterations", file=sys.stderr, flush=True)
    started = time.perf_counter()
    records, finals, rewinds = train_members(
        lambda: new_model(cfg, data), members, data, cfg.train, device, L.iterations, L.eval_every, L.batched,
        snapshot_at=L.rewind_iter if r == 0 else 0, name=f"round {r}")
    tickets_at = [i for i, m in enumerate(members) if m.arm == "ticket"]
    state = {"masks": tickets, "final": {members[i].seed: finals[i] for i in tickets_at}}
    if r == 0 and L.rewind_iter:
        state["rewind"] = {members[i].seed: rewinds[i] for i in tickets_at}
    checkpoint.atomic_save(state, out / STATE_FILE)
    for record in records:
        record["remaining"] = remaining[record["seed"]]["overall"]
    _log_curves(out, records, cfg.run.tensorboard)
    result = {"round": r, "remaining": float(np.mean([v["overall"] for v in remaining.values()])),
              "layers": {n: float(np.mean([v["layers"][n] for v in remaining.values()]))
                         for n in remaining[seeds[0]]["layers"]},
              "seconds": time.perf_counter() - started, "batched": L.batched and can_batch(new_model(cfg, data)),
              "records": records}
    checkpoint.atomic_write_json(result, out / RESULT_FILE)
    for arm, runs in by_arm(records).items():
        print(f"round {r} {arm}: test {100 * np.mean([x['test_acc_early'] for x in runs]):.2f}% at early stop "
              f"(iteration {np.mean([x['early_stop_iter'] for x in runs]):.0f}), "
              f"{100 * np.mean([x['test_acc_final'] for x in runs]):.2f}% at the end", file=sys.stderr, flush=True)


def _log_curves(out: Path, records: list[dict], tensorboard: bool) -> None:
    """Validation curves of the round, mean over seeds per arm, as TensorBoard scalars in the round's folder."""
    if not tensorboard:
        return
    monitor = Monitor(out)
    for arm, runs in by_arm(records).items():
        curves = np.array([rec["val_curve"] for rec in runs])  # [seeds, evals, (iteration, loss, accuracy)]
        for it, loss, acc in zip(curves[0, :, 0], curves[:, :, 1].mean(0), curves[:, :, 2].mean(0)):
            monitor.scalars(int(it), {f"{arm}/val_loss": float(loss), f"{arm}/val_acc": float(acc)})
    monitor.close()


def _log_round(monitor: Monitor, result: dict) -> None:
    values = {"remaining_percent": result["remaining"]}
    for arm, runs in by_arm(result["records"]).items():
        values.update({f"{arm}/{m}": float(np.mean([rec[m] for rec in runs])) for m in METRICS})
    monitor.scalars(result["round"], values)
    monitor.flush()


def summarize(cfg: Config, pruning: Pruning, results: list[dict], device: torch.device) -> dict:
    """lottery.json without the analyses: the settings, and per round and arm each metric's mean, std,
    min and max over the seeds."""
    L = cfg.lottery
    return {"kind": "lottery", "arch": cfg.model.arch, "dataset": cfg.data.dataset, "data_dir": cfg.data.data_dir,
            "width": cfg.model.width,
            "device": str(device), "seeds": seeds_of(cfg),
            "iterations": L.iterations, "eval_every": L.eval_every, "optimizer": cfg.train.optimizer,
            "lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "structured": L.structured,
            "one_shot": L.one_shot, "global_pruning": L.global_pruning, "rewind_iter": L.rewind_iter,
            "rates": getattr(pruning, "rates", {"channels": L.rate}), "arms": arms_of(L),
            "batched": all(r["batched"] for r in results), "seconds": sum(r["seconds"] for r in results),
            "rounds": [round_statistics(result) for result in results]}


def _analyses(cfg: Config, data: DataBundle, pruning: Pruning, seeds: list[int], run_dir: Path) -> dict:
    """Mask overlap across seeds, weight movement in the dense run, and the Early-Bird comparison."""
    L = cfg.lottery
    states = {r: _load_state(run_dir, r) for r in range(L.rounds + 1)}
    initial = {s: initial_state(cfg, data, s) for s in seeds}
    out: dict = {"weight_movement": []}
    if len(seeds) > 1:
        out["mask_overlap"] = [{"round": r, **mask_overlap(states[r]["masks"])}
                               for r in range(1, L.rounds + 1)]
    for r in range(1, L.rounds + 1):
        per_seed = [weight_movement(initial[s], states[0]["final"][s], pruning.param_masks(states[r]["masks"][s]))
                    for s in seeds]
        out["weight_movement"].append({"round": r, **mean_nested(per_seed)})
    if L.eb_ticket:
        ticket = load_eb_ticket(L.eb_ticket, new_model(cfg, data))
        out["eb_overlap"] = {"ticket": L.eb_ticket, "ratio": ticket["ratio"], "epoch": ticket["epoch"],
                             "rounds": eb_overlap(ticket, pruning, {r: states[r]["masks"][seeds[0]]
                                                                    for r in range(1, L.rounds + 1)})}
    return out
