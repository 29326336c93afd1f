"""Tables and a plot across runs: one row per method and ratio, as text, markdown, CSV or JSON.

Rows come from a run's summary.json plus every retrain found on disk (RUN/retrain/*/result.json), so a
ticket retrained later with `ebtrain retrain --init reinit` gets its row too; a lottery run's rows come
from its lottery.json (`lottery_rows`). Columns:

    run            the run directory's name
    method         dense (the baseline), EB-Train (from the EB weights), EB re-init, EB rewind (to the
                   initialization; 'EB rewind (epoch 5)' to epoch 5 of the search); '(drawn)': drawn at a
                   fixed epoch (--draw-epochs)
    ticket         the ticket's name: p30 for channel ratio 0.3, f50 for FLOPs target 0.5
    ratio          the fraction of prunable channels the ticket prunes (a ratio ticket: its ratio)
    eb_epoch       the epoch at which the ticket emerged
    channels       prunable channels kept / in the dense network
    channels_fraction  the fraction of prunable channels kept
    flops_fraction the trained network's forward FLOPs per image over the dense network's
    params         parameters of the trained network
    final_acc      test accuracy after the last epoch, in %; best_acc the best epoch's
    search_epochs  epochs of the dense search; train_epochs epochs of this row's own training
    train_flops    training FLOPs the method spent: the baseline's full schedule, or for a ticket the
                   whole search plus its retrain (measured forward + backward, see flops.py); text and
                   markdown show it in one unit for the table (train_GFLOPs, train_PFLOPs, ...),
                   CSV and JSON as a plain count
    savings        dense baseline FLOPs / this row's FLOPs; savings_paper the same with training
                   counted as 3 x forward, the paper's convention
    seconds        wall-clock training seconds (search plus retrain for a ticket)
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

from . import checkpoint, rundir
from .earlybird import jaccard, mask_distance
from .errors import UserError
from .config import resolve_milestones
from .figures import acc_vs_flops_figure, drawing_epochs_figure, save_figure
from .flops import baseline_cost, ticket_cost
from .rundir import LOTTERY_FILE, SUMMARY_FILE
from .tickets import load_ticket, ratio_name

COLUMNS = ("run", "method", "ticket", "ratio", "eb_epoch", "channels", "channels_fraction", "flops_fraction",
           "params", "final_acc", "best_acc",
           "search_epochs", "train_epochs", "train_flops", "savings", "savings_paper", "seconds",
           "train_flops_alone", "savings_alone", "savings_alone_paper", "seconds_alone")
FORMATS = ("text", "markdown", "csv", "json")
METHODS = {"eb": "EB-Train", "reinit": "EB re-init", "rewind": "EB rewind"}
FLOP_UNITS = (("PFLOPs", 1e15), ("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6))


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 2)


def _row(run: str, method: str, result: dict, **fields) -> dict:
    """A row with the columns every method has filled from a phase's `result`, the rest from `fields`."""
    row = dict.fromkeys(COLUMNS)
    row.update(run=run, method=method, final_acc=_pct(result["final_test_acc"]),
               best_acc=_pct(result["best_test_acc"]), train_epochs=result["epochs_trained"],
               seconds=round(result["seconds"], 1))
    row.update(fields)
    return row


def _costs(flops: dict | None) -> dict:
    """The cost columns of a row from a `ticket_cost`-like dict (empty when the run recorded none)."""
    if flops is None:
        return {}
    shared = {"train_flops": flops["flops"], "savings": round(flops["savings"], 3),
              "savings_paper": round(flops["savings_paper"], 3)}
    alone = flops.get("alone")
    if alone is None:
        return shared
    return {**shared, "train_flops_alone": alone["flops"], "savings_alone": round(alone["savings"], 3),
            "savings_alone_paper": round(alone["savings_paper"], 3), "seconds_alone": round(alone["seconds"], 1)}


def method_label(retrain: dict) -> str:
    """The method of a retrain's result: 'EB-Train', 'EB re-init', 'EB rewind (epoch 5)', 'EB re-init (seed 7)'
    (a seed given with --reinit-seed; the derived one is not shown); '(drawn)' marks a ticket drawn at a fixed
    epoch (--draw-epochs)."""
    label = METHODS.get(retrain["init"], f"EB {retrain['init']}") + (" (drawn)" if retrain.get("drawn") else "")
    if retrain.get("rewind_epoch"):
        return f"{label} (epoch {retrain['rewind_epoch']})"
    if retrain.get("reinit_seed_derived") is False:
        return f"{label} (seed {retrain['reinit_seed']})"
    return label


