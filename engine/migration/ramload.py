"""The RAM side of loadvm on the main channel (QEMU's ram.c, load half).

:class:`RamLoader` applies the page records a decoder yields to a guest's
memory while nothing runs on it (precopy): runs of pages
(:class:`~engine.stream.events.RamPages`) land with one array assignment
each, runs of zero pages (:class:`~engine.stream.events.RamZeros`) clear
only what is not zero already.  It keeps the "received" bitmap of every
block, which the multifd workers and the postcopy fault handler share.

Zero pages: a block this process created is known to be zero where nothing
was received yet (a page that never arrived is still the creator's zero),
so a zero page there is not touched at all (QEMU 9's multifd receiver has
the same rule); elsewhere it is cleared.  QEMU's main channel reads the page
first (``buffer_is_zero``) and writes only if it must; from Python, gathering
scattered pages to test them cost four times what clearing them does.
"""
from __future__ import annotations

import numpy as np

from engine.stream import events as ev


class RamLoader:
    """Lands precopy page records in the blocks of one guest.

    ``received`` maps each block's idstr to its received bitmap (one entry
    per page, any numpy dtype that takes True); ``page_size`` is the target
    page size.  ``pages`` and ``zero_pages`` count what was applied.
    """

    def __init__(self, blocks, received: dict, page_size: int):
        self.page_size = page_size
        self._pages = {b.idstr: b.pages for b in blocks}
        self._fresh = {b.idstr: bool(getattr(b, "fresh", False)) for b in blocks}
        self.received = received
        self.pages = self.zero_pages = 0

    def apply(self, event) -> None:
        """Land a RamPages, RamZeros, RamPage or RamZero event."""
        if isinstance(event, ev.RamPages):
            self.land(event.block, event.offsets, event.data)
        elif isinstance(event, ev.RamZeros):
            self.zero(event.block, event.offsets)
        elif isinstance(event, ev.RamPage):
            self.land(event.block, np.array([event.offset], np.uint64),
                      np.frombuffer(event.data, np.uint8).reshape(1, -1))
        elif isinstance(event, ev.RamZero):
            self.zero(event.block, np.array([event.offset], np.uint64))
        else:
            raise TypeError(f"not a RAM page event: {type(event).__name__}")

    def land(self, block: str, offsets: np.ndarray, data: np.ndarray) -> None:
        """Pages ``data[i]`` at byte ``offsets[i]`` of ``block``.

        Repeated offsets are fine: numpy assigns in order, so the last copy
        of a page wins, as it would one record at a time.
        """
        idx = offsets // np.uint64(self.page_size)
        self._pages[block][idx] = data
        self.received[block][idx] = True
        self.pages += len(idx)

    def zero(self, block: str, offsets: np.ndarray) -> None:
        """The pages at byte ``offsets`` of ``block`` are zero."""
        idx = offsets // np.uint64(self.page_size)
        received = self.received[block]
        # Known zero unless something was written there: a block we created
        # holds zeros wherever nothing has been received yet.
        maybe = idx[received[idx].astype(bool)] if self._fresh[block] else idx
        if len(maybe):
            self._pages[block][maybe] = 0
        received[idx] = True
        self.zero_pages += len(idx)
