"""TensorBoard logging: scalars and figures of a run, in its folder. Making figures is figures.py's job;
this module imports no plotting library, so training pulls in none."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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

    def figure(self, tag: str, fig: Figure, step: int) -> None:
        """Log a matplotlib figure (made with figures.py) as an image; the figure stays open."""
        if self.writer is not None:
            self.writer.add_figure(tag, fig, step, close=False)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
