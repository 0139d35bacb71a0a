"""The run's work directory: checked before use, and held by one training run at a time.

A training run takes an exclusive OS file lock (``flock``) on ``WORKDIR/.lock`` for as long as it
runs. The operating system drops the lock when the process ends, however it ends (``kill -9``
included), so a stale lock never blocks a restart. A second run on a busy workdir stops at once
with an error naming the holder. Generation and evaluation only read checkpoints and take no lock.
On several hosts, process 0 holds the lock for the run.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import tempfile
from typing import Optional

from diffusion_jax.checkpoint_failures import OS_PROBLEMS

__all__ = ["WorkdirError", "check", "Lock"]

LOCK_FILE = ".lock"
# Modes that read a trained run (and so need one there) and modes that write into the workdir.
READING_MODES = ("sample", "eval")


class WorkdirError(RuntimeError):
    """The work directory is unusable or busy; the message says why and what to do."""


def check(workdir: str, mode: str = "train") -> str:
    """Check that ``workdir`` can serve ``mode``; return its absolute path.

    Training modes create it if needed and check that a file can be written there (a read-only
    file system or missing permissions are reported now, not at the first checkpoint). Modes
    that read a run (sample, eval) need it to exist with checkpoints in it; they create nothing.
    """
    if not workdir or not workdir.strip():
        raise WorkdirError("--workdir is empty; give the directory of the run (it is created "
                           "for training)")
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir={workdir} is a file, not a directory; give a directory "
                           "(it is created for training)")
    if mode in READING_MODES:
        if not os.path.isdir(os.path.join(path, "checkpoints")):
            raise WorkdirError(f"no trained run in {path} (no checkpoints/ folder); train first "
                               f"with `python main.py --config=... --workdir={workdir}`")
        return path
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_") as probe:
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise WorkdirError(f"cannot write to --workdir={workdir} ({_reason(err)}); choose a "
                           "directory this user can write to, on a writable file system") from err
    return path


def _reason(err: OSError) -> str:
    if err.errno == errno.ENOTDIR:
        return "a part of the path is a file"
    return OS_PROBLEMS.get(err.errno, err.strerror or str(err))


class Lock:
    """An exclusive lock on a workdir for one training run (a context manager).

    ``Lock(workdir)`` does nothing until entered; ``enabled=False`` (processes other than 0) makes
    it a no-op. On entry it raises :class:`WorkdirError` naming the holder (pid, host, start
    time) when another run holds the workdir.
    """

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self.enabled = enabled
        self._fd: Optional[int] = None

    def __enter__(self):
        if not self.enabled:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise WorkdirError(f"cannot lock {self.path} ({_reason(err)})") from err
            raise WorkdirError(
                f"{os.path.dirname(self.path)} is in use by another training run ({holder}); "
                "wait for it to finish or stop it, or give this run another --workdir") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    """Who holds the lock, as the lock file says (written by the holder when it took it)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return (f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
