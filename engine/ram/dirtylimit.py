"""Per-vCPU dirty accounting and dirty-rate limits (QEMU's system/dirtylimit.c).

QEMU's dirty-limit reads each vCPU's dirty rate from the KVM dirty ring and
makes a vCPU whose rate is over its quota sleep each time its ring fills.
Here each vCPU process accounts for itself: after every chunk of work it adds
the pages it marked to its own counter, measures its rate over a period
(``x-vcpu-dirty-limit-period`` during a migration with the dirty-limit
capability, 1000 ms otherwise, as QEMU's DIRTYLIMIT_CALC_TIME_MS) and, while
it has a quota, sleeps so that the pages it marks stay under it.

The coordinator and the vCPUs share a *dirty area* of ``float64`` words:

=====================  ==================================================
words                  meaning
=====================  ==================================================
``PERIOD_MS``          the rate-measuring period (coordinator writes)
``MEASURING``          dirty-bitmap measurements under way: while it is
                       0 the vCPUs leave the measurement logs alone
                       (:class:`engine.ram.dirtyrate.TeeLog`)
``row[i, QUOTA]``      vCPU *i*'s quota in MB/s, 0 = not limited
                       (coordinator writes; a vCPU reads it every chunk)
``row[i, DIRTIED]``    pages vCPU *i* has marked since it started (the
                       per-vCPU counter ``calc-dirty-rate`` mode
                       ``dirty-ring`` reads; exact to 2**53)
``row[i, RATE]``       its dirty rate over its last period, MB/s
``row[i, SLEPT_US]``   microseconds it slept for its quota, in total
``row[i, ROUND_US]``   its sleep per round (one chunk of work, the
                       analogue of filling a dirty ring) in its last period
=====================  ==================================================

Each word has one writer, and an 8-byte aligned store is atomic on x86, so
no lock is needed; a reader sees a value at most one chunk old.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from engine.errors import GuestError
from engine.ram.shm import (attach_segment, close_segment, create_segment, removed_on_error,
                            unlink_segment)
from engine.ram.workloads import DIRTY_RATE_PAGE

__all__ = ["DirtyAreaHandle", "DirtyArea", "DirtyLimiter", "DEFAULT_PERIOD_MS",
           "pages_to_mbps", "MEASURING"]

PERIOD_MS, MEASURING = 0, 1
_HEADER_WORDS = 8
QUOTA, DIRTIED, RATE, SLEPT_US, ROUND_US = 0, 1, 2, 3, 4
_ROW_WORDS = 8

#: QEMU's DIRTYLIMIT_CALC_TIME_MS: the period outside a dirty-limit migration
DEFAULT_PERIOD_MS = 1000
_MIB = 1 << 20


def pages_to_mbps(pages: float, seconds: float) -> float:
    """A count of 4 KiB pages over *seconds* as MB/s (QEMU's MiB)."""
    return pages * DIRTY_RATE_PAGE / _MIB / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class DirtyAreaHandle:
    """What a vCPU process needs to attach the area (picklable)."""

    shm_name: str
    nvcpus: int


class DirtyArea:
    """The shared words above; the coordinator's methods are QEMU's commands'."""

    def __init__(self, shm, nvcpus: int, *, owner: bool):
        # Private: use create() or attach().
        self._shm = shm
        self.nvcpus = nvcpus
        self.owner = owner
        words = np.frombuffer(shm.buf, dtype=np.float64,
                              count=_HEADER_WORDS + nvcpus * _ROW_WORDS)
        self.words = words
        self.rows = words[_HEADER_WORDS:].reshape(nvcpus, _ROW_WORDS)
        self._closed = False

    @classmethod
    def create(cls, nvcpus: int) -> "DirtyArea":
        with removed_on_error(create_segment((_HEADER_WORDS + nvcpus * _ROW_WORDS) * 8)) as shm:
            area = cls(shm, nvcpus, owner=True)
        area.words[PERIOD_MS] = DEFAULT_PERIOD_MS
        return area

    @classmethod
    def attach(cls, handle: DirtyAreaHandle) -> "DirtyArea":
        return cls(attach_segment(handle.shm_name), handle.nvcpus, owner=False)

    @property
    def handle(self) -> DirtyAreaHandle:
        return DirtyAreaHandle(self._shm.name, self.nvcpus)

    def _live_rows(self) -> np.ndarray:
        if self._closed:
            raise GuestError("the guest's dirty area is closed")
        return self.rows

    # -- the coordinator's side: limits (set/cancel/query-vcpu-dirty-limit) -----
    def check_index(self, index: int) -> None:
        if not 0 <= index < self.nvcpus:
            raise GuestError(f"vCPU index {index} out of range [0, {self.nvcpus})")

    def set_limit(self, mbps: int, index: int | None = None) -> None:
        """Limit vCPU *index* (every vCPU with None) to *mbps* MB/s; 0 cancels."""
        rows = self._live_rows()
        if index is None:
            rows[:, QUOTA] = mbps
        else:
            self.check_index(index)
            rows[index, QUOTA] = mbps

    def cancel(self, index: int | None = None) -> None:
        self.set_limit(0, index)

    @property
    def in_service(self) -> bool:
        """Whether any vCPU has a quota (QEMU's dirtylimit_in_service)."""
        return bool((self._live_rows()[:, QUOTA] > 0).any())

    def limits(self) -> list[dict]:
        """query-vcpu-dirty-limit: the limited vCPUs, QEMU's DirtyLimitInfo."""
        rows = self._live_rows()
        return [{"cpu-index": i, "limit-rate": int(rows[i, QUOTA]),
                 "current-rate": int(rows[i, RATE])}
                for i in range(self.nvcpus) if rows[i, QUOTA] > 0]

    @property
    def period_ms(self) -> int:
        return int(self.words[PERIOD_MS])

    @period_ms.setter
    def period_ms(self, value: int) -> None:
        self.words[PERIOD_MS] = max(1, int(value))

    # -- the coordinator's side: figures ------------------------------------------
    def dirtied(self) -> np.ndarray:
        """Pages each vCPU has marked so far (``int64``, one per vCPU)."""
        return self._live_rows()[:, DIRTIED].astype(np.int64)

    def current_rates(self) -> np.ndarray:
        return self._live_rows()[:, RATE].copy()

    def throttle_time_per_round(self) -> int:
        """The longest sleep per round of any vCPU in its last period, µs."""
        rows = self._live_rows()
        return int(rows[:, ROUND_US].max()) if self.nvcpus else 0

    def slept_us(self) -> int:
        """Microseconds every vCPU slept for its quota, summed, since it started."""
        return int(self._live_rows()[:, SLEPT_US].sum())

    # -- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        # Drop our views of the segment, so that it can be unmapped now.
        self.words = np.empty(0)
        self.rows = np.empty((0, _ROW_WORDS))
        close_segment(self._shm)
        self._closed = True

    def unlink(self) -> None:
        unlink_segment(self._shm)


class DirtyLimiter:
    """A vCPU's own accounting and quota: :meth:`delay` before a chunk,
    :meth:`account` after it, :meth:`sleep` to wait (the vCPU loop's hook).
    A running vCPU's rate is published at the first chunk boundary after
    each period.

    Under a quota the chunks are spaced so that pages/s stays at the quota:
    the next chunk may start ``pages / quota`` after the previous one
    started.  No credit is kept for time spent idle or paused, so a vCPU
    that was slow cannot burst above its quota afterwards.
    """

    def __init__(self, area: DirtyArea, index: int, clock=time.monotonic):
        self.row = area.rows[index]
        self.words = area.words
        self._clock = clock
        self._quota = 0.0
        self._due = 0.0
        self._started = 0.0
        #: this vCPU is the counter's only writer: keep it as a Python number
        self._dirtied = float(self.row[DIRTIED])
        self.reset()

    def reset(self) -> None:
        """Start afresh (the vCPU resumes after a pause)."""
        now = self._clock()
        self._due = self._started = now
        self._new_window(now)

    def _new_window(self, now: float) -> None:
        """A rate-measuring period starts, as long as the coordinator says now."""
        self._window_start = now
        self._window_pages = 0
        self._window_slept = 0.0
        self._window_rounds = 0
        self._period = float(self.words[PERIOD_MS]) / 1000

    def delay(self, now: float) -> float:
        """Seconds to wait before the next chunk (<= 0: run it now).

        *now* is the vCPU loop's clock reading; the rate of a period that
        has passed is published here too.
        """
        if now - self._window_start >= self._period:
            self._publish(now)
        quota = float(self.row[QUOTA])
        if quota != self._quota:
            self._quota = quota
            self._due = now
        if not quota:
            self._started = now
            return 0.0
        wait = self._due - now
        if wait <= 0:
            self._started = now
        return wait

    def _publish(self, now: float) -> None:
        row = self.row
        elapsed = now - self._window_start
        row[RATE] = pages_to_mbps(self._window_pages, elapsed)
        row[ROUND_US] = self._window_slept * 1e6 / max(1, self._window_rounds)
        self._new_window(now)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
        self._window_slept += seconds
        self.row[SLEPT_US] += seconds * 1e6

    def account(self, pages: int) -> None:
        """After a chunk that marked *pages* pages."""
        self._dirtied += pages
        self.row[DIRTIED] = self._dirtied
        if self._quota:
            per_second = self._quota * _MIB / DIRTY_RATE_PAGE
            self._due = max(self._due, self._started) + pages / per_second
        self._window_pages += pages
        self._window_rounds += 1
