"""The source's multifd side (QEMU's multifd_send_* in multifd.c and the
multifd parts of ram.c: ram_save_multifd_page, multifd_ram_flush_and_sync).

:class:`MultifdSource` owns the :class:`~engine.multifd.pool.SendPool` and
decides what it carries in each phase (:class:`MultifdMode`), which sync
dialect the stream speaks, and what each batch costs under
``max-bandwidth``.  Everything here runs on the migration thread (the
pool's acknowledgements are collected there too), so nothing needs a lock
but the stats, which are written under the migration's ``_lock``.

It is given what it works through: the RAM saver, the main channel's
:class:`~engine.migration.outbound.Outbound` (its send, stats and rate
limiter), the guest's blocks, the options, and the checkpoint the pool calls
while it waits (the migration's cancel, the destination's failure).
"""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from engine.compress.zeropage import block_zero_page_mask
from engine.multifd.packet import packet_size
from engine.stream import encoder as enc
from engine.trace import trace

if TYPE_CHECKING:
    from engine.migration.outbound import Outbound
    from engine.migration.ramsave import RamSaver
    from engine.multifd.control import Ack
    from engine.multifd.pool import SendPool
    from engine.options import MigrationOptions
    from engine.ram.seams import MappedBlock

__all__ = ["MultifdSource", "MultifdMode", "BATCH_PAGES_MULTIFD"]

#: pages taken from the bitmap per hand-out to the multifd workers (8 packets)
BATCH_PAGES_MULTIFD = 1024
#: the smallest wire/reservation ratio a multifd charge assumes: a guest whose
#: pages were all zero so far may hand a full batch of data next
_MIN_WIRE_RATIO = 0.05


class MultifdMode(enum.Enum):
    """What the pool does now (QEMU: migrate_multifd() and the postcopy
    special cases of multifd_send_sync_main)."""
    OFF = "off"             # no pool, or its channels are closed
    PAGES = "pages"         # precopy: the pool carries the pages
    #: postcopy in QEMU 7.2's dialect: no pages, but the channels stay open
    #: and sync at every RAM EOS (its destination waits for those syncs)
    SYNC_ONLY = "sync-only"


