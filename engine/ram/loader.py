"""The RAM side of loadvm (QEMU's ram.c, load half): page records into memory.

:class:`RamLoader` is the one place where the page records a decoder
yields land in a guest's memory, for every reader of a stream: the
destination's main channel (precopy, then postcopy), ``engine load``
writing an image, and the postcopy fault handler's preempt channel (its own
loader, over the same shared blocks and received bitmaps).  It lives here,
below both the drivers (migration/) and the fault handler (postcopy/), so
that both can use it; XBZRLE decoding comes from above
(:mod:`engine.migration.ramload` passes it in), the postcopy fault handler
needs none.

Two ways to land, switched once at POSTCOPY_LISTEN (QEMU's
``ram_load_precopy`` and ``ram_load_postcopy``):

* **precopy**: nothing runs on the memory.  A run of pages
  (:class:`~engine.stream.events.RamPages`) lands with one array assignment;
  a run of zero pages (:class:`~engine.stream.events.RamZeros`) clears only
  what is not zero already.
* **postcopy** (:meth:`RamLoader.place_through`): vCPUs may run on the
  memory, so each page goes in atomically and only once, through the
  placer (UFFDIO_COPY, or array writes under the lock shared with the fault
  handler), and a page some vCPU asked for is reported to ``on_placed`` so
  that its waiters wake.  :meth:`RamLoader.apply` says how many pages the
  call itself placed: UFFDIO_COPY wakes the waiters of the descriptor it
  went through only when it installed the page, so the fault handler must
  wake them itself otherwise.  A single page record goes straight to the
  placer, no arrays: on the preempt channel it is a vCPU's fault latency.

The loader keeps the "received" bitmap of every block, which the multifd
workers and the postcopy fault handler share.

Zero pages: a block this process created is known to be zero where nothing
was received yet (a page that never arrived is still the creator's zero),
so a zero page there is not touched at all (QEMU 9's multifd receiver has
the same rule); elsewhere it is cleared.  QEMU's main channel reads the page
first (``buffer_is_zero``) and writes only if it must; from Python, gathering
scattered pages to test them cost four times what clearing them does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np

from engine.errors import BlockMismatchError, RemoteProtocolError, XbzrleError
from engine.stream import events as ev

if TYPE_CHECKING:
    from engine.ram.seams import MappedBlock, PageBlock

__all__ = ["RamLoader", "PagePlacer", "check_block_list", "received_maps"]


class PagePlacer(Protocol):
    """What postcopy placement needs (:class:`engine.postcopy.placer.Placer`,
    a layer above): each returns how many pages the call placed."""

    def place(self, block: int, page: int, data) -> bool: ...

    def place_zero(self, block: int, page: int) -> bool: ...

    def place_run(self, block: int, pages: np.ndarray, data: np.ndarray | None) -> int: ...


def check_block_list(announced: ev.RamBlockList, blocks: Sequence[MappedBlock]) -> None:
    """QEMU's ram_load_setup checks: every announced block exists, same length."""
    local = {b.idstr: b for b in blocks}
    for info in announced.blocks:
        block = local.get(info.idstr)
        if block is None:
            raise BlockMismatchError(
                f'Unknown ramblock "{info.idstr}", cannot accept migration '
                f"(this guest has: {', '.join(sorted(local)) or 'no blocks'})")
        if block.used_length != info.used_length:
            raise BlockMismatchError(
                f"Length mismatch: {info.idstr}: 0x{info.used_length:x} in the stream "
                f"!= 0x{block.used_length:x} here")


