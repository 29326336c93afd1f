"""Lottery-ticket experiments (Frankle & Carbin, 2019) as one plain function:

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
train accuracy at the end, the fraction of weights remaining per layer. The analyses: how much the
tickets of different seeds overlap (Jaccard index per layer against two random masks of the same
densities), how far the weights a ticket keeps and those it prunes moved in the dense training, and
with --eb-ticket the overlap of each round's channel ticket with the Early-Bird mask of its ratio.

All networks of a round (arms x seeds) train together as one batched model where the architecture
allows (population.py), with results equal to training them one at a time to float tolerance.

Layout of a run directory:
    config.yaml, lottery.json, lottery_accuracy.png, lottery_early_stop.png, TensorBoard events
    roundNN/  result.json (every network's measurements), state.pt (the tickets' masks and trained
              weights per seed), TensorBoard events (validation curves)
A round is done when its result.json exists; a resumed run skips done rounds and redoes the one cut off.
"""
from __future__ import annotations

import hashlib
import itertools
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint
from .config import Config, LotteryConfig
from .data import DataBundle, load_data
from .earlybird import channel_scores, draw_mask, mask_distance, prunable_bns
from .errors import UserError
from .models import build_model, count_params
from .figures import plt, save_figure
from .monitor import Monitor
from .population import Member, can_batch, train_members
from .prune import (Masks, expected_jaccard, jaccard, magnitude_masks, mask_density, prunable_weights,
                    prune_channels, random_masks)
from .report import COLUMNS
from .train import resolve_device, seed_everything

LOTTERY_FILE = "lottery.json"
RESULT_FILE = "result.json"
STATE_FILE = "state.pt"
METRICS = ("test_acc_early", "test_acc_final", "early_stop_iter", "train_acc_final", "val_loss_min", "seconds")


# ---- pruning strategies ------------------------------------------------------------------------
class WeightPruning:
    """Unstructured magnitude pruning of every conv and linear weight, layer-wise or global.

    A mask set maps each weight's state-dict key to a bool tensor of the weight's shape.
    """

    def __init__(self, model: nn.Module, cfg: LotteryConfig):
        self.kinds = prunable_weights(model)
        self.shapes = {name: model.state_dict()[name].shape for name in self.kinds}
        conv = cfg.rate if cfg.conv_rate < 0 else cfg.conv_rate
        fc = cfg.rate if cfg.fc_rate < 0 else cfg.fc_rate
        output = fc / 2 if cfg.output_rate < 0 else cfg.output_rate
        self.rates = {name: {"conv": conv, "fc": fc, "output": output}[kind] for name, kind in self.kinds.items()}
        self.global_rate = cfg.rate if cfg.global_pruning else None

    def dense(self) -> Masks:
        return {name: torch.ones(shape, dtype=torch.bool) for name, shape in self.shapes.items()}

    def density(self, round_: int) -> dict[str, float] | float:
        """Fraction of weights a round leaves: (1 - rate)^round per layer, or overall when global."""
        if self.global_rate is not None:
            return (1 - self.global_rate) ** round_
        return {name: (1 - rate) ** round_ for name, rate in self.rates.items()}

    def prune(self, state: dict[str, torch.Tensor], masks: Masks, round_: int) -> Masks:
        """The masks of `round_`, from trained weights `state` and the masks they trained under."""
        return magnitude_masks(state, masks, self.density(round_))

    def param_masks(self, masks: Masks) -> Masks:
        return masks

    def remaining(self, masks: Masks) -> dict:
        """Percent of weights kept, overall and per layer (biases are not pruned and not counted)."""
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        return {"overall": 100 * kept / total, "layers": {n: 100 * d for n, d in mask_density(masks).items()}}


class ChannelPruning:
    """Structured pruning: each round's channel mask drawn from the BatchNorm weights |gamma| with
    `earlybird.draw_mask` (one global ranking, the Early-Bird paper's masks); a pruned channel's BN weight
    and bias are held at zero, which switches the channel off (see `prune.switch_off_channels`).

    A mask set maps each prunable BN layer's name to a bool vector over its channels.
    """

    def __init__(self, model: nn.Module, cfg: LotteryConfig):
        self.template = model
        self.layers = [name for name, _ in prunable_bns(model)]
        if not self.layers:
            raise UserError(f"--structured needs BatchNorm layers to draw channel masks from; arch "
                            f"'{model.arch['name']}' has none (use unstructured pruning)")
        self.sizes = [bn.num_features for _, bn in prunable_bns(model)]
        self.rate = cfg.rate

    def dense(self) -> Masks:
        return {name: torch.ones(size, dtype=torch.bool) for name, size in zip(self.layers, self.sizes)}

    def ratio(self, round_: int) -> float:
        """Fraction of all channels a round prunes: 1 - (1 - rate)^round."""
        return 1 - (1 - self.rate) ** round_

    def prune(self, state: dict[str, torch.Tensor], masks: Masks, round_: int) -> Masks:
        # channels pruned before score -1, so the global ranking takes them first and masks stay nested
        scores = [state[f"{n}.weight"].detach().abs().float().cpu().masked_fill(~masks[n], -1.0) for n in self.layers]
        drawn = draw_mask(scores, self.ratio(round_)).per_layer()
        return {n: keep & masks[n] for n, keep in zip(self.layers, drawn)}

    def param_masks(self, masks: Masks) -> Masks:
        return {f"{n}.{p}": keep for n, keep in masks.items() for p in ("weight", "bias")}

    def remaining(self, masks: Masks) -> dict:
        """Percent of parameters the physically pruned network keeps; per layer, percent of channels."""
        pruned = prune_channels(self.template, [masks[n] for n in self.layers])
        return {"overall": 100 * count_params(pruned) / count_params(self.template),
                "layers": {n: 100 * d for n, d in mask_density(masks).items()}}


