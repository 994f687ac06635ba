"""auto-converge on the source: throttle periods and the vCPUs' share.

QEMU's migration_bitmap_sync looks at the dirty rate at most once a second:
each sync adds the pages it found newly dirty to the period's count, and
once more than a second has passed since the period began the period's
figures (bytes sent, bytes dirtied) go to migration_trigger_throttle and a
new period starts.  :class:`AutoConverge` is that bookkeeping around the
sans-I/O :class:`~engine.migration.throttle.ThrottleTrigger`; the percentage
it decides is handed to ``apply`` (the guest's vCPUs read it every 10 ms
timeslice, :mod:`engine.ram.cputhrottle`).

Throttling ends with the migration (QEMU's cpu_throttle_stop in
migration_cleanup): :meth:`release` when the vCPUs stop for the switchover
(the figure stays visible in query-migrate, as QEMU shows it at
pre-switchover), :meth:`stop` at the end, whatever the end (the guest runs at
full speed again after a cancel or a failure).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from engine.migration.throttle import ThrottleParams, ThrottleTrigger
from engine.trace import trace

if TYPE_CHECKING:
    from engine.options import MigrationOptions

__all__ = ["AutoConverge", "SyncPeriods", "THROTTLE_PERIOD", "throttle_params"]

#: seconds a throttle period lasts at least (migration_bitmap_sync's 1000 ms)
THROTTLE_PERIOD = 1.0

_PARAMETERS = ("throttle-trigger-threshold", "cpu-throttle-initial", "cpu-throttle-increment",
               "cpu-throttle-tailslow", "max-cpu-throttle")


def throttle_params(options) -> ThrottleParams:
    """The throttle's parameters from a :class:`~engine.options.MigrationOptions`."""
    return ThrottleParams.from_options({n: options.param(n) for n in _PARAMETERS})


class SyncPeriods:
    """migration_bitmap_sync's look at the dirty rate, at most once a second:
    :meth:`on_sync` returns ``(bytes sent, bytes dirtied)`` of a period that
    just ended, else None.  Both auto-converge and dirty-limit are triggered
    from these periods, as QEMU's migration_trigger_throttle serves both."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._start: float | None = None
        self._dirty_pages = 0
        self._xfer_prev = 0

    def on_sync(self, new_dirty_pages: int, transferred: int,
                page_size: int) -> tuple[int, int] | None:
        now = self._clock()
        if self._start is None:
            # The first sync (ram_init_bitmaps) finds all of RAM dirty: it
            # only starts the first period.
            self._begin(now, transferred)
            return None
        self._dirty_pages += new_dirty_pages
        if now <= self._start + THROTTLE_PERIOD:
            return None
        period = (transferred - self._xfer_prev, self._dirty_pages * page_size)
        self._begin(now, transferred)
        return period

    def _begin(self, now: float, transferred: int) -> None:
        self._start = now
        self._dirty_pages = 0
        self._xfer_prev = transferred


class AutoConverge:
    """The throttle of one outgoing migration.

    ``options`` is called at each period's end (QEMU reads the parameters
    then, so migrate-set-parameters applies to the running migration);
    ``apply(percentage)`` sets the vCPUs' throttle; ``clock`` is injected.
    """

    def __init__(self, options: Callable[[], object], apply: Callable[[int], None],
                 clock: Callable[[], float] = time.monotonic):
        self._options = options
        self._apply = apply
        self.periods = SyncPeriods(clock)
        self.trigger = ThrottleTrigger(throttle_params(options()))
        self._applied = 0

    @property
    def percentage(self) -> int:
        """The throttle decided so far (0: not throttling); query-migrate's
        ``cpu-throttle-percentage``."""
        return self.trigger.percentage

    def on_sync(self, new_dirty_pages: int, transferred: int, page_size: int,
                guest_running: bool = True) -> int:
        """A dirty-bitmap sync found *new_dirty_pages*; *transferred* is the
        migration's bytes sent so far.  Returns the throttle percentage."""
        period = self.periods.on_sync(new_dirty_pages, transferred, page_size)
        if period is not None and guest_running:
            self.trigger.params = throttle_params(self._options())
            before = self.percentage
            pct = self.trigger.on_sync(*period)
            if pct != before:
                trace("cpu_throttle_set", new_throttle_pct=pct)
                self._set(pct)
        return self.percentage

    def _set(self, pct: int) -> None:
        if pct != self._applied:
            self._apply(pct)
            self._applied = pct

    def release(self) -> None:
        """The vCPUs stop for the switchover: they must not sleep when they run
        again; the percentage stays on show until :meth:`stop`."""
        self._set(0)

    def stop(self) -> None:
        """The migration is over (completed, cancelled or failed): no throttle."""
        self.trigger.stop()
        self._set(0)


def for_migration(options: Callable[[], MigrationOptions], guest: object
                  ) -> AutoConverge | None:
    """The throttle of a migration of *guest* whose options are ``options()``,
    or None without the ``auto-converge`` capability.  A guest with no vCPUs
    to slow (a library user's own memory) gets the figures without effect."""
    if not options().cap("auto-converge"):
        return None
    apply = getattr(guest, "set_throttle", None) or (lambda pct: None)
    return AutoConverge(options, apply)
