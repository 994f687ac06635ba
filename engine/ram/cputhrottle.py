"""The vCPU side of auto-converge: how long a throttled vCPU sleeps (QEMU's cpu-throttle.c).

QEMU's throttle timer makes every vCPU sleep ``pct / (1 - pct)`` of a 10 ms
timeslice after each timeslice it runs (cpu_throttle_thread), so a vCPU at
``pct`` percent runs ``1 - pct`` of the time.  The decision of *when* to
throttle is the migration's (:mod:`engine.migration.throttle`); this module
is below it so that the vCPU processes (:mod:`engine.ram.vcpu`) can apply it.
"""
from __future__ import annotations

__all__ = ["CPU_THROTTLE_TIMESLICE", "CPU_THROTTLE_PCT_MAX", "throttle_sleep"]

#: how long a throttled vCPU runs between sleeps, seconds (CPU_THROTTLE_TIMESLICE_NS)
CPU_THROTTLE_TIMESLICE = 0.010
#: the highest throttle (CPU_THROTTLE_PCT_MAX)
CPU_THROTTLE_PCT_MAX = 99


def throttle_sleep(percentage: int) -> float:
    """Seconds a vCPU sleeps after each timeslice at *percentage* throttle (0 = none)."""
    if percentage <= 0:
        return 0.0
    pct = min(percentage, CPU_THROTTLE_PCT_MAX) / 100.0
    return pct / (1.0 - pct) * CPU_THROTTLE_TIMESLICE