def make_pruning(model: nn.Module, cfg: LotteryConfig) -> WeightPruning | ChannelPruning:
    """The pruning strategy the settings ask for."""
    return ChannelPruning(model, cfg) if cfg.structured else WeightPruning(model, cfg)


# ---- the experiment ----------------------------------------------------------------------------
def _derived_seed(*parts: object) -> int:
    """A seed for one purpose, e.g. ('reinit', seed, round): a hash, so no two purposes share one."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") % 2 ** 32  # numpy's limit


def _new_model(cfg: Config, data: DataBundle) -> nn.Module:
    return build_model(cfg.model.arch, num_classes=data.num_classes, in_channels=data.in_channels,
                       width=cfg.model.width, image_size=data.image_size)


def initial_state(cfg: Config, data: DataBundle, seed: int) -> dict[str, torch.Tensor]:
    """The dense network's weights at initialization for `seed` (EB-Train's, for the same seed)."""
    seed_everything(seed)
    return _new_model(cfg, data).state_dict()


def arms_of(cfg: LotteryConfig) -> list[str]:
    """The arms a round trains: the ticket and the controls that are on."""
    return ["ticket"] + [arm for arm, on in (("reinit", cfg.reinit), ("random-prune", cfg.random_prune)) if on]


def check_config(cfg: Config, data: DataBundle) -> None:
    """Check the lottery settings against each other and the data; raises UserError naming the bad one."""
    L = cfg.lottery
    checks = [
        (1 <= L.eval_every <= L.iterations, f"--eval-every {L.eval_every}: must lie in 1..--iterations"),
        (0 <= L.rewind_iter < L.iterations, f"--rewind-iter {L.rewind_iter}: must lie in 0..--iterations - 1"),
        (data.val is not None, "the lottery experiment stops early on a validation split: set --val-size N"),
        (not (L.structured and L.global_pruning), "--global-pruning is for weights; --structured channel masks "
                                                  "are drawn globally already"),
        (not L.eb_ticket or L.structured, "--eb-ticket compares channel masks: it needs --structured"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    template = _new_model(cfg, data)
    make_pruning(template, L)
    if L.eb_ticket:
        _load_eb_ticket(L.eb_ticket, template)


def run_lottery(cfg: Config, run_dir: Path, data: DataBundle | None = None) -> dict:
    """The whole experiment: every round, then the analyses; writes and returns lottery.json's content."""
    device = resolve_device(cfg.train.device)
    data = data or load_data(cfg.data, seed=cfg.train.seed)
    check_config(cfg, data)
    L = cfg.lottery
    seeds = [cfg.train.seed + i for i in range(L.seeds)]
    pruning = make_pruning(_new_model(cfg, data), L)
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
            summary = summarize(cfg, pruning, results, device)
            _save_plots(summary, run_dir)
    monitor.close()
    summary = summarize(cfg, pruning, results, device)
    summary.update(_analyses(cfg, data, pruning, seeds, run_dir))
    checkpoint.atomic_write_json(summary, run_dir / LOTTERY_FILE)
    _save_plots(summary, run_dir)
    return summary


def _round_name(r: int) -> str:
    return f"round{r:02d}"


def _load_state(run_dir: Path, r: int) -> dict:
    return checkpoint.load(run_dir / _round_name(r) / STATE_FILE)


def _members(cfg: Config, data: DataBundle, pruning: WeightPruning | ChannelPruning, seeds: list[int],
             r: int, run_dir: Path) -> tuple[list[Member], dict[int, Masks]]:
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
                fresh = initial_state(cfg, data, _derived_seed("reinit", s, r))
                members.append(Member(s, arm, fresh, pruning.param_masks(masks)))
            else:
                generator = torch.Generator().manual_seed(_derived_seed("random-prune", s, r))
                members.append(Member(s, arm, start, pruning.param_masks(random_masks(masks, generator))))
    return members, tickets