class RamLoader:
    """Lands page records in the blocks of one guest (or image).

    ``blocks`` have ``idstr``, ``pages`` (a ``(npages, page_size)`` uint8
    array) and ``fresh``; ``received`` maps each block's idstr to its
    received bitmap (one entry per page, any numpy dtype that takes True);
    ``page_size`` is the target page size; ``xbzrle_decode(encoding, page)``
    applies an XBZRLE record to a page in place (without it, an XBZRLE
    record is refused).  ``pages`` and ``zero_pages`` count the page records
    applied, precopy and postcopy alike (a postcopy page that was there
    already counts too: it arrived); ``xbzrle_pages`` the XBZRLE records.
    """

    def __init__(self, blocks: Sequence[PageBlock], received: dict, page_size: int, *,
                 xbzrle_decode: Callable[..., object] | None = None):
        self.page_size = page_size
        self._pages = {b.idstr: b.pages for b in blocks}
        self._fresh = {b.idstr: bool(getattr(b, "fresh", False)) for b in blocks}
        self._index = {b.idstr: i for i, b in enumerate(blocks)}
        self.received = received
        self._xbzrle_decode = xbzrle_decode
        self.pages = self.zero_pages = self.xbzrle_pages = 0
        #: postcopy: the placer, per block the "requested" bitmap, the callback
        self._placer: PagePlacer | None = None
        self._requested: list | None = None
        self._on_placed: Callable[[int, int], None] | None = None
        # By event type: what lands it, and how many pages it placed.
        self._appliers: dict[type, Callable[..., int]] = {
            ev.RamPages: lambda e: self.land(e.block, e.offsets, e.data),
            ev.RamZeros: lambda e: self.zero(e.block, e.offsets),
            ev.RamPage: lambda e: self.land_page(e.block, e.offset, e.data),
            ev.RamZero: lambda e: self.land_page(e.block, e.offset, None),
            ev.RamXbzrle: lambda e: self.patch(e.block, e.offset, e.data),
        }

    @property
    def postcopy(self) -> bool:
        """Whether pages go in through a placer (after POSTCOPY_LISTEN)."""
        return self._placer is not None

    def place_through(self, placer: PagePlacer, requested: list | None = None,
                      on_placed: Callable[[int, int], None] | None = None) -> None:
        """From now on pages go in atomically through ``placer`` (postcopy).

        ``requested[i]`` is block *i*'s bitmap of pages a vCPU asked for;
        ``on_placed(i, page)`` is called for each of those once it is in
        place (QEMU's postcopy_place_page waking the faulting vCPU).  Called
        again with another placer (the fault handler's, when the vCPU whose
        userfaultfd it used went away), it takes the new one.
        """
        self._placer = placer
        self._requested = requested
        self._on_placed = on_placed

    def apply(self, event) -> int:
        """Land a RamPages, RamZeros, RamPage, RamZero or RamXbzrle event.

        Returns how many pages this call put in place: in postcopy only the
        pages that were not there yet, in precopy every page of the record.
        """
        try:
            applier = self._appliers[type(event)]
        except KeyError:
            raise TypeError(f"not a RAM page event: {type(event).__name__}") from None
        return applier(event)

    def land(self, block: str, offsets: np.ndarray, data: np.ndarray) -> int:
        """Pages ``data[i]`` at byte ``offsets[i]`` of ``block``; returns how
        many were placed (see :meth:`apply`).

        Precopy: repeated offsets are fine, numpy assigns in order, so the
        last copy of a page wins, as it would one record at a time.
        Postcopy: the first copy wins (a page is placed once).
        """
        idx = offsets // np.uint64(self.page_size)
        self.pages += len(idx)
        if self._placer is not None:
            return self._place(block, idx, data)
        self._pages[block][idx] = data
        self.received[block][idx] = True
        return len(idx)

    def land_page(self, block: str, offset: int, data) -> int:
        """One page record at byte ``offset`` of ``block``: ``data`` (bytes-like,
        one page) or, with ``data`` None, a zero page.  Returns 1 if this
        call placed it, else 0 (postcopy: it was there already).

        In postcopy the page goes straight to the placer, and is counted only
        once placed (or found there): a caller may retry through another
        placer after a failure without counting it twice.
        """
        placer = self._placer
        if placer is None:
            offsets = np.array([offset], np.uint64)
            if data is None:
                return self.zero(block, offsets)
            return self.land(block, offsets, np.frombuffer(data, np.uint8).reshape(1, -1))
        i = self._index[block]
        page = offset // self.page_size
        if data is None:
            placed = placer.place_zero(i, page)
            self.zero_pages += 1
        else:
            placed = placer.place(i, page, data)
            self.pages += 1
        requested = self._requested
        if requested is not None and self._on_placed is not None and requested[i][page]:
            self._on_placed(i, page)
        return 1 if placed else 0

    def patch(self, block: str, offset: int, encoding) -> int:
        """An XBZRLE record: ``encoding`` applied to the page held at byte
        ``offset`` of ``block`` (QEMU's load_xbzrle).  Precopy only: QEMU's
        postcopy loader knows no XBZRLE record either."""
        if self._placer is not None:
            raise RemoteProtocolError(f"XBZRLE page of {block} at {offset:#x} in postcopy")
        if self._xbzrle_decode is None:
            raise RemoteProtocolError(f"XBZRLE page of {block} at {offset:#x}: this loader "
                                      f"takes no XBZRLE records")
        page = self._pages[block][offset // self.page_size]
        try:
            self._xbzrle_decode(encoding, page)
        except XbzrleError as exc:
            raise RemoteProtocolError(f"Failed to load XBZRLE page of {block} at "
                                      f"{offset:#x} - decode error! ({exc})") from None
        self.received[block][offset // self.page_size] = True
        self.xbzrle_pages += 1
        return 1

    def zero(self, block: str, offsets: np.ndarray) -> int:
        """The pages at byte ``offsets`` of ``block`` are zero; returns how
        many were placed (see :meth:`apply`)."""
        idx = offsets // np.uint64(self.page_size)
        self.zero_pages += len(idx)
        if self._placer is not None:
            return self._place(block, idx, None)
        received = self.received[block]
        # Known zero unless something was written there: a block we created
        # holds zeros wherever nothing has been received yet.
        maybe = idx[received[idx].astype(bool)] if self._fresh[block] else idx
        if len(maybe):
            self._pages[block][maybe] = 0
        received[idx] = True
        return len(idx)

    def _place(self, block: str, idx: np.ndarray, data) -> int:
        i = self._index[block]
        assert self._placer is not None     # place_through() chose this path
        placed = self._placer.place_run(i, idx, data)
        requested = self._requested
        if requested is not None and self._on_placed is not None:
            asked = idx[requested[i][idx] != 0]
            for page in asked.tolist():     # only pages a vCPU is waiting for
                self._on_placed(i, page)
        return placed


def received_maps(blocks: Sequence[PageBlock], shared: Sequence | None = None) -> dict:
    """Each block's "received" bitmap, by idstr: the *shared* ones where other
    processes land pages too (the postcopy fault handler's, so that what
    arrived in precopy is not asked for again; the multifd workers'), else
    private ones."""
    if shared is None:
        return {b.idstr: np.zeros(b.npages, dtype=bool) for b in blocks}
    return {b.idstr: r for b, r in zip(blocks, shared)}
