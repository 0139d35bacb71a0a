"""Where training metrics go: console lines with a progress bar, and TensorBoard event files.

The event files are written by tensorboardX, so TensorFlow is not needed. Only process 0 writes."""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

import numpy as np

__all__ = ["progress_bar", "format_duration", "quiet", "MetricWriter"]


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """A text progress bar such as ``[#######-------------]  35%``.

    Plain ASCII, so it reads the same in a terminal, a log file and a notebook."""
    fraction = min(max(done / max(total, 1), 0.0), 1.0)
    filled = int(fraction * width)  # rounded down: full only when done
    return f"[{'#' * filled}{'-' * (width - filled)}] {int(fraction * 100):3d}%"


def format_duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def quiet(line: str) -> None:
    """A console that prints nothing: that of processes other than 0."""
    del line


class MetricWriter:
    """Writes scalars and images to ``logdir`` as TensorBoard events, and console lines.

    A console line is printed per call of :meth:`log_line`. Open the events with
    ``tensorboard --logdir WORKDIR``."""

    def __init__(self, logdir: Optional[str], *, console: Callable[[str], None] = print,
                 enabled: bool = True):
        self._console = console
        self._enabled = enabled
        self._tb = None
        if enabled and logdir:
            from tensorboardX import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self._tb = SummaryWriter(logdir=logdir, flush_secs=30)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, float(value), global_step=int(step))

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """One HWC uint8 image (e.g. a sample grid)."""
        if self._tb is not None:
            image = np.asarray(image)
            if image.ndim == 2:
                image = image[..., None]
            self._tb.add_image(name, image, global_step=int(step), dataformats="HWC")

    def text(self, line: str) -> None:
        if self._enabled:
            self._console(line)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