def _run_round(cfg: Config, data: DataBundle, device: torch.device, pruning: WeightPruning | ChannelPruning,
               seeds: list[int], r: int, run_dir: Path) -> None:
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
        lambda: _new_model(cfg, data), members, data, cfg.train, device, L.iterations, L.eval_every, L.batched,
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
              "seconds": time.perf_counter() - started, "batched": L.batched and can_batch(_new_model(cfg, data)),
              "records": records}
    checkpoint.atomic_write_json(result, out / RESULT_FILE)
    for arm, runs in _by_arm(records).items():
        print(f"round {r} {arm}: test {100 * np.mean([x['test_acc_early'] for x in runs]):.2f}% at early stop "
              f"(iteration {np.mean([x['early_stop_iter'] for x in runs]):.0f}), "
              f"{100 * np.mean([x['test_acc_final'] for x in runs]):.2f}% at the end", file=sys.stderr, flush=True)


def _log_curves(out: Path, records: list[dict], tensorboard: bool) -> None:
    """Validation curves of the round, mean over seeds per arm, as TensorBoard scalars in the round's folder."""
    if not tensorboard:
        return
    monitor = Monitor(out)
    for arm, runs in _by_arm(records).items():
        curves = np.array([rec["val_curve"] for rec in runs])  # [seeds, evals, (iteration, loss, accuracy)]
        for it, loss, acc in zip(curves[0, :, 0], curves[:, :, 1].mean(0), curves[:, :, 2].mean(0)):
            monitor.scalars(int(it), {f"{arm}/val_loss": float(loss), f"{arm}/val_acc": float(acc)})
    monitor.close()


def _log_round(monitor: Monitor, result: dict) -> None:
    values = {"remaining_percent": result["remaining"]}
    for arm, runs in _by_arm(result["records"]).items():
        values.update({f"{arm}/{m}": float(np.mean([rec[m] for rec in runs])) for m in METRICS})
    monitor.scalars(result["round"], values)
    monitor.flush()


def _by_arm(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by arm, the arms in the order they first appear."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["arm"], []).append(record)
    return groups


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "min": float(np.min(values)),
            "max": float(np.max(values))}


def summarize(cfg: Config, pruning: WeightPruning | ChannelPruning, results: list[dict], device: torch.device) -> dict:
    """lottery.json without the analyses: settings, and per round and arm each metric's mean, std, min
    and max over the seeds."""
    L = cfg.lottery
    rounds = []
    for result in results:
        arms = {arm: {m: _stats([rec[m] for rec in runs]) for m in METRICS}
                for arm, runs in _by_arm(result["records"]).items()}
        rounds.append({"round": result["round"], "remaining": result["remaining"], "layers": result["layers"],
                       "seconds": result["seconds"], "arms": arms})
    return {"kind": "lottery", "arch": cfg.model.arch, "dataset": cfg.data.dataset, "data_dir": cfg.data.data_dir,
            "width": cfg.model.width,
            "device": str(device), "seeds": [cfg.train.seed + i for i in range(L.seeds)],
            "iterations": L.iterations, "eval_every": L.eval_every, "optimizer": cfg.train.optimizer,
            "lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "structured": L.structured,
            "one_shot": L.one_shot, "global_pruning": L.global_pruning, "rewind_iter": L.rewind_iter,
            "rates": getattr(pruning, "rates", {"channels": L.rate}), "arms": arms_of(L),
            "batched": all(r["batched"] for r in results), "seconds": sum(r["seconds"] for r in results),
            "rounds": rounds}


# ---- analyses ----------------------------------------------------------------------------------
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


def _load_eb_ticket(path: str, template: nn.Module) -> dict:
    """An EB-Train ticket file, checked to be of this run's network."""
    from .tickets import load_ticket  # the EB-Train ticket format; imported here, only --eb-ticket needs it
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


def _analyses(cfg: Config, data: DataBundle, pruning: WeightPruning | ChannelPruning, seeds: list[int],
              run_dir: Path) -> dict:
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
        out["weight_movement"].append({"round": r, **_mean_nested(per_seed)})
    if L.eb_ticket:
        ticket = _load_eb_ticket(L.eb_ticket, _new_model(cfg, data))
        out["eb_overlap"] = {"ticket": L.eb_ticket, "ratio": ticket["ratio"], "epoch": ticket["epoch"],
                             "rounds": eb_overlap(ticket, pruning, {r: states[r]["masks"][seeds[0]]
                                                                    for r in range(1, L.rounds + 1)})}
    return out


