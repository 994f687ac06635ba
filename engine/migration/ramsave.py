"""The RAM side of savevm on the main channel (QEMU's ram.c, save half).

:class:`RamSaver` owns the migration bitmap of every block (one bool per
page: "still has to be sent"), merges the guest's dirty log into it at each
bitmap sync, and turns batches of dirty pages into RAM records.

A batch is encoded without a Python loop over its pages: the pages are
gathered from guest memory into one staging array laid out as records
(8-byte address word followed by the page), zero pages are found on that
staging copy with one vectorised test and become ``ZERO`` records.  The
staging copy also means a record's bytes cannot change while the socket is
sending them; a page the guest rewrites after the gather is marked in the
dirty log again and goes out in a later round.

The headers come from the main channel's
:class:`~engine.stream.encoder.RamRecordEncoder`, which remembers the
previous block as QEMU does per channel: a record names its block only when
the block changes, every other one carries ``RAM_SAVE_FLAG_CONTINUE``.

Postcopy adds a second reader of the bitmaps: with ``postcopy-preempt`` the
return-path thread sends requested pages itself, on the preempt channel.
Every read-and-clear of a bitmap therefore happens under :attr:`RamSaver.lock`,
so that a page leaves through exactly one channel once the discard has
been sent.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engine.compress.zeropage import zero_page_mask_from_buffer
from engine.migration.xbzrle import XbzrleSaver
from engine.ram.holes import HoleMap, block_fd
from engine.ram.runs import mask_runs
from engine.stream import encoder as enc
from engine.stream.constants import (MAX_DISCARDS_PER_COMMAND, POSTCOPY_RAM_DISCARD_VERSION,
                                     RAM_SAVE_FLAG_PAGE, MigCmd)
from engine.stream.encoder import RamRecordEncoder

if TYPE_CHECKING:
    from engine.ram.dirty import DirtyLog
    from engine.ram.seams import MappedBlock, SourceGuest

#: pages per batch in postcopy: 1 MiB of 4 KiB pages, so that a page request
#: served on the main channel waits behind at most that much background data.
BATCH_PAGES = 256
#: pages per batch in precopy (8 MiB): each batch costs tens of microseconds of
#: Python whatever its size; on a 1 GiB guest going from 256 to 2048 pages cut
#: both sides' CPU by a fifth.  A rate limit sizes batches by its budget anyway.
PRECOPY_BATCH_PAGES = 2048



@dataclass
class BatchResult:
    buffers: list
    normal: int
    zero: int
    wire_bytes: int
    #: with xbzrle, the batch's xbzrle counts (engine.migration.xbzrle)
    xbzrle: object = None


def encode_batch(idstr: str, pages: np.ndarray, idx: np.ndarray, page_size: int,
                 detect_zero: bool, encoder: RamRecordEncoder | None = None,
                 known_zero: np.ndarray | None = None) -> BatchResult:
    """Encode the pages ``idx`` (ascending indexes into ``pages``) as records.

    ``pages`` is the block's ``(npages, page_size)`` array.  The buffers are
    flat byte views for :meth:`~engine.transport.Channel.send_views`: each
    PAGE record is its 8-byte header and a view of the page in guest memory
    (the socket copies it from there: no staging copy, which cost as much as
    the send), then one buffer of ZERO records.  ``encoder`` is the
    channel's record encoder (it knows the previous block, for CONTINUE); a
    fresh one names the block in the first record.  With ``detect_zero``,
    pages marked in ``known_zero`` (holes of the block's file) become ZERO
    records unread, and the others are tested where they lie.

    A page the guest rewrites while the socket copies it may go out torn, as
    in QEMU, which sends from guest memory too: the write dirtied it again,
    so a later pass sends it whole, and the destination applies that copy
    after this one.  (The multifd codecs, whose input must hold still, copy
    first: engine.compress.)
    """
    encoder = encoder or RamRecordEncoder(page_size)
    offsets = idx.astype(np.uint64) * np.uint64(page_size)
    zoff = None
    if detect_zero:
        zero = zero_page_mask_from_buffer(pages, offsets, page_size, known_zero=known_zero)
        if zero.any():
            zoff = offsets[zero]
            offsets = offsets[~zero]
    buffers: list = []
    nn = len(offsets)
    if nn:
        words, name = encoder.record_words(idstr, offsets, RAM_SAVE_FLAG_PAGE)
        heads = words.data.cast("B")
        memory = pages.data.cast("B")
        starts = offsets.tolist()
        buffers = [None] * (2 * nn)
        buffers[0::2] = [heads[i:i + 8] for i in range(0, 8 * nn, 8)]
        buffers[1::2] = [memory[o:o + page_size] for o in starts]
        if name:
            # The counted block name goes between the first header and its page.
            buffers[0] = bytes(buffers[0]) + name
    nz = 0 if zoff is None else len(zoff)
    if nz:
        buffers.append(encoder.zero_pages(idstr, zoff))
    wire = nn * (8 + page_size) + (len(buffers[0]) - 8 if nn else 0) + \
        (len(buffers[-1]) if nz else 0)
    return BatchResult(buffers, nn, nz, wire)


def discard_commands(idstr: str, starts: np.ndarray, lengths: np.ndarray) -> bytes:
    """POSTCOPY_RAM_DISCARD commands for byte ranges ``(starts[i], lengths[i])`` of a block.

    The same bytes as :func:`engine.stream.encoder.postcopy_ram_discard`, but
    the full commands (12 ranges each) are laid out by numpy in one go: a
    fragmented 1 GiB guest has up to 131072 ranges.
    """
    n = len(starts)
    if not n:
        return b""
    pairs = np.empty((n, 2), dtype=">u8")
    pairs[:, 0] = starts
    pairs[:, 1] = lengths
    full = n // MAX_DISCARDS_PER_COMMAND
    out = bytearray()
    if full:
        name = idstr.encode()
        head = bytes((POSTCOPY_RAM_DISCARD_VERSION, len(name))) + name + b"\0"
        body = 16 * MAX_DISCARDS_PER_COMMAND
        # The framing of one full command, taken from the encoder itself.
        prefix = enc.command(MigCmd.MIG_CMD_POSTCOPY_RAM_DISCARD, head + bytes(body))[:-body]
        cmds = np.empty((full, len(prefix) + body), np.uint8)
        cmds[:, :len(prefix)] = np.frombuffer(prefix, np.uint8)
        cmds[:, len(prefix):] = pairs[:full * MAX_DISCARDS_PER_COMMAND].view(np.uint8) \
            .reshape(full, body)
        out += cmds.tobytes()
    rest = pairs[full * MAX_DISCARDS_PER_COMMAND:]
    if len(rest):
        out += enc.postcopy_ram_discard(idstr, [(int(a), int(b)) for a, b in rest])
    return bytes(out)


class BlockBitmap:
    """The migration bitmap of one RAM block plus a scan cursor.

    Every change to the bits goes through these methods, which keep two
    things the hot path would otherwise recompute per batch: the number of
    dirty pages (counting 256 Ki bits for each 1 MiB sent was most of the
    loop's bookkeeping) and the dirty pages ahead of the cursor, found once
    and then taken in slices (a fresh search per batch scanned 64 Ki bits).
    """

    def __init__(self, block: MappedBlock, dirty_log: DirtyLog, page_size: int):
        self.block = block
        self.log = dirty_log
        self.bits = np.ones(block.npages, dtype=bool)
        self.dirty = block.npages
        self.cursor = 0
        self._ahead: np.ndarray | None = None   # dirty pages >= cursor, when last looked
        self._ahead_pos = 0
        #: the holes of the block's file, learned during a pass
        self.holes = HoleMap(block_fd(block), page_size)

    def sync(self) -> int:
        """Merge the dirty log into the bitmap; returns newly dirtied pages."""
        idx = self.log.harvest()
        if len(idx):
            new = int(np.count_nonzero(~self.bits[idx]))
            self.bits[idx] = True
            self.dirty += new
            self._ahead = None
            return new
        return 0

    def pending(self) -> int:
        return self.dirty

    def seek(self, page: int) -> None:
        """Go on scanning from ``page``."""
        self.cursor = page
        self._ahead = None

    def take(self, limit: int) -> np.ndarray:
        """Up to ``limit`` dirty pages at or after the cursor, cleared."""
        while True:
            if self._ahead is None:
                self._ahead = np.flatnonzero(self.bits[self.cursor:]) + self.cursor
                self._ahead_pos = 0
            pos = self._ahead_pos
            idx = self._ahead[pos:pos + limit]
            if not len(idx):
                self.cursor = len(self.bits)
                return idx
            self._ahead_pos = pos + len(idx)
            still = self.bits[idx]          # a page request may have taken some
            if not still.all():
                idx = idx[still]
                if not len(idx):
                    continue
            self.bits[idx] = False
            self.dirty -= len(idx)
            self.cursor = int(idx[-1]) + 1
            return idx

    def take_range(self, first: int, count: int) -> np.ndarray:
        """The dirty pages of ``[first, first + count)``, cleared; the scan goes on
        after the range."""
        idx = np.flatnonzero(self.bits[first:first + count]) + first
        self.bits[idx] = False
        self.dirty -= len(idx)
        self.seek(min(first + count, len(self.bits)))
        return idx

    def take_page(self, page: int) -> bool:
        """:meth:`take_range` of one page, without arrays: True if it was dirty."""
        if not self.bits[page]:
            return False
        self.bits[page] = False
        self.dirty -= 1
        self.seek(page + 1)
        return True

    def mark_dirty(self, page: int) -> None:
        """Make ``page`` dirty (to be sent again)."""
        if not self.bits[page]:
            self.bits[page] = True
            self.dirty += 1
            self._ahead = None

    def set_missing(self, received: np.ndarray) -> None:
        """Dirty exactly the pages ``received`` does not have; scan from the start."""
        if received.shape != self.bits.shape:
            raise ValueError(f"received bitmap of {received.size} pages for block "
                             f"{self.block.idstr!r} of {self.bits.size}")
        np.logical_not(received, out=self.bits)
        self.dirty = int(np.count_nonzero(self.bits))
        self.seek(0)


class RamSaver:
    """Bitmaps, scanning and record encoding for every migratable block."""

    def __init__(self, guest: SourceGuest, page_size: int, detect_zero: bool,
                 xbzrle_cache: int | None = None):
        self.page_size = page_size
        self.detect_zero = detect_zero
        #: the XBZRLE page cache and encoder (QEMU's XBZRLE), with the capability
        self.xbzrle = None if xbzrle_cache is None else \
            XbzrleSaver(guest.blocks, xbzrle_cache, page_size)
        self.bitmaps = [BlockBitmap(b, guest.dirty_log(b.idstr), page_size)
                        for b in guest.blocks]
        self._index = {bm.block.idstr: i for i, bm in enumerate(self.bitmaps)}
        self._current = 0
        #: how many scans of RAM began (each bitmap sync or rewind starts one)
        self.round = 0
        #: the main channel's record encoder: previous block, for CONTINUE
        self.encoder = RamRecordEncoder(page_size)
        #: held for every read-and-clear of a bitmap (postcopy: two senders)
        self.lock = threading.Lock()

    @property
    def total_bytes(self) -> int:
        return sum(bm.block.used_length for bm in self.bitmaps)

    def block_list(self) -> bytes:
        """Start of the RAM SECTION_START body: the block list (EOS follows)."""
        blocks = [(bm.block.idstr, bm.block.used_length) for bm in self.bitmaps]
        # The first round sends everything; what the guest dirtied before
        # now is covered by that, so start the log from a clean slate.
        for bm in self.bitmaps:
            bm.log.harvest()
        return enc.ram_block_list(blocks)

    def sync(self) -> int:
        """Bitmap sync (QEMU's migration_bitmap_sync); returns new dirty pages."""
        with self.lock:
            self._rewind()
            return sum(bm.sync() for bm in self.bitmaps)

    def _wrapped(self) -> None:
        # QEMU starts XBZRLE when its scan first wraps round to the first
        # block: here at a complete round or at a rewind, whichever comes first.
        if self.xbzrle is not None:
            self.xbzrle.started = True

    def _rewind(self) -> None:
        self._wrapped()
        self.round += 1
        for bm in self.bitmaps:
            bm.seek(0)
            bm.holes.forget()       # a new pass: pages may hold data now
        self._current = 0

    def rewind(self) -> None:
        """Start a new round from the first page without a sync (postcopy)."""
        with self.lock:
            self._rewind()

    def last_stage(self) -> None:
        """The guest is stopped: from now on the XBZRLE cache is not updated."""
        if self.xbzrle is not None:
            self.xbzrle.last_stage = True

    def pending_pages(self) -> int:
        return sum(bm.pending() for bm in self.bitmaps)

    def next_pages(self, limit: int = BATCH_PAGES) -> tuple[int, np.ndarray] | None:
        """(block index, up to ``limit`` dirty pages, cleared), None when the round is done."""
        with self.lock:
            while self._current < len(self.bitmaps):
                idx = self.bitmaps[self._current].take(limit)
                if len(idx):
                    return self._current, idx
                self._current += 1
            self._wrapped()
        return None

    def next_batch(self, limit: int = BATCH_PAGES) -> BatchResult | None:
        """Encode the next batch of dirty pages, or None when the round is done."""
        item = self.next_pages(limit)
        if item is None:
            return None
        return self.encode(item[0], item[1])

    def encode(self, index: int, idx: np.ndarray,
               encoder: RamRecordEncoder | None = None) -> BatchResult:
        """Records for pages ``idx`` (ascending) of block ``index``; by default for
        the main channel (its encoder)."""
        bm = self.bitmaps[index]
        block = bm.block
        xbzrle = self.xbzrle
        if xbzrle is not None and xbzrle.active and encoder is None:
            buffers, normal, zero, wire, counts = xbzrle.encode_batch(
                block.idstr, block.pages, idx, self.detect_zero, self.encoder, self.round)
            return BatchResult(buffers, normal, zero, wire, xbzrle=counts)
        holes = bm.holes.mask(idx) if self.detect_zero else None
        return encode_batch(block.idstr, block.pages, idx, self.page_size, self.detect_zero,
                            self.encoder if encoder is None else encoder, known_zero=holes)

    # -- postcopy ------------------------------------------------------------------
    def page_size_summary(self) -> int:
        """POSTCOPY_ADVISE's summary: the OR of every block's page size (bytes)."""
        summary = 0
        for bm in self.bitmaps:
            summary |= bm.block.page_size
        return summary

    def block_index(self, idstr: str) -> int | None:
        """Index of the block named ``idstr`` (None if there is none)."""
        return self._index.get(idstr)

    def take_range(self, index: int, first: int, count: int) -> np.ndarray:
        """The still-dirty pages of ``[first, first + count)`` in block ``index``,
        cleared: a requested page is sent once, by whoever takes it first.

        Afterwards the background scan of that block goes on right after the
        range (QEMU's locality hint: the guest is likely to touch what follows);
        the pages it skips wait for the next round (:meth:`rewind`).
        """
        with self.lock:
            self._current = index
            return self.bitmaps[index].take_range(first, count)

    def take_page(self, index: int, page: int) -> bool:
        """:meth:`take_range` for one page, without arrays: True if it was dirty."""
        with self.lock:
            if not self.bitmaps[index].take_page(page):
                return False
            self._current = index
            return True

    def discard_commands(self) -> bytes:
        """POSTCOPY_RAM_DISCARD commands for every still-dirty run of every block.

        Target and host pages are the same size here, so no run needs
        widening to whole host pages.  There is always at least one command:
        with none, QEMU's LISTEN handler (7.2 and 10.0) takes its "no discard
        yet" path, which puts its postcopy state back to DISCARD, and the
        RUN that follows fails (``CMD_POSTCOPY_RUN in wrong postcopy
        state``).  QEMU's own source always has a page to discard; when ours
        has none, its first page is made dirty again, discarded and sent
        once more in postcopy.
        """
        out = []
        if self.xbzrle is not None:
            self.xbzrle.enabled = False     # QEMU sends no XBZRLE page in postcopy
        with self.lock:
            if self.bitmaps and not any(bm.dirty for bm in self.bitmaps):
                self.bitmaps[0].mark_dirty(0)
            for bm in self.bitmaps:
                starts, counts = mask_runs(bm.bits)
                ps = np.uint64(self.page_size)
                out.append(discard_commands(bm.block.idstr, starts.astype(np.uint64) * ps,
                                            counts.astype(np.uint64) * ps))
        return b"".join(out)

    def set_received(self, index: int, received: np.ndarray) -> None:
        """Postcopy recovery: the pages to send are those the destination lacks."""
        with self.lock:
            self.bitmaps[index].set_missing(received)
            self._current = 0
