"""Pages of a RAM block's file that hold no data: zero, known without reading them.

Guest memory lives in a file (a tmpfs or memfd segment, or a ``--mem-path``
file), and wherever nothing was ever written the file has a hole.  Finding
zero pages by reading them is the wrong way round for holes: a read through
a shared mapping makes tmpfs allocate a page for each one (it maps no shared
zero page there), so scanning an idle 8 GiB guest made all 8 GiB resident on
the source and took 15 s.  ``lseek(SEEK_DATA / SEEK_HOLE)`` asks the page
cache instead.  (QEMU's anonymous RAM gets the same effect from the kernel's
zero page; a file-backed QEMU guest on tmpfs does not.)

The answer may only err towards "data": a page reported as a hole is zero
(or was, an instant ago: a write after the look dirties the page, and it is
sent again, exactly as for a page read and then rewritten).  Whatever the
file system does not tell, or a range too fragmented to be worth the system
calls, counts as data and is read as before.
"""
from __future__ import annotations

import errno
import os

import numpy as np

__all__ = ["hole_mask", "block_fd", "MAX_EXTENTS"]

#: data extents looked up per call at most; past them the rest counts as data
#: (two lseeks per extent: a finely fragmented file is cheaper to just read)
MAX_EXTENTS = 64


def hole_mask(fd: int | None, pages: np.ndarray, page_size: int) -> np.ndarray | None:
    """True for each page of ``pages`` (ascending indexes) that lies in a hole.

    None when there is nothing to gain: no descriptor, or no page in a hole.
    Moves the descriptor's file offset (all block I/O here is positional).
    """
    if fd is None or len(pages) == 0:
        return None
    start = int(pages[0]) * page_size
    end = (int(pages[-1]) + 1) * page_size
    firsts, ends = [], []          # data extents, in pages, clipped to the span
    pos = start
    covered = end                  # up to where the extents were looked up
    while pos < end:
        if len(firsts) == MAX_EXTENTS:
            covered = pos
            break
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:      # no data from pos to the end of file
                break
            return None                        # not supported here: read everything
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        firsts.append(data // page_size)
        ends.append(-(-min(hole, end) // page_size))
        pos = hole
    idx = np.asarray(pages, dtype=np.int64)
    if firsts:
        # The extent that could hold each page: the first one ending after it.
        k = np.searchsorted(np.asarray(ends), idx, side="right")
        in_data = (k < len(firsts)) & (np.asarray(firsts + [0])[k] <= idx)
    else:
        in_data = np.zeros(len(idx), dtype=bool)
    holes = ~in_data & (idx * page_size < covered)
    return holes if holes.any() else None


def block_fd(block) -> int | None:
    """The file descriptor behind a RAM block, or None (a stand-in without one)."""
    try:
        return block.fd
    except AttributeError:
        return None
