"""Dirty-rate measurement and per-vCPU dirty limits on guests with real vCPUs.

Workloads of known rate (``random`` and ``ab`` paced to a MB/s figure):
the bitmap modes must land within 20 %, page sampling within 30 %.  The
sizes keep repeats rare in the window (the bitmap modes count a page once).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.errors import InvalidParameterError
from engine.ram import Guest, WorkloadSpec
from engine.ram.dirtylimit import DirtyLimiter, DirtyArea
from engine.ram.dirtyrate import measure_dirty_rate

MiB = 1 << 20


@pytest.fixture(params=["random", "ab"])
def paced_guest(request):
    rate = 32
    with Guest.create([("pc.ram", 256 * MiB)], vcpus=2,
                      workload=WorkloadSpec(request.param, rate)) as guest:
        time.sleep(0.3)     # ab zeroes its slices first
        yield guest, rate


@pytest.mark.parametrize("mode,tolerance", [("dirty-bitmap", 0.2), ("dirty-ring", 0.2),
                                            ("page-sampling", 0.3)])
def test_measured_rate_matches_the_workload(paced_guest, mode, tolerance):
    guest, rate = paced_guest
    sample = 16384 if mode == "page-sampling" else 512
    result = measure_dirty_rate(guest, mode, 1000, sample, seed=1)
    assert abs(result.dirty_rate - rate) <= tolerance * rate, (mode, result)
    assert 950 <= result.calc_time_ms <= 1500
    if mode == "dirty-ring":
        assert len(result.vcpu_rates) == 2
        assert sum(result.vcpu_rates) == result.dirty_rate
        for r in result.vcpu_rates:     # the rate is shared evenly
            assert abs(r - rate / 2) <= tolerance * rate


def test_bitmap_measurement_leaves_the_migration_log_alone():
    with Guest.create([("pc.ram", 64 * MiB)], vcpus=1,
                      workload=WorkloadSpec("random", 16)) as guest:
        time.sleep(0.2)
        guest.stop()
        log = guest.dirty_log("pc.ram")
        before = log.log.copy()
        assert before.any()
        guest.start()
        measure_dirty_rate(guest, "dirty-bitmap", 200)
        guest.stop()
        # Nothing the vCPU marked before was cleared by the measurement.
        assert (log.log[before.nonzero()] == 1).all()


def test_idle_guest_measures_zero():
    with Guest.create([("pc.ram", 64 * MiB)], vcpus=1) as guest:
        for mode in ("page-sampling", "dirty-bitmap", "dirty-ring"):
            assert measure_dirty_rate(guest, mode, 100).dirty_rate == 0


def test_cancel_ends_the_wait():
    with Guest.create([("pc.ram", 64 * MiB)], vcpus=0) as guest:
        cancel = threading.Event()
        threading.Timer(0.1, cancel.set).start()
        t0 = time.monotonic()
        measure_dirty_rate(guest, "dirty-bitmap", 60000, cancel=cancel)
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("kwargs", [dict(mode="bogus"), dict(calc_time_ms=49),
                                    dict(calc_time_ms=60001), dict(sample_pages=127),
                                    dict(sample_pages=16385)])
def test_refused_arguments(kwargs):
    with Guest.create([("pc.ram", 64 * MiB)], vcpus=0) as guest:
        with pytest.raises(InvalidParameterError):
            measure_dirty_rate(guest, **kwargs)


def test_vcpu_limit_holds_the_rate_at_the_quota():
    quota = 20
    with Guest.create([("pc.ram", 128 * MiB)], vcpus=2,
                      workload=WorkloadSpec("random", 0)) as guest:
        area = guest.dirty_area
        area.set_limit(quota)
        assert area.in_service
        time.sleep(2.5)
        limits = area.limits()
        assert [d["cpu-index"] for d in limits] == [0, 1]
        for d in limits:
            assert d["limit-rate"] == quota
            assert abs(d["current-rate"] - quota) <= 25 / 2, limits   # QEMU's test: 25
        ring = measure_dirty_rate(guest, "dirty-ring", 1000)
        assert abs(ring.dirty_rate - 2 * quota) <= 0.2 * 2 * quota, ring
        assert area.slept_us() > 0 and area.throttle_time_per_round() > 0
        # Cancelled: the vCPUs go as fast as they can again.
        area.cancel()
        assert not area.in_service and area.limits() == []
        ring = measure_dirty_rate(guest, "dirty-ring", 500)
        assert ring.dirty_rate > 4 * quota, ring


def test_limit_one_vcpu():
    with Guest.create([("pc.ram", 64 * MiB)], vcpus=2,
                      workload=WorkloadSpec("random", 0)) as guest:
        guest.dirty_area.set_limit(8, index=1)
        time.sleep(0.3)
        ring = measure_dirty_rate(guest, "dirty-ring", 1000)
        assert abs(ring.vcpu_rates[1] - 8) <= 2, ring
        assert ring.vcpu_rates[0] > 16, ring
        assert [d["cpu-index"] for d in guest.dirty_area.limits()] == [1]


def test_limiter_spaces_chunks_without_a_process():
    now = [0.0]
    area = DirtyArea.create(1)
    try:
        area.set_limit(1)                   # 256 pages/s
        limiter = DirtyLimiter(area, 0, clock=lambda: now[0])
        assert limiter.delay(now[0]) <= 0
        limiter.account(64)                 # a quarter of a second's worth
        assert limiter.delay(now[0]) == pytest.approx(0.25)
        now[0] = 10.0                       # idle for long: no credit kept
        assert limiter.delay(now[0]) <= 0
        limiter.account(256)
        assert limiter.delay(now[0]) == pytest.approx(1.0)
        assert int(area.dirtied()[0]) == 320
    finally:
        del limiter
        area.close()
        area.unlink()


def test_set_limit_refuses_a_bad_index():
    with Guest.create([("pc.ram", 64 * MiB)], vcpus=1) as guest:
        from engine.errors import GuestError
        with pytest.raises(GuestError):
            guest.dirty_area.set_limit(5, index=1)
        assert np.all(guest.dirty_area.current_rates() == 0)
