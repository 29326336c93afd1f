"""Tables from run summaries: one row per method and ratio, as text, markdown, CSV or JSON."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from . import checkpoint
from .errors import UserError
from .rundir import SUMMARY_FILE

COLUMNS = ("run", "method", "ratio", "eb_epoch", "channels", "params", "final_acc", "best_acc",
           "search_epochs", "train_epochs", "seconds")
FORMATS = ("text", "markdown", "csv", "json")


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def summary_rows(summary: dict, run: str = "") -> list[dict]:
    """Rows of one run's summary.json: the dense baseline (if trained) and every retrained ticket."""
    rows = []
    search = summary.get("search", {})
    if "baseline" in summary:
        b = summary["baseline"]
        rows.append({"run": run, "method": "dense", "ratio": "", "eb_epoch": "", "channels": "",
                     "params": b.get("params", ""), "final_acc": _pct(b["final_test_acc"]),
                     "best_acc": _pct(b["best_test_acc"]), "search_epochs": "",
                     "train_epochs": b["epochs_trained"], "seconds": round(b["seconds"], 1)})
    for t in summary.get("tickets", {}).values():
        method = "EB-Train" if t["init"] == "eb" else f"EB {t['init']}"
        rows.append({"run": run, "method": method, "ratio": t["ratio"], "eb_epoch": t["eb_epoch"],
                     "channels": f"{t['channels_kept']}/{t['channels_total']}",
                     "params": t["params_pruned"], "final_acc": _pct(t["final_test_acc"]),
                     "best_acc": _pct(t["best_test_acc"]), "search_epochs": search.get("epochs_trained", ""),
                     "train_epochs": t["epochs_trained"],
                     "seconds": round(search.get("seconds", 0.0) + t["seconds"], 1)})
    return rows


def format_rows(rows: list[dict], fmt: str = "text") -> str:
    """Render rows in one of FORMATS."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    cells = [list(COLUMNS)] + [[str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    if fmt == "markdown":
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines) + "\n"
    if fmt != "text":
        raise UserError(f"report format '{fmt}' is not known: choose from {', '.join(FORMATS)}")
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells) + "\n"


def read_summary(run_dir: str | Path) -> dict:
    """The summary.json of a finished run; a folder without one raises UserError."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise UserError(f"'{run_dir}' holds no {SUMMARY_FILE}: is it a finished ebtrain run?")
    return checkpoint.load_json(path)
