"""The convergence watch's sans-I/O parts: the guest's rates, the progress
line's throttle and stall fields, the time-out options."""
from __future__ import annotations

import argparse

import pytest

from engine.commands.common import format_progress, progress_fields
from engine.commands.converge import GIB, STALLED, guest_rates, timeout_policy
from engine.errors import ConfigError
from engine.migration.timeout import TimeoutAction
from engine.options import MigrationOptions
from engine.telemetry import Sample


def _sample(throttle=0):
    return Sample(t=1.0, status="active", passes=3, transferred=10 << 20, remaining=20 << 20,
                  total=64 << 20, dirty_pages_rate=1000, page_size=4096, mbps=100.0,
                  throughput=30 << 20, throttle=throttle)


def test_guest_rates_before_during_and_last_second():
    rows = [(0.0, "none", 0), (1.0, "none", 1000),          # 1000 pages/s before
            (2.0, "setup", 2000), (3.0, "active", 2500),
            (4.0, "active", 2700), (5.0, "active", 2800),   # 100 pages/s at the end
            (5.5, "device", 2800), (6.0, "completed", 2800)]
    r = guest_rates(rows)
    assert r["pages-per-second-before"] == 1000
    assert r["pages-per-second-during"] == pytest.approx((2800 - 1000) / 4)
    assert r["pages-per-second-last-second"] == pytest.approx(100)
    assert r["slowdown-last-second"] == pytest.approx(0.1)
    assert r["ms-per-gib-before"] == pytest.approx(1000 * GIB / 4096 / 1000)


def test_guest_rates_without_rows_are_none():
    r = guest_rates([(0.0, "active", None)])
    assert r["pages-per-second-before"] is None and r["slowdown"] is None


def test_progress_line_shows_throttle_and_stall_only_when_there():
    assert "throttle" not in progress_fields(_sample(), 3.0)
    fields = progress_fields(_sample(throttle=45), 3.0, STALLED)
    assert fields["throttle"] == "throttle 45%" and fields["warning"] == STALLED
    # A narrow terminal drops the throttle before the status, what is left, the ETA
    # and the warning.
    line = format_progress(_sample(throttle=45), 3.0, 60, STALLED)
    assert "throttle" not in line and line.endswith(STALLED) and len(line) < 60


def _args(timeout=None, action=None):
    return argparse.Namespace(timeout=timeout, timeout_action=action)


def test_timeout_options():
    plain = MigrationOptions.default()
    assert timeout_policy(_args(), plain).timeout is None
    assert timeout_policy(_args(5.0), plain).action is TimeoutAction.SUSPEND
    with pytest.raises(ConfigError, match="needs --timeout"):
        timeout_policy(_args(None, "cancel"), plain)
    with pytest.raises(ConfigError, match="postcopy-ram"):
        timeout_policy(_args(5.0, "postcopy"), plain)
    pc = plain.with_capabilities({"postcopy-ram": True})
    assert timeout_policy(_args(5.0, "postcopy"), pc).action is TimeoutAction.POSTCOPY
