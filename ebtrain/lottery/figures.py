"""How a lottery summary (lottery.json's content) is shown: the two PNG figures of a run, accuracy and
early-stopping iteration against the fraction of weights remaining, and the text table the CLI prints.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..figures import plt, save_figure

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


def save_plots(summary: dict, run_dir: Path) -> None:
    """Write lottery_accuracy.png (test accuracy at early stop and at the end) and lottery_early_stop.png."""
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
