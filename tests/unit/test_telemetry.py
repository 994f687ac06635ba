"""The sampler: rows from query-migrate, throughput from deltas, events, the thread."""
from __future__ import annotations

import threading
import time

import pytest

from engine.state import MigrationState
from engine.stats import MigrationInfo, RamStats
from engine.telemetry import (MIN_THROUGHPUT_SPAN, MigrationSampler, Sample, Timeline,
                              derive_events)

MIB = 1 << 20


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Script:
    """An ``info()`` whose answer the test sets."""

    def __init__(self):
        self.info = MigrationInfo("none")
        self.calls = 0

    def set(self, status, transferred=0, remaining=0, passes=0, dirty=0, total=64 * MIB):
        ram = RamStats(transferred=transferred, remaining=remaining, total=total,
                       dirty_sync_count=passes, dirty_pages_rate=dirty, mbps=1.5)
        self.info = MigrationInfo(status, total_time=10, ram=ram)

    def __call__(self):
        self.calls += 1
        return self.info


@pytest.fixture
def rig():
    clock, script = Clock(), Script()
    return clock, script, MigrationSampler(script, clock=clock, window=0.5)


def test_sample_reads_query_migrate(rig):
    clock, script, sampler = rig
    script.set("active", transferred=3 * MIB, remaining=40 * MIB, passes=2, dirty=256)
    clock.t += 0.25
    s = sampler.sample()
    assert (s.t, s.status, s.passes, s.transferred, s.remaining, s.total) == \
        (0.25, "active", 2, 3 * MIB, 40 * MIB, 64 * MIB)
    assert s.dirty_pages_rate == 256 and s.dirty_rate == 256 * 4096
    assert s.mbps == 1.5
    assert sampler.latest == s and sampler.samples == [s]


def test_throughput_from_transferred_deltas_over_the_window(rig):
    clock, script, sampler = rig
    rows = []
    for i in range(10):                      # 10 MiB per 0.1 s = 100 MiB/s
        script.set("active", transferred=i * 10 * MIB)
        rows.append(sampler.sample())
        clock.t += 0.1
    assert rows[0].throughput == 0.0                 # nothing to compare with yet
    assert rows[-1].throughput == pytest.approx(100 * MIB)
    # then nothing moves: the rate falls to 0 within a window
    for _ in range(6):
        rows.append(sampler.sample())
        clock.t += 0.1
    assert rows[-1].throughput == 0.0
    assert rows[-3].throughput > 0.0          # not at once: over the window


def test_first_milliseconds_do_not_make_a_rate(rig):
    clock, script, sampler = rig
    script.set("active", transferred=0)
    sampler.sample()
    clock.t += MIN_THROUGHPUT_SPAN / 10
    script.set("active", transferred=5 * MIB)          # a burst: 1 GiB/s if believed
    assert sampler.sample().throughput == 0.0
    clock.t += MIN_THROUGHPUT_SPAN
    assert sampler.sample().throughput == pytest.approx(5 * MIB / (MIN_THROUGHPUT_SPAN * 1.1))


def test_status_without_ram_keeps_the_counters(rig):
    clock, script, sampler = rig
    script.set("active", transferred=7 * MIB, remaining=3 * MIB, passes=4)
    sampler.sample()
    script.info = MigrationInfo("failed", error_desc="boom")    # query-migrate: status only
    clock.t += 0.1
    s = sampler.sample()
    assert (s.status, s.transferred, s.remaining, s.passes) == ("failed", 7 * MIB, 3 * MIB, 4)


def _rows(spec):
    """(t, status, passes) -> samples."""
    return [Sample(t=t, status=st, passes=n, transferred=0, remaining=0, total=0,
                   dirty_pages_rate=0, page_size=4096, mbps=0.0, throughput=0.0)
            for t, st, n in spec]


def test_events_from_samples_alone():
    samples = _rows([(0.0, "setup", 0), (0.1, "active", 0), (0.2, "active", 1),
                     (0.3, "active", 3), (0.4, "postcopy-active", 4),
                     (0.5, "completed", 5)])
    ev = derive_events(samples)
    kinds = [(e.t, e.kind, e.label) for e in ev if e.kind != "status"]
    assert kinds == [
        (0.2, "pass", "pass 1"), (0.3, "pass", "pass 2"), (0.3, "pass", "pass 3"),
        # device was never seen: the switchover is placed at the first status
        # only reached after it, with postcopy's start
        (0.4, "switchover", "switchover"), (0.4, "postcopy", "postcopy"),
        (0.5, "end", "completed")]
    assert [e.label for e in ev if e.kind == "status"] == \
        ["setup", "active", "postcopy-active", "completed"]


