"""How a checkpoint failure is told: short reasons, disk problems by errno, quiet Orbax logs.

Orbax and TensorStore report failures with multi-kilobyte specs, asyncio noise and tracebacks
logged long after the fact; these helpers reduce each to a few words for the one-paragraph
:class:`diffusion_jax.checkpoints.CheckpointError`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
from typing import Optional

__all__ = ["reason", "OS_PROBLEMS", "os_problem", "size_text", "OneLineOrbaxErrors",
           "ORBAX_FILTER", "install_quiet_unraisable_hook"]


# Messages of errors that say nothing about what went wrong (an asyncio loop torn down while the
# real error propagated), skipped when describing a failure.
_NOISE = re.compile(r"event loop is closed|cannot schedule new futures", re.IGNORECASE)
_GENERIC = (Exception, ValueError, RuntimeError)


def _clean(text: str) -> str:
    """The first line of an error message, without embedded TensorStore specs or JSON."""
    text = re.split(r"See full TensorStore details", text, maxsplit=1)[0]
    previous = None
    while previous != text:  # innermost braces first, so nested JSON goes entirely
        previous, text = text, re.sub(r"\{[^{}]*\}", "", text)
    text = re.sub(r"<bound method [^>]*>", "", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].rstrip(" .;:,") if lines else ""


def reason(err: BaseException, limit: int = 200) -> str:
    """A few words on what failed: the innermost informative message of ``err``'s causes."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__
    for cause in reversed(chain):
        text = _clean(str(cause))
        if not text or _NOISE.search(text):
            continue
        if isinstance(cause, json.JSONDecodeError):
            text = f"a metadata file is not valid JSON ({text})"
        elif type(cause) not in _GENERIC and not isinstance(cause, OSError):
            text = f"{type(cause).__name__}: {text}"
        return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."
    return type(chain[0]).__name__


OS_PROBLEMS = {
    errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
}


def os_problem(err: BaseException) -> Optional[int]:
    """The errno of a full disk or a missing permission behind ``err``, if that is the cause.

    TensorStore reports these as text, so messages are matched as well as ``OSError.errno``."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in OS_PROBLEMS:
            return err.errno
        text = str(err).lower()
        for code in OS_PROBLEMS:
            if os.strerror(code).lower() in text:
                return code
        err = err.__cause__ or err.__context__
    return None


def size_text(num_bytes: float) -> str:
    """``num_bytes`` for a person: ``"1.5 GB"``."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(num_bytes) < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"  # pragma: no cover - the loop returns


class OneLineOrbaxErrors(logging.Filter):
    """Drops the tracebacks Orbax logs when a save fails, keeping one short line each.

    The failure reaches the caller as a :class:`CheckpointError` (with the original error as
    its cause), so the logged traceback, hundreds of lines after the progress output, only
    buries it. Installed on the absl logger while a :class:`Checkpoints` is open.
    """

    users = 0
    max_chars = 300

    def filter(self, record):
        if f"{os.sep}orbax{os.sep}" not in (record.pathname or ""):
            return True
        record.exc_info, record.exc_text = None, None
        if record.levelno >= logging.ERROR:
            # TensorStore errors quote their whole spec (kilobytes of JSON) in the line.
            text = re.sub(r"\s*\[tensorstore_spec='.*?'\]", "", record.getMessage(),
                          flags=re.DOTALL)
            if len(text) > self.max_chars:
                text = text[:self.max_chars - 3] + "..."
            record.msg, record.args = text, None
        return True


ORBAX_FILTER = OneLineOrbaxErrors()


def _is_read_leftover(unraisable) -> bool:
    """Whether an unraisable exception is debris of a failed Orbax restore.

    When one array of a restore fails, Orbax closes its event loop with the reads of the other
    arrays still pending: their completions then fail with "Event loop is closed", and their
    coroutines, once collected, with a copy of the whole TensorStore spec. Python prints each
    as a traceback, dozens of lines that say nothing the :class:`CheckpointError` does not.
    """
    exc, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    return ((isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed")
            or getattr(code, "co_name", "") == "_read_array_index_and_device_put")


def install_quiet_unraisable_hook() -> None:
    """Route unraisable exceptions through a filter of :func:`_is_read_leftover` (once).

    It stays installed: the debris arrives from TensorStore's threads at any time after the
    failure, possibly after the manager is closed. Everything else goes to the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_diffusion_jax_quiet", False):
        return

    def hook(unraisable):
        if not _is_read_leftover(unraisable):
            previous(unraisable)

    hook._diffusion_jax_quiet = True
    sys.unraisablehook = hook
