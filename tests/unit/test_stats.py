"""query-migrate snapshots, their QMP shape, HMP text, and the accumulator."""
from __future__ import annotations

import threading

import pytest

from engine.state import MigrationStatus
from engine.stats import MigrationInfo, RamStats, StatsAccumulator, format_info_migrate

S = MigrationStatus
GIB = 1 << 30

QMP_RAM_KEYS = [
    "transferred", "remaining", "total", "duplicate", "normal", "normal-bytes",
    "dirty-pages-rate", "mbps", "dirty-sync-count", "postcopy-requests",
    "page-size", "multifd-bytes", "pages-per-second", "precopy-bytes",
    "downtime-bytes", "postcopy-bytes", "dirty-sync-missed-zero-copy",
]


class FakeClock:
    """A seconds clock the test moves by hand."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, ms: float) -> None:
        self.t += ms / 1000


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def acc(clock):
    a = StatsAccumulator(GIB, clock=clock)
    a.start()
    return a


# -- shapes -----------------------------------------------------------------

def test_ram_stats_qmp_keys():
    r = RamStats(transferred=1, mbps=2.5, dirty_sync_missed_zero_copy=3)
    q = r.to_qmp()
    assert list(q) == QMP_RAM_KEYS
    assert q["transferred"] == 1 and q["mbps"] == 2.5 and q["dirty-sync-missed-zero-copy"] == 3
    assert isinstance(q["mbps"], float)
    assert RamStats.from_qmp({**q, "skipped": 0}) == r


def _info(status, **kw):
    return MigrationInfo(status=status, total_time=1200, setup_time=30, downtime=40,
                         expected_downtime=300, ram=RamStats(total=GIB), **kw)


def test_presence_rules_by_status():
    assert _info("none").to_qmp() == {}
    for s in (S.SETUP, S.FAILED, S.CANCELLED, S.WAIT_UNPLUG, S.COLO):
        assert _info(s).to_qmp() == {"status": s.value}, s
    for s in (S.ACTIVE, S.CANCELLING, S.PRE_SWITCHOVER, S.DEVICE):
        q = _info(s).to_qmp()
        assert set(q) == {"status", "total-time", "setup-time", "expected-downtime", "ram"}, s
        assert q["expected-downtime"] == 300
    for s in (S.COMPLETED, S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED,
              S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER):
        q = _info(s).to_qmp()
        assert set(q) == {"status", "total-time", "setup-time", "downtime", "ram"}, s
        assert q["downtime"] == 40
    assert _info(S.ACTIVE).to_qmp()["ram"]["total"] == GIB


def test_error_desc_none_fields_and_extras():
    q = _info(S.FAILED, error_desc="Unable to write to socket").to_qmp()
    assert q == {"status": "failed", "error-desc": "Unable to write to socket"}
    q = MigrationInfo("completed", total_time=5).to_qmp()
    assert q == {"status": "completed", "total-time": 5}
    q = _info("active", extra={"cpu-throttle-percentage": 20}).to_qmp()
    assert q["cpu-throttle-percentage"] == 20
    assert "cpu-throttle-percentage" not in _info("setup", extra={"x": 1}).to_qmp()
    with pytest.raises(ValueError):
        MigrationInfo("sideways").to_qmp()


def test_info_from_qmp_round_trip():
    qemu = {"status": "completed", "total-time": 1893, "setup-time": 6, "downtime": 39,
            "ram": RamStats(transferred=123456, total=GIB, mbps=512.25).to_qmp(),
            "socket-address": [{"type": "inet", "host": "::", "port": "4444"}]}
    info = MigrationInfo.from_qmp(qemu)
    assert info.downtime == 39 and info.ram.mbps == 512.25
    assert info.extra == {"socket-address": qemu["socket-address"]}
    assert info.to_qmp() == qemu
    assert MigrationInfo.from_qmp({}).to_qmp() == {}


# -- the accumulator ---------------------------------------------------------

def test_fresh_accumulator(clock):
    a = StatsAccumulator(GIB, page_size=4096, clock=clock, downtime_limit=250)
    info = a.snapshot("setup")
    assert info.total_time is None  # not started
    assert info.expected_downtime == 250  # QEMU seeds it with downtime-limit
    assert info.ram.remaining == GIB and info.ram.total == GIB
    assert info.ram.page_size == 4096
    assert a.update_window() == 0.0  # no window before start()


def test_window_needs_100ms(acc, clock):
    acc.add_bytes(500_000)
    clock.advance(99)
    assert acc.update_window() == 0.0
    assert acc.snapshot("active").ram.mbps == 0.0
    clock.advance(1)
    # 500 000 bytes in 100 ms: 5000 bytes/ms = 40 Mbit/s.
    assert acc.update_window() == pytest.approx(5000.0)
    assert acc.snapshot("active").ram.mbps == pytest.approx(40.0)


def test_window_mbps_and_pages_per_second(acc, clock):
    acc.add_normal(1000, 1000 * 4104)
    acc.add_zero(3000, 3000 * 8)
    acc.add_multifd_bytes(1_000_000)
    clock.advance(250)
    bw = acc.update_window()
    window_bytes = 1000 * 4104 + 3000 * 8 + 1_000_000
    assert bw == pytest.approx(window_bytes / 250)
    ram = acc.snapshot("active").ram
    assert ram.mbps == pytest.approx(window_bytes * 8 / 0.25 / 1e6)
    assert ram.pages_per_second == 16000  # 4000 pages / 0.25 s
    assert ram.transferred == window_bytes == acc.transferred
    assert ram.multifd_bytes == 1_000_000
    assert ram.normal == 1000 and ram.normal_bytes == 1000 * 4096 and ram.duplicate == 3000
    # The next window only counts what came after.
    acc.add_bytes(100_000)
    assert acc.update_window(now=clock() + 0.1) == pytest.approx(1000.0)
    assert acc.snapshot("active").ram.pages_per_second == 0


def test_threshold(acc, clock):
    acc.add_bytes(1_000_000)
    clock.advance(100)
    acc.update_window()  # 10000 bytes/ms
    assert acc.threshold(300, 0) == 3_000_000
    assert acc.threshold(0, 0) == 0
    # avail-switchover-bandwidth (bytes/s) overrides the measurement.
    assert acc.threshold(300, 2_000_000) == 600_000


def test_dirty_pages_rate_period(acc, clock):
    assert acc.dirty_sync(1000, 262144) == 1  # period starts at the first sync
    clock.advance(500)
    assert acc.dirty_sync(2000, 5000) == 2
    assert acc.snapshot("active").ram.dirty_pages_rate == 0
    clock.advance(500)  # exactly 1000 ms: QEMU waits for *more* than 1 s
    acc.dirty_sync(0, 4000)
    assert acc.snapshot("active").ram.dirty_pages_rate == 0
    clock.advance(200)  # 1200 ms, 3000 pages dirtied in the period
    acc.dirty_sync(600, 3000)
    ram = acc.snapshot("active").ram
    assert ram.dirty_pages_rate == 3600 * 1000 // 1200
    assert ram.dirty_sync_count == 4 == acc.dirty_sync_count
    assert ram.remaining == 3000 * 4096 == acc.remaining
    # A new period starts: the rate holds until it ends.
    clock.advance(1001)
    acc.dirty_sync(2002, 100)
    assert acc.snapshot("active").ram.dirty_pages_rate == 2002 * 1000 // 1001
    acc.set_remaining(7)
    assert acc.remaining == 7 * 4096


def test_expected_downtime(clock):
    acc = StatsAccumulator(GIB, clock=clock, downtime_limit=300)
    acc.start()
    acc.dirty_sync(100, 1000)
    acc.add_bytes(2_000_000)
    clock.advance(200)
    acc.update_window()  # dirty rate still 0 (no period ended): no estimate
    assert acc.expected_downtime == 300
    clock.advance(1000)
    acc.dirty_sync(5000, 2500)  # period of 1200 ms ends; 2500 pages dirty
    acc.add_bytes(4_000_000)
    clock.advance(100)
    acc.update_window()  # 4 000 000 bytes / 1100 ms
    assert acc.expected_downtime == int(2500 * 4096 / (4_000_000 / 1100))
    # A window with at most 10000 bytes does not re-estimate.
    acc.add_bytes(10_000)
    clock.advance(100)
    acc.update_window()
    assert acc.expected_downtime == int(2500 * 4096 / (4_000_000 / 1100))
    # With avail-switchover-bandwidth set, that is the divisor.
    acc.avail_switchover_bandwidth = 1_000_000  # 1000 bytes/ms
    acc.add_bytes(20_000)
    clock.advance(100)
    acc.update_window()
    assert acc.expected_downtime == 2500 * 4096 // 1000
    assert acc.snapshot("active").expected_downtime == acc.expected_downtime


def test_bytes_classified_by_phase(acc, clock):
    acc.add_normal(10, 41040)
    acc.add_zero(5, 40)
    acc.add_bytes(999)  # not RAM page traffic: not classified
    # Multifd bytes are RAM bytes too (QAPI: "bytes sent while the guest is
    # paused"), classified by when the workers reported them.
    acc.add_multifd_bytes(4096)
    acc.vm_stopped()
    acc.add_normal(2, 8208)
    acc.add_multifd_bytes(700)
    acc.postcopy_started()
    acc.add_normal(1, 4104)
    acc.add_postcopy_requests()
    acc.add_postcopy_requests(2)
    ram = acc.snapshot("postcopy-active").ram
    assert (ram.precopy_bytes, ram.downtime_bytes, ram.postcopy_bytes) == \
        (41080 + 4096, 8208 + 700, 4104)
    assert ram.postcopy_requests == 3
    assert ram.transferred == 41040 + 40 + 999 + 4096 + 8208 + 700 + 4104


def test_precopy_completion_freezes_times(acc, clock):
    clock.advance(40)
    acc.setup_done()
    acc.add_normal(1000, 4_104_000)
    clock.advance(900)
    acc.vm_stopped()
    acc.add_normal(10, 41_040)
    clock.advance(60)
    acc.completed()
    info = acc.snapshot("completed")
    assert info.total_time == 1000
    assert info.setup_time == 40
    assert info.downtime == 60
    assert info.ram.remaining == 0 and info.ram.dirty_pages_rate == 0
    # Completion mbps: all bytes over (total - setup) ms.
    assert info.ram.mbps == pytest.approx((4_104_000 + 41_040) * 8 / 960 / 1000)
    clock.advance(5000)
    later = acc.snapshot("completed")
    assert later == info
    q = later.to_qmp()
    assert q["total-time"] == 1000 and q["downtime"] == 60 and "expected-downtime" not in q


def test_total_time_runs_until_completion(acc, clock):
    clock.advance(300)
    assert acc.snapshot("active").total_time == 300
    clock.advance(300)
    assert acc.snapshot("active").total_time == 600


def test_postcopy_downtime_ends_when_package_sent(acc, clock):
    clock.advance(1000)
    acc.vm_stopped()
    clock.advance(80)
    acc.postcopy_started()
    clock.advance(2000)
    assert acc.snapshot("postcopy-active").downtime == 80
    acc.completed()
    info = acc.snapshot("completed")
    assert info.downtime == 80 and info.total_time == 3080


def test_accumulator_counts_from_many_threads(acc):
    def work():
        for _ in range(2000):
            acc.add_normal(1, 4104)
            acc.add_multifd_bytes(10)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ram = acc.snapshot("active").ram
    assert ram.normal == 8000
    assert ram.transferred == 8000 * 4114


# -- HMP text ----------------------------------------------------------------

def test_format_info_migrate_active():
    info = MigrationInfo(
        status="active", total_time=1500, setup_time=12, expected_downtime=300,
        ram=RamStats(transferred=10 << 20, remaining=5 << 20, total=GIB, duplicate=7,
                     normal=2560, normal_bytes=10 << 20, mbps=55.926, dirty_sync_count=2,
                     page_size=4096, multifd_bytes=1 << 20, pages_per_second=12345))
    assert format_info_migrate(info) == (
        "Migration status: active\n"
        "total time: 1500 ms\n"
        "expected downtime: 300 ms\n"
        "setup: 12 ms\n"
        "transferred ram: 10240 kbytes\n"
        "throughput: 55.93 mbps\n"
        "remaining ram: 5120 kbytes\n"
        "total ram: 1048576 kbytes\n"
        "duplicate: 7 pages\n"
        "normal: 2560 pages\n"
        "normal bytes: 10240 kbytes\n"
        "dirty sync count: 2\n"
        "page size: 4 kbytes\n"
        "multifd bytes: 1024 kbytes\n"
        "pages-per-second: 12345\n"
    )


def test_format_info_migrate_nonzero_only_lines_and_extras():
    info = MigrationInfo(
        status="completed", total_time=900, setup_time=3, downtime=21,
        ram=RamStats(dirty_pages_rate=50, postcopy_requests=4, precopy_bytes=4 << 10,
                     downtime_bytes=8 << 10, postcopy_bytes=12 << 10,
                     dirty_sync_missed_zero_copy=1),
        extra={"socket-address": [{"type": "inet", "host": "0.0.0.0", "port": "4444"},
                                  {"type": "unix", "path": "/tmp/m.sock"}],
               "cpu-throttle-percentage": 30,
               "dirty-limit-throttle-time-per-round": 120,
               "dirty-limit-ring-full-time": 4500,
               "xbzrle-cache": {"cache-size": 67108864, "bytes": 2048, "pages": 3,
                                "cache-miss": 4, "cache-miss-rate": 0.5,
                                "encoding-rate": 1.25, "overflow": 0}})
    lines = format_info_migrate(info, {"multifd": True, "events": False}).splitlines()
    assert lines[0] == "capabilities: multifd: on events: off "
    assert "downtime: 21 ms" in lines and not any(l.startswith("expected") for l in lines)
    for line in ("dirty pages rate: 50 pages", "postcopy request count: 4",
                 "precopy ram: 4 kbytes", "downtime ram: 8 kbytes", "postcopy ram: 12 kbytes",
                 "Zero-copy-send fallbacks happened: 1 times", "cache size: 67108864 bytes",
                 "xbzrle cache miss rate: 0.50", "cpu throttle percentage: 30",
                 "dirty-limit throttle time: 120 us", "dirty-limit ring full time: 4500 us",
                 "socket address: [", "\ttcp:0.0.0.0:4444", "\tunix:/tmp/m.sock", "]"):
        assert line in lines, line
    quiet = format_info_migrate(MigrationInfo("active", ram=RamStats()))
    for word in ("dirty pages rate", "postcopy request", "precopy ram", "Zero-copy"):
        assert word not in quiet


def test_format_info_migrate_status_only_and_none():
    assert format_info_migrate(MigrationInfo("failed", error_desc="boom")) == (
        "Migration status: failed (boom)\ntotal time: 0 ms\n")
    assert format_info_migrate(MigrationInfo("setup")) == (
        "Migration status: setup\ntotal time: 0 ms\n")
    assert format_info_migrate(MigrationInfo("none")) == ""


def test_format_info_migrate_of_a_snapshot(acc, clock):
    acc.add_normal(256, 256 * 4104)
    clock.advance(100)
    acc.update_window()
    text = format_info_migrate(acc.snapshot("active"))
    assert "Migration status: active\ntotal time: 100 ms\n" in text
    assert "normal: 256 pages\n" in text
    assert f"throughput: {256 * 4104 * 8 / 0.1 / 1e6:0.2f} mbps" in text
