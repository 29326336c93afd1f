"""The PNG figures of a run: the mask-distance matrix, channels kept per layer, accuracy against FLOPs.

Figures are files, never windows: importing this module sets matplotlib's file-only backend, so import
it (not matplotlib.pyplot) wherever a figure is made; it exports `plt` for that.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["acc_vs_flops_figure", "distance_matrix_figure", "kept_channels_figure", "plt", "save_figure"]


def distance_matrix_figure(matrix: torch.Tensor, epochs: Sequence[int], ratio: float | str,
                           eb_epoch: int | None) -> plt.Figure:
    """The paper's figure: pairwise mask distances between epochs, the EB epoch marked."""
    fig, ax = plt.subplots(figsize=(5, 4.3))
    lo, hi = epochs[0], epochs[-1]
    im = ax.imshow(matrix.numpy(), cmap="viridis_r", vmin=0, vmax=max(float(matrix.max()), 1e-6),
                   extent=(lo - 0.5, hi + 0.5, hi + 0.5, lo - 0.5))
    fig.colorbar(im, ax=ax, label="mask distance")
    if eb_epoch is not None:
        ax.axvline(eb_epoch, color="red", lw=1)
        ax.axhline(eb_epoch, color="red", lw=1)
        ax.set_title(f"{_label(ratio)}: EB ticket at epoch {eb_epoch}")
    else:
        ax.set_title(f"{_label(ratio)}: no ticket yet")
    ax.set_xlabel("epoch")
    ax.set_ylabel("epoch")
    fig.tight_layout()
    return fig


def kept_channels_figure(names: Sequence[str], dense: Sequence[int], kept: dict[float | str, Sequence[int]]) -> plt.Figure:
    """Channels per prunable layer: the dense network and each ticket."""
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(names)), 3.5))
    ax.plot(range(len(dense)), dense, "k-", label="dense")
    for ratio, counts in kept.items():
        ax.plot(range(len(counts)), counts, marker=".", label=_label(ratio))
    ax.set_xlabel("prunable layer")
    ax.set_ylabel("channels")
    ax.legend()
    fig.tight_layout()
    return fig


def acc_vs_flops_figure(curves: Sequence[tuple[str, Sequence[float], Sequence[float]]], unit: str,
                        scale: float) -> plt.Figure:
    """Test accuracy against cumulative training FLOPs (shown in `unit`, FLOPs / `scale`), one line per
    (label, FLOPs, accuracies) curve."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, flops, accs in curves:
        ax.plot([f / scale for f in flops], [100 * a for a in accs], marker=".", label=label)
    ax.set_xlabel(f"cumulative training {unit} (measured forward + backward)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def drawing_epochs_figure(panels: Sequence[dict]) -> plt.Figure:
    """Test accuracy after retraining against the epoch each ticket was drawn at, one panel per run (e.g.
    one per learning-rate schedule): a line per ratio, the detector's Early-Bird ticket as a star on its
    ratio's colour, the dense network's accuracy as a dashed line. A panel is what
    `report.drawing_epochs_panel` returns."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        for i, (ratio, points) in enumerate(sorted(panel["lines"].items())):
            color = f"C{i}"
            ax.plot(*zip(*points), "o-", color=color, label=f"p = {ratio:g}")
            if ratio in panel["eb"]:
                ax.plot(*panel["eb"][ratio], "*", color=color, markersize=14, markeredgecolor="black",
                        label=f"p = {ratio:g}: Early-Bird ticket")
        if panel["dense"] is not None:
            ax.axhline(panel["dense"], color="gray", linestyle="--", label="dense")
        ax.set(title=panel["title"], xlabel="epoch the ticket was drawn at")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test accuracy after retraining (%)")
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save as PNG (written to a temporary name and renamed) and close."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


def _label(key: float | str) -> str:
    """A ratio as 'p = 0.3'; a FLOPs target's ticket by its name ('f50')."""
    return key if isinstance(key, str) else f"p = {key:g}"
