"""auto-converge's throttle decision, period by period, as QEMU's ram.c makes it."""
from __future__ import annotations

import pytest

from engine.migration.throttle import (CPU_THROTTLE_TIMESLICE, ThrottleParams, ThrottleTrigger,
                                       throttle_sleep)

MB = 1 << 20


def test_throttles_on_the_second_high_period_then_steps_up_to_the_cap():
    t = ThrottleTrigger(ThrottleParams(cpu_throttle_initial=30, cpu_throttle_increment=25,
                                       max_cpu_throttle=70))
    assert t.on_sync(100 * MB, 60 * MB) == 0     # over 50%: first time, nothing yet
    assert t.on_sync(100 * MB, 60 * MB) == 30    # second time: initial
    assert t.on_sync(100 * MB, 60 * MB) == 30    # the count starts again
    assert t.on_sync(100 * MB, 60 * MB) == 55    # + increment
    t.on_sync(100 * MB, 60 * MB)
    assert t.on_sync(100 * MB, 60 * MB) == 70    # capped by max-cpu-throttle


def test_a_period_under_the_threshold_does_not_reset_the_count():
    # QEMU counts high periods without resetting on a low one
    t = ThrottleTrigger(ThrottleParams())
    t.on_sync(100 * MB, 60 * MB)
    t.on_sync(100 * MB, 10 * MB)
    assert t.on_sync(100 * MB, 60 * MB) == 20


def test_tailslow_steps_only_as_far_as_the_threshold_needs():
    t = ThrottleTrigger(ThrottleParams(cpu_throttle_tailslow=True, cpu_throttle_increment=10))
    t.on_sync(100 * MB, 60 * MB)
    assert t.on_sync(100 * MB, 60 * MB) == 20
    # cpu now 80%; 52 MB dirtied against a 50 MB threshold -> ideal 76.9%, step 3
    t.on_sync(100 * MB, 52 * MB)
    assert t.on_sync(100 * MB, 52 * MB) == 23


def test_stop_lifts_the_throttle():
    t = ThrottleTrigger(ThrottleParams())
    t.on_sync(1, 1)
    assert t.on_sync(1, 1) == 20
    t.stop()
    assert t.percentage == 0


@pytest.mark.parametrize("pct, sleep", [(0, 0.0), (50, CPU_THROTTLE_TIMESLICE),
                                        (75, 3 * CPU_THROTTLE_TIMESLICE)])
def test_sleep_per_timeslice(pct, sleep):
    assert throttle_sleep(pct) == pytest.approx(sleep)
