"""Trace points, as QEMU's ``-trace``: named events, off unless asked for.

A trace point is a call ``trace("multifd_send_sync_main", packet_num=42)``
with an event name (QEMU's, where QEMU has the same event) and a few
values.  Events go through the standard :mod:`logging` module, on the
logger ``engine.trace`` at DEBUG level, one line each::

    12345@5321.004211:migrate_set_state new=active

that is ``pid@seconds:event fields`` like QEMU's log backend, the seconds
being :func:`time.monotonic` (the clock ``perf`` stamps samples with, so a
trace lines up with a profile).

Which events: :func:`enable` with a comma-separated list of glob patterns,
as ``-trace enable=multifd_*``: the command line's ``--trace PATTERN`` and,
for a library or a child process, the ``ENGINE_TRACE`` environment
variable (:func:`enable_from_env`; children inherit it, and their lines
reach the same stderr, each written whole).  Nothing enabled costs one
dictionary lookup per call; trace points sit on per-batch and per-state
paths, never per page.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import sys
import time

__all__ = ["trace", "enable", "enable_from_env", "ENV"]

#: the environment variable that enables events in this process and its children
ENV = "ENGINE_TRACE"

_logger = logging.getLogger("engine.trace")
_logger.propagate = False


class _Patterns:
    """The enabled globs, and the answer for every event name asked so far."""

    def __init__(self) -> None:
        self.globs: tuple[str, ...] = ()
        self.cache: dict[str, bool] = {}

    def set(self, globs: tuple[str, ...]) -> None:
        self.globs = globs
        self.cache = {}

    def wants(self, event: str) -> bool:
        hit = self.cache.get(event)
        if hit is None:
            hit = self.cache[event] = any(fnmatch.fnmatchcase(event, g) for g in self.globs)
        return hit


# The enabled set is the process's, as the logging configuration is: trace
# points are called from every layer, and threading a tracer through each
# would put an argument on every function for a debugging aid.
_patterns = _Patterns()


class _Stderr(logging.Handler):
    """To whatever ``sys.stderr`` is when the line is written, one write a line
    (so lines from several processes sharing the stream never interleave)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(record.getMessage() + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _format(event: str, fields: dict) -> str:
    args = " ".join(f"{k}={v}" for k, v in fields.items())
    return f"{os.getpid()}@{time.monotonic():.6f}:{event}{' ' if args else ''}{args}"


def trace(event: str, **fields) -> None:
    """Emit ``event`` with ``fields`` if it is enabled."""
    if _patterns.globs and _patterns.wants(event):
        _logger.debug(_format(event, fields))


def enable(patterns: str | None) -> None:
    """Enable the events matching ``patterns`` (comma-separated globs; None or
    "" disables all) and send them to stderr."""
    globs = tuple(p.strip() for p in (patterns or "").split(",") if p.strip())
    _patterns.set(globs)
    if globs:
        if not any(isinstance(h, _Stderr) for h in _logger.handlers):
            _logger.addHandler(_Stderr())
        _logger.setLevel(logging.DEBUG)


def enable_from_env() -> None:
    """:func:`enable` what ``ENGINE_TRACE`` asks for (a child process, a library)."""
    value = os.environ.get(ENV)
    if value:
        enable(value)
