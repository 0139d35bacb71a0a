"""What keeps the training loop answerable: stop signals, and a bound on steps run ahead.

JAX dispatches steps asynchronously: the Python loop returns from a step call at once and, left
alone, runs ahead of the device until something reads a result (a log line), queueing one batch
per step. :class:`DispatchWindow` keeps it at most a couple of step calls ahead, so that a
signal's checkpoint is saved a step after it arrives rather than after every queued step (on a
scheduler's short grace period, that is the difference between a saved run and a killed one),
and queued batches do not pile up in device memory.
"""

from __future__ import annotations

import collections
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["StopSignals", "DispatchWindow"]


class DispatchWindow:
    """Blocks until the step call ``ahead`` calls back has finished, each time one is dispatched.

    ``dispatched(output)`` takes any (small) array the new call returns; a copy of it, which no
    later call takes as a donated input, marks when that call is done."""

    def __init__(self, ahead: int = 2):
        if ahead < 1:
            raise ValueError(f"ahead must be at least 1, got {ahead}")
        self.ahead = ahead
        self._marks = collections.deque()

    def dispatched(self, output) -> None:
        """Note a step call just dispatched (``output``: one of its results); wait if far ahead."""
        self._marks.append(jnp.copy(output))
        while len(self._marks) > self.ahead:
            _wait(self._marks.popleft())


def _wait(mark) -> None:
    jax.block_until_ready(mark)


class StopSignals:
    """SIGTERM and SIGINT ask the loop to save a checkpoint and stop (a context manager).

    With several processes they must agree (a save is collective), so they compare their flags
    at log boundaries, where all are at the same step.
    """

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        del frame
        if self.signal is None:
            self.signal = signum
            return
        # A second signal: stop now, as the signal would without this handler. A checkpoint being
        # written is not committed, and the earlier ones stay as they are.
        print(f"received signal {signum} again: exiting without waiting for the save in progress",
              file=sys.stderr, flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def requested(self, at_log_boundary: bool) -> bool:
        """Whether to save and stop now."""
        if jax.process_count() == 1:
            return self.signal is not None
        if not at_log_boundary:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
        return bool(np.any(flags))

    def reason(self) -> str:
        """Why the run stopped, for the last console line."""
        return (f"received signal {self.signal}" if self.signal is not None
                else "another process received a signal")