class MultifdSource:
    """``check_abort`` raises to end the pool's waits (see the pool);
    ``on_ack`` is told of each acknowledged batch after the statistics."""

    def __init__(self, out: Outbound, ram: RamSaver, blocks: Sequence[MappedBlock],
                 options: Callable[[], MigrationOptions], *,
                 check_abort: Callable[[], None], on_ack: Callable[[], None] | None = None):
        self.out = out
        self.ram = ram
        self.page_size = ram.page_size
        self._blocks = blocks
        self._options = options
        self._check_abort = check_abort
        self._on_ack_hook = on_ack
        self.pool: SendPool | None = None
        self.mode = MultifdMode.OFF
        #: QEMU 7.2's multifd dialect (a sync at every RAM section) or later
        #: QEMUs' (a MULTIFD_FLUSH per round, noted in _flushed_round)
        self.flush_each_section = options().prop("multifd-flush-after-each-section")
        self._flushed_round = -1
        #: rate accounting: what each batch in flight was charged (by seq),
        #: and the wire/reservation ratio of recent acknowledgements
        self._charged: dict[int, int] = {}
        self._wire_ratio = 1.0

    @property
    def carries_pages(self) -> bool:
        return self.mode is MultifdMode.PAGES

    def prepare(self) -> None:
        """Start the workers (see SourceMigration.prepare)."""
        if self.pool is not None:
            return
        from engine.multifd.pool import SendPool
        opts = self._options()
        codec = opts.param("multifd-compression")
        level = {"zlib": opts.param("multifd-zlib-level"),
                 "zstd": opts.param("multifd-zstd-level")}.get(codec)
        # A cancel, the destination's SHUT or its closing the main channel must
        # not wait for workers stuck on a destination that stopped reading
        # (QEMU shuts the channels down): the pool checks every poll interval.
        self.pool = SendPool(int(opts.param("multifd-channels")), self._blocks,
                             codec=codec, level=level,
                             zero_detect=opts.param("zero-page-detection") == "multifd",
                             page_size=self.page_size, on_ack=self._on_ack,
                             check_abort=self._check_abort)

    def connect(self, uri: str, uuid: bytes) -> None:
        """QEMU opens every multifd channel before the header goes out."""
        self.prepare()
        assert self.pool is not None    # prepare() made it
        self.pool.connect(uri, uuid)
        trace("multifd_send_channels_connected", channels=self.pool.n, uri=uri)
        self.mode = MultifdMode.PAGES

    # -- rate accounting ---------------------------------------------------
    def _reservation(self, npages: int) -> int:
        """Bytes a batch of ``npages`` may take on the wire at most: every page
        in full plus each packet's header (QEMU 7.2 charges exactly this at
        hand-off)."""
        assert self.pool is not None    # only while the pool carries pages
        packets = -(-npages // self.pool.page_count)
        return npages * self.page_size + packets * packet_size(self.pool.page_count)

    def _charge(self, npages: int) -> int:
        """What a batch is charged when handed to a worker: its reservation
        scaled by the wire/reservation ratio of the batches acknowledged so
        far.  Charging the full reservation held a zero-page-heavy guest to
        max-bandwidth in guest pages rather than wire bytes until the give-back
        at each acknowledgement caught up (a 1 GiB idle guest took 0.5-0.8 s
        on 4 channels against 0.15 s on one); QEMU since 8.x charges what was
        written, after the fact."""
        return max(1, int(self._reservation(npages) * self._wire_ratio))

    def _on_ack(self, ack: Ack) -> None:
        out = self.out
        with out.lock:
            out.stats.add_normal(ack.normal, 0)
            out.stats.add_zero(ack.zero, 0)
            out.stats.add_multifd_bytes(ack.wire_bytes)
        reserved = self._reservation(ack.normal + ack.zero)
        charged = self._charged.pop(ack.seq, reserved)
        if reserved:
            ratio = 0.5 * self._wire_ratio + 0.5 * ack.wire_bytes / reserved
            self._wire_ratio = min(1.0, max(_MIN_WIRE_RATIO, ratio))
        limiter = out.limiter
        if limiter is not None:
            # Now that the batch's real size is known, settle the difference
            # with its charge, so max-bandwidth limits bytes on the wire.
            limiter.account(ack.wire_bytes - charged)
        if self._on_ack_hook is not None:
            self._on_ack_hook()

    # -- precopy -----------------------------------------------------------
    def submit(self) -> bool:
        """Hand the next dirty pages to the workers; False when the round is done.

        With zero-page-detection=legacy the zero pages are found here and go
        on the main channel as ZERO records (what QEMU 7.2 always does);
        otherwise the workers find them (multifd) or nobody does (none).
        """
        out, ram, ps = self.out, self.ram, self.page_size
        limiter = out.limiter
        assert self.pool is not None    # submit() runs only while the pool carries pages
        most = BATCH_PAGES_MULTIFD
        if limiter is not None:
            # A page and its share of a packet header, as the charge counts.
            full = self.pool.page_count
            most = limiter.batch_pages(-(-self._charge(full) // full), most)
        item = ram.next_pages(most)
        if item is None:
            return False
        index, idx = item
        if self._options().param("zero-page-detection") == "legacy":
            bm = ram.bitmaps[index]
            block = bm.block
            zero = block_zero_page_mask(block, idx, ps, bm.holes)
            if zero.any():
                offsets = idx.astype(np.uint64) * np.uint64(ps)
                record = ram.encoder.zero_pages(block.idstr, offsets[zero])
                out.send([record])
                nbytes = len(record)
                with out.lock:
                    out.stats.add_zero(int(zero.sum()), nbytes)
                if limiter is not None:
                    limiter.account(nbytes)
                idx = idx[~zero]
        if len(idx):
            if limiter is not None:
                # One hand-out is one BATCH (most <= the pool's batch size).
                charge = self._charge(len(idx))
                self._charged[self.pool.next_seq] = charge
                limiter.account(charge)
            self.pool.submit(index, idx.astype(np.uint64))
        self.pool.poll_acks()
        with out.lock:
            out.stats.set_remaining(ram.pending_pages())
        return True

    def flush(self) -> None:
        """QEMU's multifd_ram_flush_and_sync: a SYNC on every channel, then the
        MULTIFD_FLUSH record that tells the destination to wait for them."""
        assert self.pool is not None    # only while the pool carries pages
        self.pool.sync()
        self.out.send_counted(enc.ram_flush())

    def setup_done(self) -> None:
        """QEMU >= 8.1: the setup section's flush, after the block list; it
        also tells the destination which dialect this stream speaks."""
        if self.carries_pages and not self.flush_each_section:
            self.flush()

    def section_end(self) -> None:
        """Before a RAM section's EOS: QEMU 7.2's sync of every channel."""
        if self.carries_pages and self.flush_each_section:
            assert self.pool is not None    # carries_pages: connect() made it
            self.pool.sync()

    def round_done(self, round_: int) -> None:
        """The scan reached the end of RAM (QEMU: the page search wrapped)."""
        if self.carries_pages and not self.flush_each_section \
                and self._flushed_round != round_:
            self._flushed_round = round_
            self.flush()

    def complete(self) -> None:
        """After EOF: BYE, every channel closed cleanly."""
        if self.carries_pages:
            assert self.pool is not None    # carries_pages: connect() made it
            self.pool.finish()
            self.mode = MultifdMode.OFF

    # -- across the switch to postcopy ----------------------------------------
    def postcopy_prepare(self, end_section: Callable[[], None]) -> None:
        """The "postcopy prepare" section: multifd's last pages in place,
        then ``end_section()`` ends it.

        Postcopy pages are placed one by one as they arrive (multifd cannot
        do that): no more pages for the pool.  QEMU 7.2 keeps the channels
        and syncs them at every EOS (its destination waits for that); QEMU
        10.1 closes them."""
        if self.carries_pages and not self.flush_each_section:
            self.flush()
        end_section()
        if self.carries_pages:
            if self.flush_each_section:
                self.mode = MultifdMode.SYNC_ONLY
            else:
                self.mode = MultifdMode.OFF
                assert self.pool is not None    # carries_pages: connect() made it
                self.pool.finish()

    def postcopy_sync(self) -> None:
        """QEMU 7.2's per-section sync, in postcopy too (no pages move).

        If a channel broke, multifd is over for this migration: the pool
        goes and the destination sees the channels end (ours accepts that);
        postcopy itself goes on over the main and preempt channels.
        """
        if self.mode is not MultifdMode.SYNC_ONLY:
            return
        from engine.errors import EngineError
        assert self.pool is not None    # SYNC_ONLY: postcopy_prepare() kept it
        try:
            self.pool.sync()
        except EngineError:
            self.mode = MultifdMode.OFF
            self.pool.kill()

    def postcopy_finish(self) -> None:
        if self.mode is MultifdMode.SYNC_ONLY:
            self.mode = MultifdMode.OFF
            assert self.pool is not None    # SYNC_ONLY: postcopy_prepare() kept it
            self.pool.finish()      # BYE, after the destination's SHUT as in QEMU 7.2
