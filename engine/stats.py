"""Migration statistics: ``query-migrate`` snapshots and the counters behind them.

Two halves, as in QEMU's migration-stats.c versus ``query-migrate``:

* :class:`StatsAccumulator` is the mutable side, owned by a migration loop.
  The loop reports what it did (pages sent, bytes written, a bitmap sync,
  the VM stopping) and the accumulator derives QEMU's figures from it:
  throughput windows, dirty-page rate, expected downtime, the switchover
  threshold (spec 6.2, 6.3).  Time comes from an injected clock, so tests
  drive it with a fake one.
* :class:`RamStats` and :class:`MigrationInfo` are frozen snapshots whose
  fields are QEMU's (``to_qmp`` gives the exact QMP keys and presence
  rules), and :func:`format_info_migrate` renders one as HMP
  ``info migrate`` text, so numbers can be put next to QEMU's unchanged.

Units follow QEMU: bytes, pages, milliseconds; ``mbps`` is megabits per
second (10**6 bits), a float.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from engine.state import POSTCOPY_STATES, MigrationStatus

__all__ = [
    "RamStats",
    "MigrationInfo",
    "StatsAccumulator",
    "format_info_migrate",
    "postcopy_fields",
    "latency_bucket",
    "BUFFER_DELAY_MS",
    "DIRTY_RATE_PERIOD_MS",
    "POSTCOPY_BLOCKTIME_FIELDS",
    "POSTCOPY_LATENCY_BUCKETS",
]

BUFFER_DELAY_MS = 100
"""Shortest throughput window (QEMU's BUFFER_DELAY)."""

DIRTY_RATE_PERIOD_MS = 1000
"""A dirty-rate period ends at the first bitmap sync more than this after it began."""

_EXPECTED_DOWNTIME_MIN_BYTES = 10000
"""Below this many bytes in a window, expected-downtime is not re-estimated."""


@dataclass(frozen=True)
class RamStats:
    """QEMU's ``MigrationStats`` (the ``ram`` member of ``query-migrate``).

    Byte counts are bytes, page counts pages, ``mbps`` megabits/s.
    """

    transferred: int = 0
    """Bytes written on the main channel plus multifd bytes."""
    remaining: int = 0
    """Bytes of RAM still dirty (0 once completed)."""
    total: int = 0
    """Bytes of guest RAM being migrated."""
    duplicate: int = 0
    """Zero pages (sent as a flag, not as data)."""
    normal: int = 0
    """Pages sent with their contents."""
    normal_bytes: int = 0
    """``normal`` x page size."""
    dirty_pages_rate: int = 0
    """Pages dirtied per second, over the last dirty-rate period."""
    mbps: float = 0.0
    """Throughput of the last window; at completion, of the whole transfer."""
    dirty_sync_count: int = 0
    """Dirty-bitmap syncs so far (= MIGRATION_PASS events)."""
    postcopy_requests: int = 0
    """Page requests received from the destination in postcopy."""
    page_size: int = 4096
    """Target page size in bytes."""
    multifd_bytes: int = 0
    """Bytes written on multifd channels, headers included."""
    pages_per_second: int = 0
    """Pages (normal + zero) sent per second in the last window."""
    precopy_bytes: int = 0
    """RAM bytes (main channel and multifd) sent while the guest ran."""
    downtime_bytes: int = 0
    """RAM bytes (main channel and multifd) sent while the guest was stopped."""
    postcopy_bytes: int = 0
    """RAM bytes (main channel and multifd) sent after the switch to postcopy."""
    dirty_sync_missed_zero_copy: int = 0
    """Syncs where a zero-copy flush reported a copy fallback."""

    def to_qmp(self) -> dict[str, Any]:
        """The QMP dictionary, with QEMU's hyphenated keys."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> RamStats:
        """Read a QMP ``MigrationStats`` (unknown keys, e.g. ``skipped``, ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k.replace("-", "_"): v for k, v in d.items()
                      if k.replace("-", "_") in names})


# Which members query-migrate shows, by status (spec 6.1).  'none' shows
# nothing (query-migrate answers {}), these show only the status, and every
# other status shows times and ram.
_STATUS_ONLY = frozenset({
    MigrationStatus.SETUP, MigrationStatus.FAILED, MigrationStatus.CANCELLED,
    MigrationStatus.WAIT_UNPLUG, MigrationStatus.COLO,
})
# ...of which these report 'downtime' (measured) instead of 'expected-downtime'.
_DOWNTIME_KNOWN = frozenset({MigrationStatus.COMPLETED}) | POSTCOPY_STATES


