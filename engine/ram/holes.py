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

__all__ = ["hole_mask", "HoleMap", "block_fd", "STRIDE", "MAX_PROBES"]

#: the longest step from a page with data to the next look: steps double
#: from 1 while data goes on, so a hole shorter than the data run just before
#: it (and never longer than this) may be read like data, which is only slower
STRIDE = 32
#: lseeks per call at most; past them the rest counts as data
MAX_PROBES = 256


def hole_mask(fd: int | None, pages: np.ndarray, page_size: int) -> np.ndarray | None:
    """True for each page of ``pages`` (ascending indexes) that lies in a hole.

    None when there is nothing to gain: no descriptor, or no page found in a
    hole.  Moves the descriptor's file offset (all block I/O here is
    positional).

    Only ``SEEK_DATA`` is used.  From a page with data it returns at once;
    from a hole it walks to the next data, which the caller then need not
    read.  ``SEEK_HOLE`` from a page with data walks to the next hole, which
    in a dense file is the end of the file: measured 11 ms per call on a
    1 GiB tmpfs file, per batch.  So while data goes on, the looks step
    1, 2, 4 ... up to :data:`STRIDE` pages ahead: a dense batch of 1024
    pages costs about 36 cheap calls (5 ms per GiB), and a lone data page
    in a sparse guest costs one look after it.

    A scan that goes through a block batch by batch should use a
    :class:`HoleMap`, which does not ask twice about the same hole.
    """
    return HoleMap(fd, page_size).mask(pages)


class HoleMap:
    """:func:`hole_mask` for one file, remembering the last hole it found.

    ``SEEK_DATA`` from inside a hole walks to the hole's end, and a scan that
    asks batch by batch starts inside the same hole again and again.  On
    tmpfs a hole of pages that ``posix_fallocate`` reserved (every block the
    engine creates) is walked page by page, about 4 ms per call per GiB: a
    fresh 1 GiB guest spent 4 s of its migration in these calls, 1024 times
    the same walk.  One call's answer holds for the rest of the scan, for the
    same reason any look does (a page written after it is dirty again), but
    not beyond the pass: :meth:`forget` when a new pass begins (a bitmap sync
    on the source; a multifd SYNC in a worker, of which every pass has one).
    """

    #: a hole that runs to the end of the file
    _TO_EOF = 1 << 62

    def __init__(self, fd: int | None, page_size: int):
        self.fd = fd
        self.page_size = page_size
        self._hole = (0, 0)        # [start, stop) pages known to be a hole

    def forget(self) -> None:
        """Drop what was learned (a new pass: pages may hold data now)."""
        self._hole = (0, 0)

    def mask(self, pages: np.ndarray) -> np.ndarray | None:
        """:func:`hole_mask` of ``pages`` (ascending indexes)."""
        fd, page_size = self.fd, self.page_size
        if fd is None or len(pages) == 0:
            return None
        first, last = int(pages[0]), int(pages[-1])
        starts, stops = [], []         # hole ranges, in pages
        p, probes, step = first, 0, 1
        while p <= last and probes < MAX_PROBES:
            known_start, known_stop = self._hole
            if known_start <= p < known_stop:
                data = known_stop
            else:
                probes += 1
                try:
                    data = os.lseek(fd, p * page_size, os.SEEK_DATA) // page_size
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        return None            # not supported here: read everything
                    data = self._TO_EOF        # no data from p to the end of file
                if data > p:
                    self._hole = (p, data)
            if data > p:
                starts.append(p)
                stops.append(min(data, last + 1))
                p, step = data + 1, 1
            else:
                p += step
                step = min(2 * step, STRIDE)
        if not starts:
            return None
        idx = np.asarray(pages, dtype=np.int64)
        # The hole range that could hold each page: the last one starting at or before it.
        k = np.searchsorted(np.asarray(starts), idx, side="right") - 1
        holes = (k >= 0) & (idx < np.asarray(stops)[np.maximum(k, 0)])
        return holes if holes.any() else None


def block_fd(block) -> int | None:
    """The file descriptor behind a RAM block, or None (a stand-in without one)."""
    try:
        return block.fd
    except AttributeError:
        return None