def summary_rows(summary: dict, run: str = "", retrains: Iterable[dict] = ()) -> list[dict]:
    """Rows of one run: the dense baseline (if trained), then every retrained ticket of the summary and
    of `retrains` (results of retrain phases; one per method and ratio), EB-Train first, by ratio."""
    search = summary.get("search", {})
    search_cost = search.get("cost")
    trained = summary.get("baseline")
    dense_cost = trained.get("cost") if trained else None
    dense = baseline_cost(search_cost, dense_cost, summary["epochs"]) if search_cost or dense_cost else None
    rows = []
    if trained is not None:
        full = dense and {"flops": dense["flops"], "savings": 1.0, "savings_paper": 1.0}
        rows.append(_row(run, "dense", trained, params=trained.get("params"), **_costs(full)))
    # a row per method and ticket; a ticket drawn at a fixed epoch (--draw-epochs) beside the detector's
    tickets = {(t["init"] != "eb", method_label(t), t.get("ticket", ratio_name(t["ratio"])),
                t["eb_epoch"] if t.get("drawn") else -1): t
               for t in [*summary.get("tickets", {}).values(), *retrains]}
    for (_, method, name, _), t in sorted(tickets.items(), key=lambda item: (
            item[0][:2], item[0][2][0] != "p", item[1]["ratio"], item[0][3])):
        spent = ticket_cost(search_cost, t, dense) if search_cost and "cost" in t else None
        flops = t.get("flops_fraction")
        row = _row(run, method, t, ticket=name, ratio=round(t["ratio"], 4),
                   eb_epoch=t["eb_epoch"], channels=f"{t['channels_kept']}/{t['channels_total']}",
                   channels_fraction=round(t["channels_kept"] / t["channels_total"], 4),
                   flops_fraction=None if flops is None else round(flops, 4), params=t["params_pruned"],
                   search_epochs=search.get("epochs_trained"),
                   seconds=round(search.get("seconds", 0.0) + t["seconds"], 1), **_costs(spent))
        rows.append(row)
    return rows


def drawing_epochs_panel(summary: dict, title: str = "") -> dict:
    """What the drawing-epoch figure shows of one EB-Train run (`figures.drawing_epochs_figure`): per
    ratio, the final test accuracy (%) of the tickets drawn at fixed epochs and retrained from their
    weights, by drawing epoch; the detector's ticket (EB epoch, accuracy); the dense baseline's accuracy."""
    lines, eb = {}, {}
    for t in summary.get("tickets", {}).values():
        if t["init"] == "eb" and t.get("drawn"):
            lines.setdefault(t["ratio"], []).append((t["eb_epoch"], 100 * t["final_test_acc"]))
        elif t["init"] == "eb":
            eb[t["ratio"]] = (t["eb_epoch"], 100 * t["final_test_acc"])
    dense = summary.get("baseline", {}).get("final_test_acc")
    return {"title": title, "lines": {r: sorted(points) for r, points in lines.items()}, "eb": eb,
            "dense": None if dense is None else 100 * dense}


def plot_drawing_epochs(run_dirs: Sequence[str | Path], path: str | Path) -> None:
    """The drawing-epoch figure of runs side by side, each panel titled by its run and learning-rate schedule."""
    panels = []
    for run in map(Path, run_dirs):
        summary, cfg = read_summary(run), rundir.saved_config(run)
        panel = drawing_epochs_panel(summary, f"{run.resolve().name}: lr {cfg.train.lr:g}, x{cfg.train.gamma:g} at "
                                              f"epochs {resolve_milestones(cfg.train.milestones, cfg.train.epochs)}")
        if not panel["lines"]:
            raise UserError(f"'{run}' has no retrained tickets drawn at fixed epochs: run it with --draw-epochs")
        panels.append(panel)
    save_figure(drawing_epochs_figure(panels), Path(path))


def lottery_rows(run_dir: str | Path) -> list[dict]:
    """Rows of a lottery run (its lottery.json), one per round and arm: ratio is the fraction of weights
    pruned, final_acc and best_acc the test accuracy at the end and at early stopping, seconds the arm's
    share of the round's training time (means and sums over seeds)."""
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


def run_rows(run_dir: str | Path) -> list[dict]:
    """Rows of a run directory: its summary.json plus every retrain result on disk, or a lottery run's."""
    run_dir = Path(run_dir)
    if (run_dir / LOTTERY_FILE).is_file():
        return lottery_rows(run_dir)
    retrains = [checkpoint.load_json(d / rundir.RESULT_FILE) for d in rundir.retrain_dirs(run_dir)
                if (d / rundir.RESULT_FILE).is_file()]
    return summary_rows(read_summary(run_dir), run_dir.resolve().name, retrains)


def flop_unit(flops: float) -> tuple[str, float]:
    """The largest of PFLOPs .. MFLOPs in which `flops` is at least 1 (MFLOPs below that)."""
    return next(((name, scale) for name, scale in FLOP_UNITS if flops >= scale), FLOP_UNITS[-1])


def _cell(column: str, value, scale: float) -> str:
    if value is None:
        return ""
    if column in ("train_flops", "train_flops_alone"):
        return f"{value / scale:.2f}"
    if column.startswith("savings"):
        return f"{value:.2f}x"
    if column in ("final_acc", "best_acc"):
        return f"{value:.2f}"
    if column == "ratio":
        return f"{value:g}"
    return str(value)


