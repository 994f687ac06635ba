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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.stream import encoder as enc
from engine.stream.constants import RAM_SAVE_FLAG_PAGE
from engine.stream.encoder import RamRecordEncoder

#: pages per batch: 1 MiB of 4 KiB pages, large enough that the per-batch
#: Python cost disappears, small enough to keep the rate limiter smooth.
BATCH_PAGES = 256



@dataclass
class BatchResult:
    buffers: list
    normal: int
    zero: int
    wire_bytes: int


def encode_batch(idstr: str, pages: np.ndarray, idx: np.ndarray, page_size: int,
                 detect_zero: bool, staging: np.ndarray | None = None,
                 encoder: RamRecordEncoder | None = None) -> BatchResult:
    """Encode the pages ``idx`` (ascending indexes into ``pages``) as records.

    ``staging`` is a reusable ``(>= len(idx), 8 + page_size)`` uint8 array;
    reusing it matters: a fresh 1 MiB array per batch costs a page fault for
    every 4 KiB of it.  The returned buffers may point into it, so they must
    be sent before the next call.  ``encoder`` is the channel's record
    encoder (it knows the previous block, for CONTINUE); a fresh one names
    the block in the first record.
    """
    encoder = encoder or RamRecordEncoder(page_size)
    n = len(idx)
    rec = staging[:n] if staging is not None else np.empty((n, 8 + page_size), np.uint8)
    np.take(pages, idx, axis=0, out=rec[:, 8:])
    offsets = idx.astype(np.uint64) * np.uint64(page_size)
    if detect_zero:
        is_zero = ~rec[:, 8:].view(np.uint64).any(axis=1)
        nz = int(is_zero.sum())
    else:
        nz = 0
    if nz:
        zoff = offsets[is_zero]
        rec = rec[~is_zero]
        offsets = offsets[~is_zero]
    nn = n - nz
    buffers: list = []
    if nn:
        words, name = encoder.record_words(idstr, offsets, RAM_SAVE_FLAG_PAGE)
        rec[:, :8] = words.view(np.uint8).reshape(nn, 8)
        flat = memoryview(rec).cast("B")
        if name:
            # The counted block name goes between the first header and its page.
            buffers += [bytes(flat[:8]) + name, flat[8:]]
        else:
            buffers.append(flat)
    if nz:
        buffers.append(encoder.zero_pages(idstr, zoff))
    wire = sum(len(b) for b in buffers)
    return BatchResult(buffers, nn, nz, wire)


class BlockBitmap:
    """The migration bitmap of one RAM block plus a scan cursor."""

    def __init__(self, block, dirty_log):
        self.block = block
        self.log = dirty_log
        self.bits = np.ones(block.npages, dtype=bool)
        self.cursor = 0

    def sync(self) -> int:
        """Merge the dirty log into the bitmap; returns newly dirtied pages."""
        idx = self.log.harvest()
        if len(idx):
            new = int(np.count_nonzero(~self.bits[idx]))
            self.bits[idx] = True
            return new
        return 0

    def pending(self) -> int:
        return int(np.count_nonzero(self.bits))

    def take(self, limit: int) -> np.ndarray:
        """Up to ``limit`` dirty pages at or after the cursor, cleared."""
        found = np.flatnonzero(self.bits[self.cursor:self.cursor + max(limit * 64, 1 << 16)])
        start = self.cursor
        if len(found) == 0:
            rest = np.flatnonzero(self.bits[self.cursor:])
            if len(rest) == 0:
                self.cursor = len(self.bits)
                return rest
            found = rest
        idx = found[:limit] + start
        self.bits[idx] = False
        self.cursor = int(idx[-1]) + 1
        return idx


class RamSaver:
    """Bitmaps, scanning and record encoding for every migratable block."""

    def __init__(self, guest, page_size: int, detect_zero: bool):
        self.page_size = page_size
        self.detect_zero = detect_zero
        self.bitmaps = [BlockBitmap(b, guest.dirty_log(b.idstr)) for b in guest.blocks]
        self._current = 0
        self._staging = np.empty((BATCH_PAGES, 8 + page_size), np.uint8)
        #: the main channel's record encoder: previous block, for CONTINUE
        self.encoder = RamRecordEncoder(page_size)

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
        for bm in self.bitmaps:
            bm.cursor = 0
        self._current = 0
        return sum(bm.sync() for bm in self.bitmaps)

    def pending_pages(self) -> int:
        return sum(bm.pending() for bm in self.bitmaps)

    def next_pages(self, limit: int = BATCH_PAGES) -> tuple[int, np.ndarray] | None:
        """(block index, up to ``limit`` dirty pages, cleared), None when the round is done."""
        while self._current < len(self.bitmaps):
            idx = self.bitmaps[self._current].take(limit)
            if len(idx):
                return self._current, idx
            self._current += 1
        return None

    def next_batch(self) -> BatchResult | None:
        """Encode the next batch of dirty pages, or None when the round is done."""
        item = self.next_pages()
        if item is None:
            return None
        block = self.bitmaps[item[0]].block
        return encode_batch(block.idstr, block.pages, item[1], self.page_size,
                            self.detect_zero, self._staging, self.encoder)
