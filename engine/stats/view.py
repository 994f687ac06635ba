"""The ``query-migrate`` view: frozen snapshots with QEMU's member names.

:class:`RamStats` and :class:`MigrationInfo` are QEMU's ``MigrationStats``
and ``MigrationInfo`` (qapi/migration.json): ``to_qmp`` gives the exact QMP
keys and QEMU's rules for which members appear in which status, and
``from_qmp`` reads an answer back (from an engine or a QEMU).
:func:`postcopy_fields` adds the destination's postcopy fault figures the
way QEMU 10.1 shows them.  Nothing here counts or renders: the counters are
:mod:`engine.stats.accumulator`, the HMP text :mod:`engine.stats.hmp`.

Units follow QEMU: bytes, pages, milliseconds; ``mbps`` is megabits per
second (10**6 bits), a float.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from engine.state import POSTCOPY_STATES, MigrationStatus

__all__ = [
    "RamStats",
    "MigrationInfo",
    "postcopy_fields",
    "latency_bucket",
    "POSTCOPY_BLOCKTIME_FIELDS",
    "POSTCOPY_LATENCY_BUCKETS",
]

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