def format_rows(rows: list[dict], fmt: str = "text") -> str:
    """Render rows in one of FORMATS: CSV and JSON as plain values (FLOPs as a count), text and
    markdown for reading (FLOPs in one unit for the whole table, named in the header)."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    if fmt not in FORMATS:
        raise UserError(f"report format '{fmt}' is not known: choose from {', '.join(FORMATS)}")
    unit, scale = flop_unit(max((r["train_flops"] or 0 for r in rows), default=0))
    header = [c.replace("flops", unit) if c.startswith("train_flops") else c for c in COLUMNS]
    cells = [header] + [[_cell(c, r[c], scale) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    if fmt == "markdown":
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines) + "\n"
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells) + "\n"


def read_summary(run_dir: str | Path) -> dict:
    """The summary.json of a finished run; a folder without one raises UserError."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise UserError(f"'{run_dir}' holds no {SUMMARY_FILE}: is it a finished ebtrain run?")
    return checkpoint.load_json(path)


# ---- tickets of two runs side by side ---------------------------------------------------------------
AGREEMENT_COLUMNS = ("ratio", "eb_epoch_a", "eb_epoch_b", "channels", "agree", "jaccard", "layers_agree")


def ticket_agreement_rows(run_a: str | Path, run_b: str | Path) -> list[dict]:
    """How far the tickets of two searches of the same network agree, one row per ratio both drew.

    agree: percent of all prunable channels on which the masks make the same choice (1 - normalized
    Hamming distance); jaccard: percent of the channels kept by either that both keep; layers_agree:
    the agree figure per layer. Used to compare, for instance, a bfp8 search with a full-precision one.
    """
    tickets = [rundir.ticket_files(Path(run)) for run in (run_a, run_b)]
    rows = []
    for name in sorted(tickets[0].keys() & tickets[1].keys()):
        a, b = load_ticket(tickets[0][name]), load_ticket(tickets[1][name])
        if a["dense_channels"] != b["dense_channels"]:
            raise UserError(f"tickets {tickets[0][name]} and {tickets[1][name]} are of differently shaped "
                            f"networks ({a['dense_channels']} vs {b['dense_channels']} channels per layer)")
        ka, kb = torch.cat(a["keep"]), torch.cat(b["keep"])
        rows.append({"ratio": a["ratio"], "eb_epoch_a": a["epoch"], "eb_epoch_b": b["epoch"],
                     "channels": int(ka.numel()),
                     "agree": round(100 * (1 - mask_distance(ka, kb)), 2),
                     "jaccard": round(100 * jaccard(ka, kb), 2),
                     "layers_agree": [round(100 * (1 - mask_distance(la, lb)), 1)
                                      for la, lb in zip(a["keep"], b["keep"])]})
    if not rows:
        raise UserError(f"'{run_a}' and '{run_b}' have no ticket ratio in common (their tickets/ folders)")
    return rows


def format_agreement(rows: list[dict], run_a: str | Path, run_b: str | Path) -> str:
    """A text table of `ticket_agreement_rows`, naming which run is a and which b."""
    lines = [f"a = {run_a}", f"b = {run_b}",
             f"{'ratio':>5}  {'EB epoch a':>10}  {'EB epoch b':>10}  {'agree %':>7}  {'jaccard %':>9}  per layer agree %"]
    for r in rows:
        lines.append(f"{r['ratio']:>5g}  {r['eb_epoch_a']:>10}  {r['eb_epoch_b']:>10}  {r['agree']:>7.2f}  "
                     f"{r['jaccard']:>9.2f}  {' '.join(f'{x:g}' for x in r['layers_agree'])}")
    return "\n".join(lines) + "\n"


# ---- accuracy against training FLOPs -----------------------------------------------------------------
def acc_vs_flops(run_dir: str | Path) -> list[tuple[str, list[float], list[float]]]:
    """(phase label, cumulative training FLOPs, test accuracy) per epoch of every phase of a run.

    A retrain's FLOPs start at its search's total, so the curves of one run join up."""
    curves = []
    for label, folder in rundir.phases(Path(run_dir)):
        lines = (folder / rundir.METRICS_FILE).read_text().splitlines()
        epochs = [m for m in map(json.loads, filter(None, lines)) if "cumulative_flops" in m]
        if epochs:
            curves.append((label, [m["cumulative_flops"] for m in epochs], [m["test_acc"] for m in epochs]))
    return curves


def plot_acc_vs_flops(run_dirs: Sequence[str | Path], path: str | Path) -> None:
    """A PNG of test accuracy against cumulative training FLOPs, one line per phase of every run."""
    curves = [(f"{Path(run).resolve().name}: {label}", flops, accs)
              for run in run_dirs for label, flops, accs in acc_vs_flops(run)]
    if not curves:
        raise UserError("no run holds per-epoch FLOPs (metrics.jsonl with cumulative_flops) to plot")
    unit, scale = flop_unit(max(max(flops) for _, flops, _ in curves))
    save_figure(acc_vs_flops_figure(curves, unit, scale), Path(path))
