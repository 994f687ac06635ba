"""The time-out policy (virsh migrate --timeout) and the stall warning."""
from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.migration.timeout import STALL_PASSES, TimeoutAction, TimeoutPolicy

MB = 1 << 20


def test_fires_once_after_the_time_in_precopy():
    p = TimeoutPolicy(2.0, TimeoutAction.CANCEL)
    assert p.check(1.9, "active") is None
    assert p.check(2.0, "active") is TimeoutAction.CANCEL
    assert p.check(3.0, "active") is None            # once
    assert p.fired_at == 2.0
    assert p.report()["timed-out"] is True
    assert "timed out after 2 s in active: cancel" in p.warnings


@pytest.mark.parametrize("status", ["pre-switchover", "device", "postcopy-active",
                                    "completed", "failed", "cancelled"])
def test_no_action_once_precopy_is_over(status):
    p = TimeoutPolicy(1.0)
    assert p.check(10.0, status) is None
    assert p.fired_at is None


def test_no_timeout_never_fires():
    p = TimeoutPolicy(None)
    assert p.check(1e9, "active") is None


def test_default_action_is_suspend():
    assert TimeoutPolicy(1.0).check(1.0, "setup") is TimeoutAction.SUSPEND


def test_postcopy_action_needs_postcopy_ram():
    with pytest.raises(ConfigError, match="postcopy-ram"):
        TimeoutPolicy(1.0, TimeoutAction.POSTCOPY)
    TimeoutPolicy(1.0, TimeoutAction.POSTCOPY, postcopy_ram=True)


@pytest.mark.parametrize("bad", [0, -1.0])
def test_timeout_must_be_positive(bad):
    with pytest.raises(ConfigError):
        TimeoutPolicy(bad)


def test_stall_after_n_passes_without_a_new_low():
    p = TimeoutPolicy(None)
    assert p.on_pass(1, 128 * MB) is None           # setup: all of RAM
    assert p.on_pass(2, 40 * MB) is None            # new low
    warned = [p.on_pass(n, (41 + n % 2) * MB) for n in range(3, 3 + STALL_PASSES)]
    assert warned[:-1] == [None] * (STALL_PASSES - 1)
    assert warned[-1] is not None and f"for {STALL_PASSES} passes" in warned[-1]
    assert p.stalled and p.warnings == [warned[-1]]
    # Raised once, not at every pass after.
    assert p.on_pass(3 + STALL_PASSES, 42 * MB) is None
    assert len(p.warnings) == 1
    # A new low lifts it.
    assert p.on_pass(4 + STALL_PASSES, 10 * MB) is None
    assert not p.stalled


def test_a_converging_migration_never_stalls():
    p = TimeoutPolicy(None)
    remaining = 128 * MB
    for n in range(1, 30):
        assert p.on_pass(n, remaining) is None
        remaining = remaining * 9 // 10
    assert p.warnings == []


def test_the_same_pass_twice_counts_once():
    p = TimeoutPolicy(None, stall_passes=2)
    p.on_pass(1, 10 * MB)
    p.on_pass(2, 11 * MB)
    p.on_pass(2, 11 * MB)
    assert not p.stalled
    assert p.on_pass(3, 11 * MB) is not None


def test_noise_is_not_progress():
    # A random working set wobbles: 0.5 % new lows are not a fall.
    p = TimeoutPolicy(None)
    p.on_pass(1, 128 * MB)
    p.on_pass(2, 60 * MB)
    remaining = 60 * MB
    for n in range(3, 3 + STALL_PASSES):
        remaining = remaining * 995 // 1000
        p.on_pass(n, remaining)
    assert p.stalled
