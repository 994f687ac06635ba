"""auto-converge: when to throttle the guest's vCPUs and how hard (QEMU's ram.c and cpu-throttle.c).

Sans-I/O: :class:`ThrottleTrigger` is told what each dirty-bitmap sync saw
(bytes sent and bytes dirtied since the previous one) and answers with the
throttle percentage the vCPUs should run at; who applies it (a value the vCPU
processes read) is the caller's business.

QEMU's rule (migration_trigger_throttle): when the bytes dirtied in a sync
period exceed throttle-trigger-threshold percent of the bytes transferred in
it, for the second time, throttle: cpu-throttle-initial the first time, then
cpu-throttle-increment more each time, capped at max-cpu-throttle.  With
cpu-throttle-tailslow the increment shrinks near the end to what would just
bring the dirty rate under the threshold (mig_throttle_guest_down).

A throttled vCPU sleeps ``pct / (1 - pct)`` of a 10 ms timeslice after each
timeslice it runs (cpu_throttle_thread), so it runs ``1 - pct`` of the time.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.ram.cputhrottle import CPU_THROTTLE_TIMESLICE, throttle_sleep

__all__ = ["CPU_THROTTLE_TIMESLICE", "ThrottleTrigger", "throttle_sleep", "ThrottleParams"]


@dataclass(frozen=True)
class ThrottleParams:
    """The migration parameters auto-converge reads (QEMU's names, QEMU's defaults)."""

    throttle_trigger_threshold: int = 50
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    cpu_throttle_tailslow: bool = False
    max_cpu_throttle: int = 99

    @classmethod
    def from_options(cls, params) -> "ThrottleParams":
        """From a parameter mapping keyed by QMP names (engine.options' parameters)."""
        return cls(
            throttle_trigger_threshold=int(params["throttle-trigger-threshold"]),
            cpu_throttle_initial=int(params["cpu-throttle-initial"]),
            cpu_throttle_increment=int(params["cpu-throttle-increment"]),
            cpu_throttle_tailslow=bool(params["cpu-throttle-tailslow"]),
            max_cpu_throttle=int(params["max-cpu-throttle"]),
        )


class ThrottleTrigger:
    """The throttle decision, one dirty-bitmap sync at a time.

    ``percentage`` is the current throttle (0: not throttling);
    ``high_periods`` counts periods over the threshold since the last change.
    """

    def __init__(self, params: ThrottleParams):
        self.params = params
        self.percentage = 0
        self.high_periods = 0
        self.changes = 0

    def on_sync(self, bytes_transferred: int, bytes_dirtied: int) -> int:
        """One sync period's figures in; the throttle percentage to run at out."""
        threshold = bytes_transferred * self.params.throttle_trigger_threshold // 100
        if bytes_dirtied > threshold:
            self.high_periods += 1
            if self.high_periods >= 2:
                self.high_periods = 0
                self._throttle_down(bytes_dirtied, threshold)
        return self.percentage

    def _throttle_down(self, dirtied: int, threshold: int) -> None:
        p = self.params
        if self.percentage == 0:
            new = p.cpu_throttle_initial
        else:
            inc = p.cpu_throttle_increment
            if p.cpu_throttle_tailslow and dirtied:
                # The share of CPU that would dirty just the threshold; the
                # step is what separates it from now, never more than the
                # increment.
                cpu_now = 100 - self.percentage
                cpu_ideal = cpu_now * (threshold / dirtied)
                inc = min(int(cpu_now - cpu_ideal), inc)
            new = self.percentage + inc
        self.percentage = max(0, min(new, p.max_cpu_throttle))
        self.changes += 1

    def stop(self) -> None:
        """Switchover or cancel: the guest runs at full speed again (cpu_throttle_stop)."""
        self.percentage = 0
        self.high_periods = 0