@dataclass(frozen=True)
class MigrationInfo:
    """A ``query-migrate`` answer (QEMU's ``MigrationInfo``).

    Times are milliseconds.  ``extra`` holds members this class does not
    model (``xbzrle-cache``, ``socket-address``, ``cpu-throttle-percentage``,
    ``postcopy-blocktime``, ``vfio``...) under their QMP keys; they are
    copied into :meth:`to_qmp` as given.
    """

    status: str
    total_time: int | None = None
    setup_time: int | None = None
    downtime: int | None = None
    expected_downtime: int | None = None
    ram: RamStats | None = None
    error_desc: str | None = None
    extra: dict = field(default_factory=dict)

    def to_qmp(self) -> dict[str, Any]:
        """The QMP dictionary, with QEMU's rules for which members appear.

        ``none`` gives ``{}``; ``setup``, ``failed``, ``cancelled``,
        ``wait-unplug`` and ``colo`` give only ``status`` (plus
        ``error-desc`` when set); other statuses add the times and ``ram``,
        with ``downtime`` when completed or in postcopy and
        ``expected-downtime`` otherwise.  Members left ``None`` are omitted.
        """
        status = MigrationStatus(self.status)
        if status is MigrationStatus.NONE:
            return {}
        out: dict[str, Any] = {"status": status.value}
        if status not in _STATUS_ONLY:
            timed = {"total-time": self.total_time, "setup-time": self.setup_time}
            if status in _DOWNTIME_KNOWN:
                timed["downtime"] = self.downtime
            else:
                timed["expected-downtime"] = self.expected_downtime
            out.update((k, v) for k, v in timed.items() if v is not None)
            if self.ram is not None:
                out["ram"] = self.ram.to_qmp()
            out.update(self.extra)
        if self.error_desc is not None:
            out["error-desc"] = self.error_desc
        return out

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> MigrationInfo:
        """Read a ``query-migrate`` answer (``{}`` reads as status ``none``)."""
        d = dict(d)
        ram = d.pop("ram", None)
        return cls(
            status=d.pop("status", "none"),
            total_time=d.pop("total-time", None),
            setup_time=d.pop("setup-time", None),
            downtime=d.pop("downtime", None),
            expected_downtime=d.pop("expected-downtime", None),
            ram=RamStats.from_qmp(ram) if ram is not None else None,
            error_desc=d.pop("error-desc", None),
            extra=d,
        )


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
                 downtime_limit: int = 300, avail_switchover_bandwidth: int = 0):
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
            return MigrationInfo(
                status=status.value,
                total_time=total_time,
                setup_time=self._setup_time,
                downtime=self._downtime,
                expected_downtime=self._expected_downtime,
                ram=ram,
                error_desc=error_desc,
                extra={} if self._cpu_ms is None else {"x-cpu-time": self._cpu_ms},
            )


# --------------------------------------------------------------------------
# The destination's postcopy fault figures

POSTCOPY_BLOCKTIME_FIELDS = (
    "postcopy-blocktime", "postcopy-vcpu-blocktime", "postcopy-latency",
    "postcopy-latency-dist", "postcopy-vcpu-latency", "postcopy-non-vcpu-latency",
)
"""QEMU 10.1's query-migrate members about postcopy faults.  Blocktimes are
milliseconds, latencies nanoseconds, the distribution counts faults.  QEMU
shows them on the destination only with the ``postcopy-blocktime``
capability, once the migration completed, and only if postcopy started
(its blocktime context is made at POSTCOPY_LISTEN)."""

POSTCOPY_LATENCY_BUCKETS = 24
"""``postcopy-latency-dist`` has this many buckets (QEMU's
BLOCKTIME_LATENCY_BUCKET_N): bucket N counts faults resolved in
[2^N, 2^(N+1)) microseconds, bucket 0 also those under 1 us, the last one
everything from 2^23 us on."""

#: the fault handler's own figures: not QEMU's, so under x- names
_ENGINE_POSTCOPY_FIGURES = {
    "postcopy-latency-p50": "x-postcopy-latency-p50",
    "postcopy-latency-p99": "x-postcopy-latency-p99",
    "postcopy-faults": "x-postcopy-faults",
}


def latency_bucket(latency_ns: int) -> int:
    """The ``postcopy-latency-dist`` bucket of a fault that took ``latency_ns``."""
    us = latency_ns // 1000
    return min(us.bit_length() - 1, POSTCOPY_LATENCY_BUCKETS - 1) if us > 0 else 0


def postcopy_fields(figures: Mapping[str, Any], *, blocktime: bool,
                    started: bool, completed: bool) -> dict[str, Any]:
    """query-migrate members from the fault handler's ``figures``.

    The engine's own figures (latency percentiles, fault mode) are always
    there, under x- names; QEMU's (:data:`POSTCOPY_BLOCKTIME_FIELDS`) as
    QEMU shows them: with the ``postcopy-blocktime`` capability
    (``blocktime``), postcopy ``started`` and the migration ``completed``.
    """
    out = {x: figures[name] for name, x in _ENGINE_POSTCOPY_FIGURES.items() if name in figures}
    if blocktime and started and completed and "postcopy-latency" in figures:
        out.update((k, figures[k]) for k in POSTCOPY_BLOCKTIME_FIELDS if k in figures)
        # Every fault the engine takes is a vCPU's (the fault handler watches
        # the vCPUs' mappings only), so there is no non-vCPU fault to average.
        out.setdefault("postcopy-non-vcpu-latency", 0)
    return out


# --------------------------------------------------------------------------
# HMP text

