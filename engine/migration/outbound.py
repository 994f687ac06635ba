"""The source's main channel as the migration's parts share it.

QEMU's ram.c, multifd.c and the postcopy code all write through the same
``MigrationState``: its ``to_dst_file``, ``migration_rate_limit`` and the
counters of ``mig_stats``.  :class:`Outbound` is that much of the source and
no more, so that :class:`~engine.migration.postcopy_source.PostcopySource`
and :class:`~engine.migration.multifd_source.MultifdSource` are given what
they send through instead of the whole :class:`~engine.migration.source.
SourceMigration`.

Who writes what:

===========  ==============================================================
``channel``  the migration thread (``run`` sets it, a postcopy recovery
             replaces it); other threads only shut it down
``limiter``  the migration thread, one per phase (precopy's max-bandwidth,
             postcopy's max-postcopy-bandwidth, None while the guest is
             stopped); migrate-set-parameters changes its ``limit``
``stats``    under ``lock`` where several figures must agree (the
             accumulator locks each call itself)
``owned``    the migration thread: channels opened during the migration
             (a recovery's main channel, the ended preempt channel), closed
             when it ends
===========  ==============================================================
"""
from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Sequence

from engine.migration.ratelimit import RateLimiter
from engine.transport.seams import ByteChannel

if TYPE_CHECKING:
    from engine.migration.ramsave import BatchResult, RamSaver
    from engine.stats import StatsAccumulator

__all__ = ["Outbound"]


class Outbound:
    def __init__(self, stats: StatsAccumulator, ram: RamSaver, lock: threading.Lock):
        self.stats = stats
        self.lock = lock
        self._ram = ram
        self._record_bytes = 8 + ram.page_size      # a page record: header and page
        self.channel: ByteChannel | None = None
        self.limiter: RateLimiter | None = None
        self.owned: list[ByteChannel] = []

    def _main(self) -> ByteChannel:
        channel = self.channel
        assert channel is not None      # run() sets it before anything is sent
        return channel

    def send(self, buffers: Sequence) -> None:
        """Buffers on the main channel, not counted (the caller counts them)."""
        self._main().sendmsg_all(buffers)

    def send_counted(self, *records: bytes) -> None:
        """Records on the main channel, counted as other bytes (headers, devices)."""
        self._main().sendmsg_all(records)
        self.stats.add_bytes(sum(len(r) for r in records))

    def send_batch(self, batch: BatchResult) -> None:
        """A batch of page records on the main channel, counted and charged to
        the phase's rate limit."""
        self._main().send_views(batch.buffers)
        self.account_batch(batch)
        limiter = self.limiter
        if limiter is not None:
            limiter.account(batch.wire_bytes)

    def account_batch(self, batch: BatchResult) -> None:
        """The figures of a batch sent on any channel of the RAM section."""
        stats = self.stats
        with self.lock:
            normal = batch.normal * self._record_bytes
            stats.add_normal(batch.normal, normal)
            if batch.xbzrle is not None:
                normal += stats.add_xbzrle(batch.xbzrle)
            stats.add_zero(batch.zero, batch.wire_bytes - normal)
            stats.set_remaining(self._ram.pending_pages())

    def adopt(self, channel: ByteChannel) -> None:
        """Close ``channel`` when the migration ends."""
        self.owned.append(channel)

    def release(self, channel: ByteChannel) -> None:
        """Close ``channel`` now if it is one of ours (a broken recovery's)."""
        if channel in self.owned:
            self.owned.remove(channel)
            channel.close()

    def close_owned(self) -> None:
        for channel in self.owned:
            with contextlib.suppress(Exception):
                channel.close()
        self.owned.clear()
