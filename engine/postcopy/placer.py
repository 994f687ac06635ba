"""Atomic placement of arriving pages on a postcopy destination.

While vCPUs run before all of RAM has arrived, a page must never be seen
half written, and a page must arrive exactly once: the coordinator (pages
on the main channel) and the fault handler (urgent pages on the preempt
channel) may both receive the same page, and whichever comes second must
not overwrite memory a vCPU may already have changed.

Three ways to get there, chosen by what the :class:`Placer` is given:

* **userfaultfd** (``uffd`` and ``bases``): the page is copied into a
  private staging page and installed with ``UFFDIO_COPY`` into a vCPU's
  registered mapping.  The kernel inserts it into the shared file's page
  cache in one step or reports EEXIST, so the first placement wins in every
  process mapping the block, and the vCPU blocked on it wakes.
* **software** (``lock``): vCPUs check the shared "received" bitmap before
  touching memory.  Under a lock shared with the fault handler the page is
  written, and only then its bit set (vCPUs read the bit, then the page).
* **neither**: nobody runs yet (before LISTEN, or a guest without vCPUs); a
  plain write, then the bit.

In every mode a received bit is set only once the page is in place, so a
set bit is a safe fast path that skips the page.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np

from engine.errors import PostcopyError
from engine.uffd import Userfaultfd, buffer_address, punch_hole
from engine.ram.seams import MappedBlock

__all__ = ["Placer"]


class Placer:
    """Places pages of *blocks* and keeps *received* up to date.

    ``received[i]`` is block *i*'s shared one-byte-per-page bitmap
    (``DirtyLog.log``).  In userfaultfd mode ``bases[i]`` is the address of
    block *i* in the address space of *uffd*'s creator (a vCPU).  Page
    numbers are in units of each block's ``page_size``.
    """

    def __init__(self, blocks: Sequence[MappedBlock], received: list[np.ndarray], *, lock=None,
                 uffd: Userfaultfd | None = None, bases: tuple[int, ...] | None = None):
        if len(received) != len(blocks):
            raise PostcopyError(
                f"placer: {len(blocks)} blocks but {len(received)} received bitmaps")
        for b, r in zip(blocks, received):
            if len(r) < b.npages:
                raise PostcopyError(
                    f"placer: received bitmap of block {b.idstr!r} has {len(r)} entries, "
                    f"the block {b.npages} pages")
        if uffd is not None:
            if bases is None or len(bases) != len(blocks):
                raise PostcopyError(
                    f"placer: userfaultfd mode needs one base address per block "
                    f"({len(blocks)}), got {bases!r}")
        self.blocks = list(blocks)
        self.received = list(received)
        self.uffd = uffd
        self.bases = tuple(bases) if uffd is not None and bases is not None else None
        self.lock = lock if uffd is None else None
        self._guard = self.lock if self.lock is not None else contextlib.nullcontext()
        self._page_sizes = [b.page_size for b in blocks]
        self._bufs = [b.buf for b in blocks]
        self._u64 = [b.pages.view(np.uint64) for b in blocks]
        # Memory nobody wrote is zero (a fresh segment, or a punched hole
        # whose received bit discard() cleared): a zero page need not touch it.
        self._fresh = [bool(b.fresh) for b in blocks]
        if uffd is not None:
            # UFFDIO_COPY reads its source from our address space: one private
            # page, reused for every placement.
            self._stage = np.zeros(max(self._page_sizes, default=1), dtype=np.uint8)
            self._stage_mv = self._stage.data
            self._stage_addr = buffer_address(self._stage)

    @property
    def mode(self) -> str:
        """``"userfaultfd"``, ``"software"`` or ``"plain"``."""
        if self.uffd is not None:
            return "userfaultfd"
        return "software" if self.lock is not None else "plain"

    def place(self, block: int, page: int, data) -> bool:
        """Put *data* (one page: bytes, memoryview or uint8 array) at *page* of
        *block*.  Returns True if this call placed it, False if the page was
        already there (received, or installed by someone else first)."""
        received = self.received[block]
        if received[page]:
            return False
        ps = self._page_sizes[block]
        if self.uffd is not None:
            _fill(self._stage_mv[:ps], data, ps)
            # bases is set whenever uffd is; no second test per page
            placed = self.uffd.copy(self.bases[block] + page * ps,  # type: ignore[index]
                                    self._stage_addr, ps)
            # EEXIST also means "in place": the other placer got there first.
            received[page] = 1
            return placed
        with self._guard:
            if received[page]:
                return False
            off = page * ps
            _fill(self._bufs[block][off:off + ps], data, ps)
            received[page] = 1
        return True

    def place_zero(self, block: int, page: int) -> bool:
        """Make *page* of *block* a zero page (RAM_SAVE_FLAG_ZERO).  Returns
        True if this call placed it.  Memory known to be zero is not written
        (no page gets allocated for it)."""
        received = self.received[block]
        if received[page]:
            return False
        if self.uffd is not None:
            ps = self._page_sizes[block]
            # bases is set whenever uffd is; no second test per page
            placed = self.uffd.zeropage(self.bases[block] + page * ps,  # type: ignore[index]
                                        ps)
            received[page] = 1
            return placed
        with self._guard:
            if received[page]:
                return False
            if not self._fresh[block]:
                view = self._u64[block][page]
                if view.any():
                    view[:] = 0
            received[page] = 1
        return True

    def place_run(self, block: int, pages: np.ndarray, data: np.ndarray | None) -> int:
        """Place ``data[k]`` at page ``pages[k]`` of *block* (``data`` None:
        zero pages) for a whole run of records; returns how many this call
        placed.  The first copy of a page wins, as one :meth:`place` at a
        time would have it.

        Without userfaultfd the run goes in with array operations under the
        lock (which the fault handler's single pages take too);
        UFFDIO_COPY installs one page a call, so there it is a loop.
        """
        if self.uffd is not None:
            placed = 0
            if data is None:
                for page in pages.tolist():
                    placed += self.place_zero(block, page)
            else:
                for page, row in zip(pages.tolist(), data):
                    placed += self.place(block, page, row)
            return placed
        received = self.received[block]
        with self._guard:
            new = received[pages] == 0
            if not new.all():
                pages = pages[new]
                data = data[new] if data is not None else None
            if len(pages) > 1 and not (pages[1:] > pages[:-1]).all():
                # Repeats in the run: keep each page's first copy.
                _, first = np.unique(pages, return_index=True)
                pages = pages[first]
                data = data[first] if data is not None else None
            if not len(pages):
                return 0
            if data is not None:
                self.blocks[block].pages[pages] = data
            elif not self._fresh[block]:
                rows = self._u64[block][pages]
                dirty = pages[rows.any(axis=1)]
                if len(dirty):
                    self._u64[block][dirty] = 0
            received[pages] = 1
        return len(pages)

    def discard(self, block: int, start: int, length: int) -> None:
        """POSTCOPY_RAM_DISCARD of bytes [start, start+length) of *block*
        (page aligned): the pages count as not received and their memory is
        freed, so that they read as zero and, under userfaultfd, fault."""
        ps = self._page_sizes[block]
        b = self.blocks[block]
        if start % ps or length % ps or start < 0 or length < 0 \
                or start + length > b.used_length:
            raise PostcopyError(
                f"discard of {length:#x} bytes at {start:#x} in block {b.idstr!r}: not "
                f"page aligned or outside the block ({b.used_length:#x} bytes)")
        if not length:
            return
        first, count = start // ps, length // ps
        with self._guard:
            # Bits first: a reader that sees a clear bit waits for the page;
            # one that saw a set bit over a punched hole would read zeros.
            self.received[block][first:first + count] = 0
            punch_hole(b.fd, start, length)

    def __repr__(self) -> str:
        return f"<Placer {self.mode} blocks={[b.idstr for b in self.blocks]}>"


def _fill(dst: memoryview, data, size: int) -> None:
    """Copy one page *data* into *dst* (a byte memoryview of *size* bytes)."""
    try:
        dst[:] = data
        return
    except (TypeError, ValueError, NotImplementedError):
        pass
    # Another format or shape (a 2-D row, a signed view): go through numpy.
    arr = np.asarray(data)
    if arr.dtype != np.uint8:
        arr = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    arr = arr.reshape(-1)
    if arr.size != size:
        raise PostcopyError(f"a page is {size} bytes, got {arr.size}")
    np.frombuffer(dst, dtype=np.uint8)[:] = arr
