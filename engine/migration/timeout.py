"""What to do about a precopy that does not converge: libvirt's migration time-out.

Sans-I/O: :class:`TimeoutPolicy` is told the time since the migration
started, its status, and at each dirty-bitmap pass what is still to send; it
answers with what to do, and whoever drives the migration does it.

* **Time-out** (virsh migrate ``--timeout``): once *timeout* seconds have
  passed and the migration is still in precopy (``setup`` or ``active``),
  the action fires, once:

  - ``suspend`` (libvirt's default, ``--timeout-suspend``): stop the guest
    and complete now, whatever downtime-limit says;
  - ``postcopy`` (``--timeout-postcopy``): migrate-start-postcopy;
  - ``cancel``: migrate_cancel (the source keeps running).

* **Stall** (a warning, no action): the remaining bytes measured right after
  a pass's bitmap sync have not fallen for :data:`STALL_PASSES` passes in a
  row, "fallen" meaning below the figure of the last pass that fell by more
  than :data:`STALL_MARGIN` (smaller moves are the noise of a random
  working set, and a precopy gaining a percent a pass is stalled in all
  but name).  Five: a converging
  precopy shrinks what is left at nearly every pass; one that cannot
  converge (the guest dirties faster than the link carries) settles on its
  working set and wobbles around it, so five passes without a new low tells
  the two apart without firing on the noise of one or two unlucky passes.
  The warning is lifted when a pass finds less than ever before.
"""
from __future__ import annotations

import enum

from engine.errors import ConfigError

__all__ = ["TimeoutAction", "TimeoutPolicy", "STALL_PASSES", "STALL_MARGIN", "PRECOPY_STATUSES"]

#: passes without a new low of remaining bytes before the stall warning
STALL_PASSES = 5
#: a pass "falls" when it leaves less than this share below the last fall
STALL_MARGIN = 0.05
#: statuses in which a time-out still has something to act on
PRECOPY_STATUSES = frozenset({"setup", "wait-unplug", "active"})


class TimeoutAction(enum.Enum):
    """What a time-out does (virsh: --timeout-suspend, --timeout-postcopy)."""

    SUSPEND = "suspend"
    POSTCOPY = "postcopy"
    CANCEL = "cancel"


class TimeoutPolicy:
    """Time-out and stall decisions for one migration.

    ``timeout`` is in seconds (None: never); ``postcopy_ram`` says whether the
    migration can switch to postcopy (the ``postcopy`` action needs it).
    """

    def __init__(self, timeout: float | None, action: TimeoutAction = TimeoutAction.SUSPEND,
                 *, postcopy_ram: bool = False, stall_passes: int = STALL_PASSES):
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"a migration time-out must be > 0 seconds, not {timeout}")
        if action is TimeoutAction.POSTCOPY and not postcopy_ram:
            raise ConfigError("the time-out action postcopy needs --cap postcopy-ram=on")
        if stall_passes < 1:
            raise ConfigError(f"stall_passes must be >= 1, not {stall_passes}")
        self.timeout = timeout
        self.action = action
        self.stall_passes = stall_passes
        #: when the action fired (seconds since the start), None if it has not
        self.fired_at: float | None = None
        #: remaining bytes after the last pass that fell, passes since, the lowest
        self._mark: int | None = None
        self._lowest: int | None = None
        self._since_low = 0
        self._last_pass = 0
        #: every warning raised so far, in order (the JSON report's ``warnings``)
        self.warnings: list[str] = []
        self.stalled = False

    def on_pass(self, passes: int, remaining: int) -> str | None:
        """Pass number *passes* has synced the bitmap; *remaining* bytes are
        dirty.  Returns the stall warning when this pass raises it."""
        if passes <= self._last_pass:
            return None         # the same pass seen twice
        self._last_pass = passes
        self._lowest = remaining if self._lowest is None else min(self._lowest, remaining)
        if self._mark is None or remaining < self._mark * (1 - STALL_MARGIN):
            self._mark = remaining
            self._since_low = 0
            self.stalled = False
            return None
        self._since_low += 1
        if self._since_low < self.stall_passes or self.stalled:
            return None
        self.stalled = True
        warning = (f"stalled: remaining RAM has not fallen for {self._since_low} passes "
                   f"(pass {passes}, {remaining >> 20} MiB left, lowest "
                   f"{self._lowest >> 20} MiB): the guest dirties memory faster than "
                   "the migration sends it")
        self.warnings.append(warning)
        return warning

    def check(self, elapsed: float, status: str) -> TimeoutAction | None:
        """The action to take now, once: *elapsed* seconds since the
        migration started, in *status* (QEMU's name)."""
        if self.timeout is None or self.fired_at is not None:
            return None
        if status not in PRECOPY_STATUSES or elapsed < self.timeout:
            return None
        self.fired_at = elapsed
        self.warnings.append(f"timed out after {self.timeout:g} s in {status}: "
                             f"{self.action.value}")
        return self.action

    def report(self) -> dict:
        """The JSON report's view."""
        return {"timeout": self.timeout, "timeout-action": self.action.value,
                "timed-out": self.fired_at is not None,
                "timed-out-after": self.fired_at, "stalled": self.stalled,
                "passes": self._last_pass,
                "stall-passes": self.stall_passes}
