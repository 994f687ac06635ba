"""auto-converge's periods on the source (migration_bitmap_sync's one-second
rule) and the vCPUs' side of the throttle, under a fake clock."""
from __future__ import annotations

from engine.migration.autoconverge import THROTTLE_PERIOD, AutoConverge
from engine.options import MigrationOptions
from engine.ram.cputhrottle import CPU_THROTTLE_TIMESLICE, throttle_sleep

MB = 1 << 20
PAGE = 4096


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _make(**params):
    options = MigrationOptions.default().with_capabilities(
        {"auto-converge": True}).with_parameters(params)
    applied: list[int] = []
    clock = Clock()
    return AutoConverge(lambda: options, applied.append, clock), applied, clock


def test_first_sync_only_starts_the_period():
    ac, applied, clock = _make()
    # All of RAM is dirty at the first sync: it must not count as dirtied.
    assert ac.on_sync(1 << 20, 0, PAGE) == 0
    clock.t += 5
    assert ac.on_sync(0, 100 * MB, PAGE) == 0       # nothing dirtied since
    assert applied == []


def test_throttles_on_the_second_high_period_and_applies_each_change():
    ac, applied, clock = _make(**{"cpu-throttle-initial": 30, "cpu-throttle-increment": 20})
    ac.on_sync(0, 0, PAGE)
    sent = 0
    for expected in (0, 30, 30, 50):
        clock.t += THROTTLE_PERIOD + 0.1
        sent += 10 * MB
        # 8 MB dirtied against 10 MB sent: over the 50 % threshold
        assert ac.on_sync(8 * MB // PAGE, sent, PAGE) == expected
    assert applied == [30, 50]
    assert ac.percentage == 50


def test_syncs_within_a_second_add_up_into_one_period():
    ac, applied, clock = _make()
    ac.on_sync(0, 0, PAGE)
    sent = 0
    # Four quick syncs, each dirtying 3 MB against 10 MB sent (30 %, under the
    # threshold alone); the period they add up to is 12 MB against 10 MB.
    for _ in range(2):
        for _ in range(4):
            clock.t += 0.3
            ac.on_sync(3 * MB // PAGE, sent, PAGE)
        sent += 10 * MB
        clock.t += 0.1
        ac.on_sync(0, sent, PAGE)
    assert ac.percentage == 20
    assert applied == [20]


def test_no_decision_while_the_guest_is_stopped():
    ac, applied, clock = _make()
    ac.on_sync(0, 0, PAGE)
    for n in range(1, 4):
        clock.t += 2
        ac.on_sync(8 * MB // PAGE, n * 10 * MB, PAGE, guest_running=False)
    assert ac.percentage == 0 and applied == []


def test_parameters_are_read_at_each_period():
    options = [MigrationOptions.default()]
    applied: list[int] = []
    clock = Clock()
    ac = AutoConverge(lambda: options[0], applied.append, clock)
    ac.on_sync(0, 0, PAGE)
    options[0] = options[0].with_parameters({"cpu-throttle-initial": 45})
    for n in range(1, 3):
        clock.t += 2
        ac.on_sync(8 * MB // PAGE, n * 10 * MB, PAGE)
    assert applied == [45]


def test_release_keeps_the_figure_stop_clears_it():
    ac, applied, clock = _make()
    ac.on_sync(0, 0, PAGE)
    for n in range(1, 3):
        clock.t += 2
        ac.on_sync(8 * MB // PAGE, n * 10 * MB, PAGE)
    assert applied == [20]
    ac.release()                 # switchover: the vCPUs must not sleep any more
    assert applied == [20, 0] and ac.percentage == 20
    ac.stop()                    # the end: nothing on show either
    assert applied == [20, 0] and ac.percentage == 0


def test_vcpu_sleep_share_matches_the_percentage():
    for pct in (20, 50, 80, 99):
        sleep = throttle_sleep(pct)
        share = sleep / (sleep + CPU_THROTTLE_TIMESLICE)
        assert abs(share - pct / 100) < 1e-9
