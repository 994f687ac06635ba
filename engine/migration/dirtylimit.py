"""The dirty-limit capability on the source (QEMU's ram.c migration_dirty_limit_guest).

QEMU applies ``vcpu-dirty-limit`` to every vCPU when the migration does not
converge, by the rule auto-converge uses, over the same periods (at most one a
second, :class:`~engine.migration.autoconverge.SyncPeriods`): the bytes
dirtied in a dirty-bitmap sync period exceed ``throttle-trigger-threshold`` percent of the
bytes sent in it, for the second time (:class:`ThrottleTrigger` decides).
It re-applies the quota only when the parameter changed since, measures the
vCPUs' rates over ``x-vcpu-dirty-limit-period`` meanwhile, and cancels the
limit when the migration ends, however it ends.

query-migrate's two figures, while the limit is in service, mean here:

* ``dirty-limit-throttle-time-per-round``: the longest sleep per round any
  vCPU took in its last period, µs (QEMU: the longest sleep per dirty-ring
  full; a round here is one chunk of the vCPU's work);
* ``dirty-limit-ring-full-time``: the time the vCPUs spent sleeping for
  their quota since this migration applied it, summed, µs (QEMU: an estimate
  of the time to fill a dirty ring; what a user reads from it, how much the
  guest is held back, is this).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from engine.migration.autoconverge import SyncPeriods
from engine.migration.throttle import ThrottleParams, ThrottleTrigger
from engine.ram.dirtylimit import DEFAULT_PERIOD_MS, DirtyArea
from engine.trace import trace

if TYPE_CHECKING:
    from engine.options import MigrationOptions

__all__ = ["DirtyLimitSource"]


class DirtyLimitSource:
    """The source's collaborator for dirty-limit: told of every bitmap sync."""

    def __init__(self, options: Callable[[], MigrationOptions], guest: object,
                 page_size: int):
        # The migration's options change with migrate-set-parameters: ask each time.
        self._options = options
        self.page_size = page_size
        # A guest without a dirty area (not an engine.ram Guest) has nothing to limit.
        self.area: DirtyArea | None = (getattr(guest, "dirty_area", None)
                                       if options().cap("dirty-limit") else None)
        self.trigger = ThrottleTrigger(ThrottleParams(
            throttle_trigger_threshold=int(options().param("throttle-trigger-threshold"))))
        self.periods = SyncPeriods()
        self.quota = 0
        self._slept_before = 0

    @property
    def enabled(self) -> bool:
        return self.area is not None

    def on_sync(self, new_dirty_pages: int, transferred: int) -> None:
        """A dirty-bitmap sync found *new_dirty_pages*; *transferred* bytes sent so far."""
        if self.area is None:
            return
        period = self.periods.on_sync(new_dirty_pages, transferred, self.page_size)
        if period is None:
            return
        # The threshold may have changed (migrate-set-parameters) since the last period.
        self.trigger.params = ThrottleParams(throttle_trigger_threshold=int(
            self._options().param("throttle-trigger-threshold")))
        changes = self.trigger.changes
        self.trigger.on_sync(*period)
        if self.trigger.changes != changes:
            self.apply()

    def apply(self) -> None:
        """Limit every vCPU to vcpu-dirty-limit (a no-op if already at it)."""
        options = self._options()
        quota = int(options.param("vcpu-dirty-limit"))
        area = self.area
        assert area is not None     # on_sync returns early without one
        if quota == self.quota and area.in_service:
            return
        if not self.quota:
            self._slept_before = area.slept_us()
        area.period_ms = int(options.param("x-vcpu-dirty-limit-period"))
        area.set_limit(quota)
        self.quota = quota
        trace("migration_dirty_limit_guest", quota=quota)

    def stop(self) -> None:
        """The migration ended: the vCPUs run unlimited again (idempotent)."""
        if self.area is None or not self.quota:
            return
        self.quota = 0
        try:
            self.area.cancel()
            self.area.period_ms = DEFAULT_PERIOD_MS
        except Exception:   # the guest is already gone: nothing left to limit
            pass

    def info_fields(self) -> dict:
        """query-migrate's dirty-limit members (only while the limit is in service)."""
        area = self.area
        if not self.quota or area is None:
            return {}
        return {"dirty-limit-throttle-time-per-round": area.throttle_time_per_round(),
                "dirty-limit-ring-full-time": area.slept_us() - self._slept_before}
