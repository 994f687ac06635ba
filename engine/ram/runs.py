"""Runs of adjacent pages, found with a few numpy calls.

Every mover of pages wants runs rather than pages: one ``sendmsg`` iovec, one
``pwrite``, one ``recvmsg_into`` buffer or one discard range per run of
adjacent pages costs a system call or a Python iteration per run instead of
per page.  QEMU walks its bitmaps with ``find_next_bit`` and
``find_next_zero_bit`` for the same reason; here the whole set is split at
once:

* :func:`run_bounds` - where, in an array of page indexes (in the order the
  pages travel), each run of consecutive indexes starts and ends, optionally
  also breaking where a group number changes (a run never crosses into the
  next multifd packet);
* :func:`index_runs` - the same runs as (first page, page count);
* :func:`mask_runs` - (first page, page count) of the runs of set entries of a
  per-page mask (a dirty or received bitmap).
"""
from __future__ import annotations

import numpy as np

__all__ = ["run_bounds", "index_runs", "mask_runs"]

_EMPTY = np.empty(0, dtype=np.intp)
_EMPTY.setflags(write=False)


def run_bounds(indexes: np.ndarray, groups: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(firsts, ends)``: positions in ``indexes`` where each run starts, and where it
    ends (exclusive).

    A run is a stretch of ``indexes`` in which each value is its predecessor plus
    one; ``indexes`` need not be sorted (a value lower than its predecessor starts a
    new run).  With ``groups`` (one integer per index), a run also ends where the
    group changes.
    """
    idx = np.asarray(indexes)
    n = idx.size
    if n == 0:
        return _EMPTY, _EMPTY
    # Differences in int64: an unsigned array would wrap, which is still != 1 but
    # would make the intent depend on the dtype.
    step = np.diff(idx.astype(np.int64, copy=False))
    brk = step != 1
    if groups is not None:
        brk |= np.diff(np.asarray(groups)) != 0
    breaks = np.flatnonzero(brk) + 1
    firsts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [n]))
    return firsts, ends


def index_runs(indexes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, counts)``: the first page and the length of each run of consecutive
    values in ``indexes``, in array order (see :func:`run_bounds`)."""
    idx = np.asarray(indexes)
    firsts, ends = run_bounds(idx)
    if firsts.size == 0:
        return idx[:0].astype(np.intp), _EMPTY
    return idx[firsts], ends - firsts


def mask_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, counts)`` of every run of non-zero entries of a 1-D per-page mask
    (bool, or integers such as a one-byte-per-page dirty log), ascending."""
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        m = m != 0
    edges = np.diff(m.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    return starts, np.flatnonzero(edges == -1) - starts
