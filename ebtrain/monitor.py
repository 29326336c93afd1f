"""TensorBoard scalars and images, and the PNG figures saved in a run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


class Monitor:
    """Writes TensorBoard events into `log_dir`; with `log_dir=None` every call does nothing."""

    def __init__(self, log_dir: Path | None):
        self.log_dir = log_dir
        self._writer = None

    @property
    def writer(self):
        # created lazily so that runs which never log leave no empty event file behind
        if self._writer is None and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.log_dir))
        return self._writer

    def purge_from(self, step: int) -> None:
        """After a resume: drop events at or after `step` that the killed run wrote past its checkpoint."""
        if self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.close()
            self._writer = SummaryWriter(str(self.log_dir), purge_step=step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def figure(self, tag: str, fig: plt.Figure, step: int) -> None:
        if self.writer is not None:
            self.writer.add_figure(tag, fig, step, close=False)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def distance_matrix_figure(matrix: torch.Tensor, epochs: Sequence[int], ratio: float,
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
        ax.set_title(f"p = {ratio:g}: EB ticket at epoch {eb_epoch}")
    else:
        ax.set_title(f"p = {ratio:g}: no ticket yet")
    ax.set_xlabel("epoch")
    ax.set_ylabel("epoch")
    fig.tight_layout()
    return fig


def kept_channels_figure(names: Sequence[str], dense: Sequence[int], kept: dict[float, Sequence[int]]) -> plt.Figure:
    """Channels per prunable layer: the dense network and each ticket."""
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(names)), 3.5))
    ax.plot(range(len(dense)), dense, "k-", label="dense")
    for ratio, counts in kept.items():
        ax.plot(range(len(counts)), counts, marker=".", label=f"p = {ratio:g}")
    ax.set_xlabel("prunable layer")
    ax.set_ylabel("channels")
    ax.legend()
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save as PNG (written to a temporary name and renamed) and close."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)