def test_a_failure_is_no_switchover():
    ev = derive_events(_rows([(0.0, "active", 0), (0.1, "failed", 0)]))
    assert [(e.kind, e.label) for e in ev if e.kind != "status"] == [("end", "failed")]


def test_exact_marks_win_over_samples():
    samples = _rows([(0.1, "active", 0), (0.2, "active", 2), (0.3, "completed", 3)])
    statuses = [(0.0, "setup"), (0.05, "active"), (0.25, "device"), (0.28, "completed")]
    ev = derive_events(samples, statuses, passes=[(0.12, 1), (0.17, 2)])
    marks = [(e.t, e.kind) for e in ev if e.kind != "status"]
    # pass 3 (the switchover's own sync, seen only in 'completed') is not marked
    assert marks == [(0.12, "pass"), (0.17, "pass"), (0.25, "switchover"), (0.28, "end")]


def test_hooks_give_exact_times_and_the_origin(rig):
    clock, script, sampler = rig
    clock.t += 1.0                           # time before the migration starts
    sampler.sample()                         # status none: not part of the run
    state = MigrationState("source", on_change=sampler.note_status, clock=clock)
    clock.t += 0.5
    state.transition("setup")                # t = 0 from here on
    clock.t += 0.01
    state.transition("active")
    script.set("active", transferred=1 * MIB, remaining=60 * MIB)
    clock.t += 0.09
    sampler.sample()
    clock.t += 0.1
    sampler.note_pass(1)
    script.set("active", transferred=20 * MIB, remaining=10 * MIB, passes=1)
    sampler.sample()
    clock.t += 0.05
    state.transition("device")
    clock.t += 0.02
    state.transition("completed")
    script.set("completed", transferred=30 * MIB, remaining=0, passes=2)
    clock.t += 0.03
    sampler.sample()
    clock.t += 0.5                           # the caller goes on (verifying memory)
    sampler.sample()
    sampler.sample()
    tl = sampler.timeline()
    assert [round(s.t, 3) for s in tl.samples] == [0.1, 0.2, 0.3]
    marks = [(round(e.t, 3), e.kind, e.label) for e in tl.events]
    assert marks == [(0.0, "status", "setup"), (0.01, "status", "active"),
                     (0.2, "pass", "pass 1"),
                     (0.25, "status", "device"), (0.25, "switchover", "switchover"),
                     (0.27, "status", "completed"), (0.27, "end", "completed")]
    assert tl.first("switchover").t == pytest.approx(0.25)
    assert tl.first("postcopy") is None
    assert tl.final.status == "completed"
    assert tl.duration == pytest.approx(0.3)


def test_note_status_never_calls_info():
    # It runs under the migration state's lock; info() takes the migration's
    # lock, and then the state's: calling it from the hook could deadlock.
    script = Script()
    sampler = MigrationSampler(script)
    sampler.note_status("active", "device")
    sampler.note_pass(3)
    assert script.calls == 0


def test_empty_timeline():
    tl = MigrationSampler(Script()).timeline()
    assert tl == Timeline((), (), None) and tl.duration == 0.0


def test_thread_samples_and_stop_records_the_end():
    script = Script()
    script.set("active", transferred=1)
    seen = []
    sampler = MigrationSampler(script, period=0.01, on_sample=seen.append)
    with sampler:
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        script.set("completed", transferred=2)
    assert len(seen) >= 3
    assert sampler.latest.status == "completed"       # the sample stop() takes
    n = len(sampler.samples)
    time.sleep(0.05)
    assert len(sampler.samples) == n                  # and the thread is gone
    assert not any(t.name == "engine-sampler" for t in threading.enumerate())


def test_a_hook_wakes_the_thread_at_once():
    script = Script()
    script.set("active")
    sampler = MigrationSampler(script, period=60.0)     # would otherwise sleep a minute
    with sampler:
        deadline = time.monotonic() + 10
        while not sampler.samples and time.monotonic() < deadline:
            time.sleep(0.005)
        script.set("device")
        sampler.note_status("active", "device")
        while sampler.latest.status != "device" and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sampler.latest.status == "device"