def _mean_nested(items: list[dict]) -> dict:
    """Elementwise mean of dicts of equal structure (None where any value is None)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _mean_nested([item[k] for item in items]) for k in first}
    return None if any(v is None for v in items) else float(np.mean(items))


# ---- plots and tables --------------------------------------------------------------------------
ARM_LABELS = {"ticket": "winning ticket", "reinit": "random reinit", "random-prune": "random pruning"}


def _series(summary: dict, arm: str, metric: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """x (percent remaining), mean, min, max of one arm's metric; round 0 (dense) starts every arm."""
    points = [(rnd["remaining"], rnd["arms"][arm if rnd["round"] else "ticket"][metric]) for rnd in summary["rounds"]
              if arm in rnd["arms"] or rnd["round"] == 0]
    return ([x for x, _ in points], [s["mean"] for _, s in points], [s["min"] for _, s in points],
            [s["max"] for _, s in points])


def lottery_figure(summary: dict, metrics: dict[str, str], scale: float = 1.0) -> plt.Figure:
    """One panel per metric (key -> y label): mean over seeds against percent of weights remaining, one
    line per arm, error bars from the minimum to the maximum over seeds (as in the paper)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), squeeze=False)
    remaining = [rnd["remaining"] for rnd in summary["rounds"]]
    for ax, (metric, label) in zip(axes[0], metrics.items()):
        for arm in summary["arms"]:
            x, mean, lo, hi = (np.array(v) for v in _series(summary, arm, metric))
            ax.errorbar(x, scale * mean, yerr=[scale * (mean - lo), scale * (hi - mean)], marker="o", ms=3,
                        capsize=2, label=ARM_LABELS[arm])
        ax.set_xscale("log")
        ax.set_xlim(max(remaining) * 1.15, min(remaining) / 1.15)  # pruning proceeds to the right
        ticks = remaining[::-(-len(remaining) // 8)]  # at most 8 labels
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("percent of weights remaining")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    seeds = len(summary["seeds"])
    data = Path(summary["data_dir"]).name if summary["dataset"] == "imagefolder" else summary["dataset"]
    fig.suptitle(f"{summary['arch']} on {data}: {'one-shot' if summary['one_shot'] else 'iterative'} "
                 f"pruning, {seeds} seed{'s' * (seeds > 1)}, {summary['iterations']} iterations")
    fig.tight_layout()
    return fig


def _save_plots(summary: dict, run_dir: Path) -> None:
    save_figure(lottery_figure(summary, {"test_acc_early": "test accuracy at early stop (%)",
                                         "test_acc_final": "test accuracy at the end (%)"}, 100),
                run_dir / "lottery_accuracy.png")
    save_figure(lottery_figure(summary, {"early_stop_iter": "early-stopping iteration"}),
                run_dir / "lottery_early_stop.png")


def format_table(summary: dict) -> str:
    """Rounds x arms: percent remaining, test accuracy at early stop and at the end, early-stopping
    iteration, each as mean ± std over the seeds."""
    lines = [f"{'round':>5s} {'remain%':>8s} {'arm':>12s} {'acc@early%':>14s} {'acc@end%':>14s} {'early-stop it':>15s}"]
    for rnd in summary["rounds"]:
        for arm, m in rnd["arms"].items():
            name = "dense" if rnd["round"] == 0 else arm
            acc, end, it = m["test_acc_early"], m["test_acc_final"], m["early_stop_iter"]
            lines.append(f"{rnd['round']:5d} {rnd['remaining']:8.2f} {name:>12s} "
                         f"{100 * acc['mean']:7.2f} ± {100 * acc['std']:4.2f} {100 * end['mean']:7.2f} ± "
                         f"{100 * end['std']:4.2f} {it['mean']:8.0f} ± {it['std']:4.0f}")
    return "\n".join(lines) + "\n"


def lottery_rows(run_dir: str | Path) -> list[dict]:
    """Rows for `ebtrain report` from a lottery run, one per round and arm, in the report's columns:
    ratio is the fraction of weights pruned, final_acc and best_acc the test accuracy at the end and at
    early stopping, seconds the arm's share of the round's training time (means and sums over seeds)."""
    summary = checkpoint.load_json(Path(run_dir) / LOTTERY_FILE)
    rows = []
    for rnd in summary["rounds"]:
        for arm, m in rnd["arms"].items():
            row = dict.fromkeys(COLUMNS)
            row.update(run=Path(run_dir).resolve().name, method="dense" if rnd["round"] == 0 else f"IMP {arm}",
                       ratio=round(1 - rnd["remaining"] / 100, 4), final_acc=round(100 * m["test_acc_final"]["mean"], 2),
                       best_acc=round(100 * m["test_acc_early"]["mean"], 2),
                       seconds=round(m["seconds"]["mean"] * len(summary["seeds"]), 1))
            rows.append(row)
    return rows
