"""The counters of one migration and QEMU's figures derived from them
(QEMU's migration-stats.c and the rate/estimate code of migration.c).

:class:`StatsAccumulator` is the mutable side, owned by a migration loop.
The loop reports what it did (pages sent, bytes written, a bitmap sync,
the VM stopping) and the accumulator derives QEMU's figures from it:
throughput windows, dirty-page rate, expected downtime, the switchover
threshold (spec 6.2, 6.3).  Time comes from an injected clock, so tests
drive it with a fake one.  :meth:`StatsAccumulator.snapshot` freezes the
figures into the query-migrate view (:mod:`engine.stats.view`).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from engine.state import MigrationStatus
from engine.stats.view import MigrationInfo, RamStats

__all__ = ["StatsAccumulator", "BUFFER_DELAY_MS", "DIRTY_RATE_PERIOD_MS"]

BUFFER_DELAY_MS = 100
"""Shortest throughput window (QEMU's BUFFER_DELAY)."""

DIRTY_RATE_PERIOD_MS = 1000
"""A dirty-rate period ends at the first bitmap sync more than this after it began."""

_EXPECTED_DOWNTIME_MIN_BYTES = 10000
"""Below this many bytes in a window, expected-downtime is not re-estimated."""


class StatsAccumulator:
    """The running counters of one migration, with QEMU's derived figures.

    ``total_bytes`` is the guest RAM being migrated, ``page_size`` the
    target page size, ``clock`` a seconds clock (:func:`time.monotonic` or a
    fake).  ``downtime_limit`` (ms) seeds ``expected-downtime`` as QEMU does;
    ``avail_switchover_bandwidth`` (bytes/s, 0 = use the measured one) is
    used for the expected-downtime estimate.  Both are public attributes and
    may be changed while running (``migrate-set-parameters`` applies live).

    Byte accounting: ``add_normal``/``add_zero`` take the bytes those pages
    cost *on the main channel* (0 when multifd carried them; multifd
    traffic is reported with :meth:`add_multifd_bytes`), and those bytes are
    also classified as precopy, downtime or postcopy bytes by when they
    were sent.  :meth:`add_bytes` is any other main-channel traffic (headers,
    device state).  ``transferred`` = main-channel + multifd bytes.

    Thread-safe; all methods are O(1).
    """

    def __init__(self, total_bytes: int, page_size: int = 4096,
                 clock: Callable[[], float] = time.monotonic, *,
                 downtime_limit: int = 300, avail_switchover_bandwidth: int = 0,
                 xbzrle_cache: int | None = None):
        self.total_bytes = total_bytes
        self.page_size = page_size
        self.downtime_limit = downtime_limit
        self.avail_switchover_bandwidth = avail_switchover_bandwidth
        self._clock = clock
        self._lock = threading.Lock()

        self._main_bytes = 0
        self._multifd_bytes = 0
        self._normal_pages = 0
        self._zero_pages = 0
        self._ram_bytes = {"precopy": 0, "downtime": 0, "postcopy": 0}
        self._phase = "precopy"
        self._postcopy_requests = 0
        self._dirty_sync_count = 0
        # Before the first sync every page is dirty (QEMU starts with a full bitmap).
        self._remaining_pages = total_bytes // page_size

        self._start: float | None = None
        self._setup_time = 0
        self._vm_stop: float | None = None
        self._downtime: int | None = None
        self._end: float | None = None

        self._win_start: float | None = None
        self._win_bytes = 0
        self._win_pages = 0
        self._bandwidth = 0.0
        self._mbps = 0.0
        self._pages_per_second = 0
        self._expected_downtime = downtime_limit

        self._cpu_ms: int | None = None

        #: xbzrle-cache-size with the xbzrle capability (None: no xbzrle-cache member)
        self.xbzrle_cache = xbzrle_cache
        self._xbzrle = {"pages": 0, "bytes": 0, "cache-miss": 0, "overflow": 0}
        self._xbzrle_sent = 0
        self._xbzrle_rates = {"cache-miss-rate": 0.0, "encoding-rate": 0.0}
        # QEMU's *_prev counters of migration_update_rates: the period's start
        self._xbzrle_prev = (0, 0, 0, 0)    # target pages, cache misses, pages, bytes

        self._period_start: float | None = None
        self._period_dirty = 0
        self._dirty_pages_rate = 0
        self._dirty_bytes_last_sync = 0

    # -- helpers -----------------------------------------------------------

    @staticmethod
    def _ms(t0: float, t1: float) -> int:
        # Whole milliseconds, rounded so that fake clocks stepping 0.1 s
        # do not lose a millisecond to float error.
        return round((t1 - t0) * 1000)

    def _transferred(self) -> int:
        return self._main_bytes + self._multifd_bytes

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """The migration started (status ``setup``): time and windows begin."""
        with self._lock:
            now = self._clock()
            self._start = now
            self._win_start = now
            self._win_bytes = self._transferred()
            self._win_pages = self._normal_pages + self._zero_pages

    def setup_done(self) -> None:
        """Setup finished (status leaves ``setup``/``wait-unplug``)."""
        with self._lock:
            if self._start is not None:
                self._setup_time = self._ms(self._start, self._clock())

    def vm_stopped(self) -> None:
        """The source guest stopped for switchover: downtime starts.

        RAM bytes from now on count as ``downtime-bytes``.
        """
        with self._lock:
            self._vm_stop = self._clock()
            self._phase = "downtime"

    def postcopy_started(self) -> None:
        """The postcopy package went out and the destination may run.

        Downtime ends here; RAM bytes from now on count as
        ``postcopy-bytes``.
        """
        with self._lock:
            now = self._clock()
            if self._vm_stop is not None and self._downtime is None:
                self._downtime = self._ms(self._vm_stop, now)
            self._phase = "postcopy"

    def completed(self) -> None:
        """The migration completed: total time, downtime and mbps are frozen.

        mbps becomes the whole transfer's rate: bytes x 8 / (total-time -
        setup-time) / 1000 (spec 6.2).
        """
        with self._lock:
            now = self._clock()
            self._end = now
            if self._start is None:
                return
            total_ms = self._ms(self._start, now)
            if self._downtime is None and self._vm_stop is not None:
                self._downtime = self._ms(self._vm_stop, now)
            transfer_ms = total_ms - self._setup_time
            if transfer_ms > 0:
                self._mbps = self._transferred() * 8.0 / transfer_ms / 1000

    def set_cpu_seconds(self, seconds: float) -> None:
        """CPU time this side's processes spent on the migration (reported as
        the engine's ``x-cpu-time``, ms; QEMU has no such member)."""
        with self._lock:
            self._cpu_ms = round(seconds * 1000)

    # -- counters ------------------------------------------------------------

    def add_normal(self, pages: int, wire_bytes: int) -> None:
        """``pages`` pages sent with contents, costing ``wire_bytes`` on the main channel."""
        with self._lock:
            self._normal_pages += pages
            self._main_bytes += wire_bytes
            self._ram_bytes[self._phase] += wire_bytes

    def add_zero(self, pages: int, wire_bytes: int) -> None:
        """``pages`` zero pages sent, costing ``wire_bytes`` on the main channel."""
        with self._lock:
            self._zero_pages += pages
            self._main_bytes += wire_bytes
            self._ram_bytes[self._phase] += wire_bytes

    def add_xbzrle(self, counts) -> int:
        """A batch's xbzrle counts (:class:`~engine.migration.xbzrle.XbzrleCounts`);
        returns the bytes its XBZRLE records cost on the main channel."""
        with self._lock:
            x = self._xbzrle
            x["pages"] += counts.pages
            x["bytes"] += counts.bytes
            x["cache-miss"] += counts.cache_miss
            x["overflow"] += counts.overflow
            self._xbzrle_sent += counts.sent
            self._main_bytes += counts.wire_bytes
            self._ram_bytes[self._phase] += counts.wire_bytes
            return counts.wire_bytes

    def _update_xbzrle_rates(self) -> None:
        """QEMU's migration_update_rates for xbzrle, once per dirty-rate period:
        cache misses per page handled, and unencoded over encoded bytes."""
        target = self._normal_pages + self._zero_pages + self._xbzrle_sent
        prev_target, prev_miss, prev_pages, prev_bytes = self._xbzrle_prev
        if target == prev_target:
            return
        x = self._xbzrle
        rates = self._xbzrle_rates
        rates["cache-miss-rate"] = (x["cache-miss"] - prev_miss) / (target - prev_target)
        encoded = x["bytes"] - prev_bytes
        rates["encoding-rate"] = 0.0 if x["pages"] == prev_pages or not encoded else \
            (x["pages"] - prev_pages) * self.page_size / encoded
        self._xbzrle_prev = (target, x["cache-miss"], x["pages"], x["bytes"])

    def add_bytes(self, n: int) -> None:
        """Other bytes written on the main channel (headers, device state)."""
        with self._lock:
            self._main_bytes += n

    def add_multifd_bytes(self, n: int) -> None:
        """Bytes written on multifd channels, packet headers included.

        They count as precopy, downtime or postcopy bytes too, by when they
        were reported: QAPI defines downtime-bytes as the bytes sent while
        the guest is paused, and with multifd nearly all of those travel on
        the multifd channels (QEMU's own counter sees only the main
        channel's share, so it reads about 0 for a multifd migration).
        """
        with self._lock:
            self._multifd_bytes += n
            self._ram_bytes[self._phase] += n

    def add_postcopy_requests(self, n: int = 1) -> None:
        """Page requests received from the destination."""
        with self._lock:
            self._postcopy_requests += n

    def set_remaining(self, pages: int) -> None:
        """The number of pages still dirty (``remaining`` = pages x page size)."""
        with self._lock:
            self._remaining_pages = pages

    def dirty_sync(self, new_dirty_pages: int, remaining_pages: int) -> int:
        """A dirty-bitmap sync found ``new_dirty_pages``; ``remaining_pages`` are dirty.

        Counts the sync and returns the new ``dirty-sync-count`` (the
        MIGRATION_PASS number).  The dirty-page rate is recomputed at the
        first sync more than 1000 ms after the current period began:
        pages dirtied in the period x 1000 / period ms (spec 6.2, 6.5).
        """
        with self._lock:
            now = self._clock()
            self._dirty_sync_count += 1
            if self._period_start is None:
                self._period_start = now
            self._period_dirty += new_dirty_pages
            self._remaining_pages = remaining_pages
            self._dirty_bytes_last_sync = remaining_pages * self.page_size
            period_ms = self._ms(self._period_start, now)
            if period_ms > DIRTY_RATE_PERIOD_MS:
                self._dirty_pages_rate = self._period_dirty * 1000 // period_ms
                if self.xbzrle_cache is not None:
                    self._update_xbzrle_rates()
                self._period_start = now
                self._period_dirty = 0
            return self._dirty_sync_count

    # -- derived figures -------------------------------------------------------

    def update_window(self, now: float | None = None) -> float:
        """Close the throughput window if it is at least 100 ms old.

        Recomputes mbps, pages-per-second and bandwidth from the window's
        bytes and pages, and (if pages are being dirtied and the window
        carried more than 10000 bytes) expected-downtime = bytes dirty at the
        last sync / expected bandwidth (spec 6.3).  ``now`` is a clock value
        (default: the clock).  Returns the bandwidth in bytes/ms, unchanged
        when the window is still too young.
        """
        with self._lock:
            if self._win_start is None:
                return self._bandwidth
            if now is None:
                now = self._clock()
            window_ms = self._ms(self._win_start, now)
            if window_ms < BUFFER_DELAY_MS:
                return self._bandwidth
            transferred = self._transferred()
            pages = self._normal_pages + self._zero_pages
            win_bytes = transferred - self._win_bytes
            win_pages = pages - self._win_pages
            self._bandwidth = win_bytes / window_ms
            self._mbps = win_bytes * 8.0 / (window_ms / 1000) / 1e6
            self._pages_per_second = int(win_pages / (window_ms / 1000))
            expected_bw = self._expected_bandwidth(self.avail_switchover_bandwidth)
            if self._dirty_pages_rate and win_bytes > _EXPECTED_DOWNTIME_MIN_BYTES \
                    and expected_bw > 0:
                self._expected_downtime = int(self._dirty_bytes_last_sync / expected_bw)
            self._win_start = now
            self._win_bytes = transferred
            self._win_pages = pages
            return self._bandwidth

    def _expected_bandwidth(self, avail_switchover_bandwidth: int) -> float:
        if avail_switchover_bandwidth:
            return avail_switchover_bandwidth / 1000
        return self._bandwidth

    def threshold(self, downtime_limit_ms: int, avail_switchover_bandwidth: int = 0) -> int:
        """Bytes that can be sent within the downtime limit (spec 6.3).

        expected bandwidth (``avail_switchover_bandwidth`` bytes/s if set,
        else the last window's) x ``downtime_limit_ms``.  The loop may
        complete when what is pending is at most this.
        """
        with self._lock:
            return int(self._expected_bandwidth(avail_switchover_bandwidth) * downtime_limit_ms)

    @property
    def bandwidth(self) -> float:
        """The last window's bandwidth, bytes/ms."""
        with self._lock:
            return self._bandwidth

    @property
    def transferred(self) -> int:
        """Main-channel plus multifd bytes so far."""
        with self._lock:
            return self._transferred()

    @property
    def remaining(self) -> int:
        """Bytes still dirty."""
        with self._lock:
            return self._remaining_pages * self.page_size

    @property
    def dirty_sync_count(self) -> int:
        """Bitmap syncs so far."""
        with self._lock:
            return self._dirty_sync_count

    @property
    def expected_downtime(self) -> int:
        """The current downtime estimate, ms."""
        with self._lock:
            return self._expected_downtime

    def snapshot(self, status: MigrationStatus | str,
                 error_desc: str | None = None) -> MigrationInfo:
        """A frozen :class:`MigrationInfo` for ``status``, as of now.

        total-time runs from :meth:`start` and stops at :meth:`completed`.
        When ``status`` is ``completed``, ``remaining`` and
        ``dirty-pages-rate`` read 0, as in QEMU.
        """
        status = MigrationStatus(status)
        with self._lock:
            now = self._clock()
            done = status is MigrationStatus.COMPLETED
            total_time = None
            if self._start is not None:
                total_time = self._ms(self._start, self._end if self._end is not None else now)
            ram = RamStats(
                transferred=self._transferred(),
                remaining=0 if done else self._remaining_pages * self.page_size,
                total=self.total_bytes,
                duplicate=self._zero_pages,
                normal=self._normal_pages,
                normal_bytes=self._normal_pages * self.page_size,
                dirty_pages_rate=0 if done else self._dirty_pages_rate,
                mbps=self._mbps,
                dirty_sync_count=self._dirty_sync_count,
                postcopy_requests=self._postcopy_requests,
                page_size=self.page_size,
                multifd_bytes=self._multifd_bytes,
                pages_per_second=self._pages_per_second,
                precopy_bytes=self._ram_bytes["precopy"],
                downtime_bytes=self._ram_bytes["downtime"],
                postcopy_bytes=self._ram_bytes["postcopy"],
            )
            extra: dict[str, object] = ({} if self._cpu_ms is None
                                        else {"x-cpu-time": self._cpu_ms})
            if self.xbzrle_cache is not None:
                x, r = self._xbzrle, self._xbzrle_rates
                extra["xbzrle-cache"] = {   # QEMU's XBZRLECacheStats, in its order
                    "cache-size": self.xbzrle_cache, "bytes": x["bytes"], "pages": x["pages"],
                    "cache-miss": x["cache-miss"], "cache-miss-rate": r["cache-miss-rate"],
                    "encoding-rate": r["encoding-rate"], "overflow": x["overflow"]}
            return MigrationInfo(
                status=status.value,
                total_time=total_time,
                setup_time=self._setup_time,
                downtime=self._downtime,
                expected_downtime=self._expected_downtime,
                ram=ram,
                error_desc=error_desc,
                extra=extra,
            )
