"""``engine migrate``'s convergence watch: the time-out, the stall warning,
auto-converge's throttle and the guest's own progress.

The policy is :class:`~engine.migration.timeout.TimeoutPolicy` (sans-I/O);
this module only feeds it (the pass hook, a 100 ms poll) and carries out
what it decides on the :class:`~engine.migration.source.SourceMigration`:
``suspend`` = :meth:`switchover_now`, ``postcopy`` = :meth:`start_postcopy`,
``cancel`` = :meth:`cancel`.

The guest's progress is what its vCPUs say they did (register REG_PAGES:
pages written, summed over the vCPUs), sampled with the time and the
migration's status, so that the report can set its rate during the
migration against its rate before it (guestperf's ms per GiB): the cost of
auto-converge, seen from inside the guest.
"""
from __future__ import annotations

import contextlib
import threading
import time

from engine.errors import ConfigError, EngineError
from engine.migration.timeout import PRECOPY_STATUSES, TimeoutAction, TimeoutPolicy
from engine.trace import trace

__all__ = ["ConvergenceWatch", "timeout_policy", "guest_rates", "POLL_SECONDS"]

#: how often the watch looks at the clock, the status and the guest
POLL_SECONDS = 0.1
#: the progress line's flag while the precopy is stalled
STALLED = "STALLED"
GIB = 1 << 30


def timeout_policy(args, options) -> TimeoutPolicy:
    """The policy of ``--timeout``/``--timeout-action`` (ConfigError: exit 2)."""
    timeout = getattr(args, "timeout", None)
    action = getattr(args, "timeout_action", None)
    if action is not None and timeout is None:
        raise ConfigError(f"--timeout-action {action} needs --timeout SECONDS")
    try:
        return TimeoutPolicy(timeout, TimeoutAction(action or "suspend"),
                             postcopy_ram=options.cap("postcopy-ram"))
    except ConfigError as exc:
        raise ConfigError(f"--timeout-action {action}: {exc}") from None


def _pages_written(guest) -> int | None:
    from engine.ram.workloads import REG_PAGES
    try:
        regs = guest.registers
    except EngineError:
        return None
    if regs is None or not len(regs):
        return None
    return int(regs[:, REG_PAGES].sum())


def guest_rates(rows, page_size: int = 4096) -> dict:
    """The guest's pages/s before the migration, during its precopy (while
    the vCPUs run here), and over the last second before the switchover,
    from ``(t, status, pages)`` rows; with ms per GiB written and the
    slowdown (during / before).  A phase with under two rows reads None."""
    def rate(sel):
        if len(sel) < 2 or sel[-1][0] <= sel[0][0]:
            return None
        return (sel[-1][2] - sel[0][2]) / (sel[-1][0] - sel[0][0])

    rows = [r for r in rows if r[2] is not None]
    before = [r for r in rows if r[1] == "none"]
    # The precopy window, with the last row before it as its start.
    during = [r for r in rows if r[1] in PRECOPY_STATUSES]
    if before and during:
        during.insert(0, before[-1])
    last = [r for r in during if during and r[0] >= during[-1][0] - 1.0]
    out = {"pages-per-second-before": rate(before), "pages-per-second-during": rate(during),
           "pages-per-second-last-second": rate(last)}
    for key in ("before", "during", "last-second"):
        pps = out[f"pages-per-second-{key}"]
        out[f"ms-per-gib-{key}"] = (1000.0 * GIB / page_size / pps) if pps else None
    b, d, lst = (out[f"pages-per-second-{k}"] for k in ("before", "during", "last-second"))
    out["slowdown"] = (d / b) if b and d is not None else None
    out["slowdown-last-second"] = (lst / b) if b and lst is not None else None
    return out


class ConvergenceWatch:
    """A thread watching one source migration; ``with`` starts and stops it.

    Made when the guest is (so that the guest's rate before the migration is
    seen); :meth:`attach` gives it the migration.  :meth:`note_pass` is for
    ``SourceMigration.on_pass`` (it runs in the migration thread, right after
    the bitmap sync, when ``remaining`` is what the pass left).
    """

    def __init__(self, guest, policy: TimeoutPolicy, progress=None,
                 clock=time.monotonic):
        self.guest = guest
        self.policy = policy
        self.progress = progress
        self._clock = clock
        self.mig = None
        self.rows: list[tuple[float, str, int | None]] = []
        self.peak_throttle = 0
        self._t0: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="engine-converge", daemon=True)

    def attach(self, mig) -> None:
        self.mig = mig

    def start(self) -> "ConvergenceWatch":
        """Start watching (idempotent): as soon as the guest runs."""
        if self._thread.ident is None:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (idempotent); the last row is the final status and count."""
        if self._thread.ident is None or self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._poll()

    def __enter__(self) -> "ConvergenceWatch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_guest_writing(self, timeout: float) -> None:
        """Return once the guest's own rate before the migration can be read
        (two samples apart with pages written in between), or after *timeout*
        seconds (an idle guest, or vCPUs that start slowly, as on a cold
        machine compiling its modules).  Usually the destination's start-up
        has given it that time already, so this returns at once."""
        deadline = self._clock() + timeout
        while self._clock() < deadline and not self._stop.is_set():
            with self._lock:
                seen = [r[2] for r in self.rows if r[1] == "none" and r[2] is not None]
            if len(seen) >= 2 and seen[-1] > seen[0]:
                return
            time.sleep(POLL_SECONDS / 2)

    def note_pass(self, n: int) -> None:
        mig = self.mig
        if mig is None:
            return
        warning = self.policy.on_pass(n, mig.stats.remaining)
        if warning is not None:
            trace("migration_stalled", passes=n, remaining=mig.stats.remaining)
        if self.progress is not None:
            self.progress.warning = STALLED if self.policy.stalled else None

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._poll()

    def _poll(self) -> None:
        with self._lock:
            now = self._clock()
            mig = self.mig
            status = mig.state.status.value if mig is not None else "none"
            self.rows.append((now, status, _pages_written(self.guest)
                              if self.guest is not None and not self.guest.closed else None))
            if mig is None or status == "none":
                return
            if self._t0 is None:
                self._t0 = now
            if mig.autoconverge is not None:
                self.peak_throttle = max(self.peak_throttle, mig.autoconverge.percentage)
            action = self.policy.check(now - self._t0, status)
            if action is not None:
                self._act(mig, action)

    def _act(self, mig, action: TimeoutAction) -> None:
        trace("migration_timeout", action=action.value, timeout=self.policy.timeout)
        # A migration that just left precopy by itself refuses: nothing to do.
        with contextlib.suppress(EngineError):
            if action is TimeoutAction.SUSPEND:
                mig.switchover_now()
            elif action is TimeoutAction.POSTCOPY:
                mig.start_postcopy()
            else:
                mig.cancel()

    @property
    def warnings(self) -> list[str]:
        return list(self.policy.warnings)

    def report(self, page_size: int = 4096) -> dict:
        """The JSON report's ``convergence`` member."""
        with self._lock:
            rows = list(self.rows)
        out = self.policy.report()
        out["cpu-throttle-percentage"] = self.peak_throttle
        out["guest"] = guest_rates(rows, page_size)
        return out