def _socket_uri(addr: Any) -> str:
    if isinstance(addr, Mapping):
        kind = addr.get("type")
        if kind == "inet":
            return f"tcp:{addr.get('host')}:{addr.get('port')}"
        if kind == "unix":
            return f"unix:{addr.get('path')}"
        if kind == "fd":
            return f"fd:{addr.get('str')}"
        if kind == "vsock":
            return f"vsock:{addr.get('cid')}:{addr.get('port')}"
    return str(addr)


def format_info_migrate(info: MigrationInfo,
                        capabilities: Mapping[str, bool] | None = None) -> str:
    """HMP ``info migrate`` text for ``info``, in QEMU's flat layout.

    With ``capabilities``, a first ``capabilities: name: on|off ...`` line
    as QEMU 7.2 prints.  Sizes are printed in kbytes (bytes >> 10), times in
    ms; the dirty-rate, postcopy request, precopy/downtime/postcopy ram and
    zero-copy lines appear only when non-zero.  Members of ``extra`` that
    QEMU prints (xbzrle cache, cpu throttle, blocktime, socket address,
    vfio) follow.  Status ``none`` prints no migration lines, as in QEMU.
    """
    q = info.to_qmp()
    lines: list[str] = []
    if capabilities is not None:
        caps = " ".join(f"{n}: {'on' if v else 'off'}" for n, v in capabilities.items())
        lines.append(f"capabilities: {caps} ")
    if "status" in q:
        line = f"Migration status: {q['status']}"
        if q["status"] == "failed" and q.get("error-desc"):
            line += f" ({q['error-desc']})"
        lines.append(line)
        lines.append(f"total time: {q.get('total-time', 0)} ms")
        if "expected-downtime" in q:
            lines.append(f"expected downtime: {q['expected-downtime']} ms")
        if "downtime" in q:
            lines.append(f"downtime: {q['downtime']} ms")
        if "setup-time" in q:
            lines.append(f"setup: {q['setup-time']} ms")
    ram = q.get("ram")
    if ram is not None:
        lines += [
            f"transferred ram: {ram['transferred'] >> 10} kbytes",
            f"throughput: {ram['mbps']:0.2f} mbps",
            f"remaining ram: {ram['remaining'] >> 10} kbytes",
            f"total ram: {ram['total'] >> 10} kbytes",
            f"duplicate: {ram['duplicate']} pages",
            f"normal: {ram['normal']} pages",
            f"normal bytes: {ram['normal-bytes'] >> 10} kbytes",
            f"dirty sync count: {ram['dirty-sync-count']}",
            f"page size: {ram['page-size'] >> 10} kbytes",
            f"multifd bytes: {ram['multifd-bytes'] >> 10} kbytes",
            f"pages-per-second: {ram['pages-per-second']}",
        ]
        if ram["dirty-pages-rate"]:
            lines.append(f"dirty pages rate: {ram['dirty-pages-rate']} pages")
        if ram["postcopy-requests"]:
            lines.append(f"postcopy request count: {ram['postcopy-requests']}")
        if ram["precopy-bytes"]:
            lines.append(f"precopy ram: {ram['precopy-bytes'] >> 10} kbytes")
        if ram["downtime-bytes"]:
            lines.append(f"downtime ram: {ram['downtime-bytes'] >> 10} kbytes")
        if ram["postcopy-bytes"]:
            lines.append(f"postcopy ram: {ram['postcopy-bytes'] >> 10} kbytes")
        if ram["dirty-sync-missed-zero-copy"]:
            lines.append("Zero-copy-send fallbacks happened: "
                         f"{ram['dirty-sync-missed-zero-copy']} times")
    xbzrle = q.get("xbzrle-cache")
    if xbzrle is not None:
        lines += [
            f"cache size: {xbzrle['cache-size']} bytes",
            f"xbzrle transferred: {xbzrle['bytes'] >> 10} kbytes",
            f"xbzrle pages: {xbzrle['pages']} pages",
            f"xbzrle cache miss: {xbzrle['cache-miss']} pages",
            f"xbzrle cache miss rate: {xbzrle['cache-miss-rate']:0.2f}",
            f"xbzrle encoding rate: {xbzrle['encoding-rate']:0.2f}",
            f"xbzrle overflow: {xbzrle['overflow']}",
        ]
    if "cpu-throttle-percentage" in q:
        lines.append(f"cpu throttle percentage: {q['cpu-throttle-percentage']}")
    if "postcopy-blocktime" in q:
        lines.append(f"postcopy blocktime: {q['postcopy-blocktime']}")
    if "postcopy-vcpu-blocktime" in q:
        blocktimes = ",".join(str(b) for b in q["postcopy-vcpu-blocktime"])
        lines.append(f"postcopy vcpu blocktime: {blocktimes}")
    if "socket-address" in q:
        lines.append("socket address: [")
        lines += [f"\t{_socket_uri(a)}" for a in q["socket-address"]]
        lines.append("]")
    if "vfio" in q:
        lines.append(f"vfio device transferred: {q['vfio']['transferred'] >> 10} kbytes")
    return "\n".join(lines) + ("\n" if lines else "")
