"""calc-dirty-rate, the vCPU dirty limits and the dirty-limit capability, over QMP.

An ``engine vm`` runs a workload of known rate; QEMU's commands measure it
(bitmap modes within 20 %, page sampling within 30 %), limit it (the rates
query-vcpu-dirty-limit reports within 25 MB/s of the quota, QEMU's test's
tolerance), and a migration that cannot converge (the guest dirties faster
than max-bandwidth) completes with the dirty-limit capability.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.conftest import ENGINE_CMD
from tests.e2e.test_qmp_harness import EngineVM, vm_pair

qemu_qmp = pytest.importorskip("qemu.qmp")
from qemu.qmp import ExecuteError  # noqa: E402

MiB = 1 << 20
RATE = 32


def _measure(vm, mode: str, **extra) -> dict:
    vm.cmd("calc-dirty-rate", {"calc-time": 1, "mode": mode, **extra})
    deadline = time.monotonic() + 30
    while True:
        info = vm.cmd("query-dirty-rate")
        if info["status"] == "measured":
            return info
        assert info["status"] == "measuring"
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("workload", ["random", "ab"])
def test_calc_dirty_rate_measures_the_workload(tmp_path, workload):
    with EngineVM(tmp_path, "vm", "--ram", "256M", "--vcpus", "2", "--workload", workload,
                  "--dirty-rate", str(RATE)) as vm:
        assert vm.cmd("query-dirty-rate")["status"] == "unstarted"
        time.sleep(0.3)     # ab zeroes its slices first
        for mode, tolerance, extra in (("dirty-bitmap", 0.2, {}), ("dirty-ring", 0.2, {}),
                                       ("page-sampling", 0.3, {"sample-pages": 16384})):
            info = _measure(vm, mode, **extra)
            assert abs(info["dirty-rate"] - RATE) <= tolerance * RATE, info
            assert info["mode"] == mode and info["calc-time"] == 1
            assert info["calc-time-unit"] == "second"
            assert abs(info["start-time"] - time.time()) < 30
            if mode == "dirty-ring":
                rates = info["vcpu-dirty-rate"]
                assert [r["id"] for r in rates] == [0, 1]
                assert sum(r["dirty-rate"] for r in rates) == info["dirty-rate"]
            else:
                assert "vcpu-dirty-rate" not in info
            if mode == "page-sampling":
                assert info["sample-pages"] == 16384
        ms = vm.cmd("query-dirty-rate", {"calc-time-unit": "millisecond"})
        assert 950 <= ms["calc-time"] <= 1500 and ms["calc-time-unit"] == "millisecond"


def test_calc_dirty_rate_refusals(tmp_path):
    with EngineVM(tmp_path, "vm", "--ram", "64M", "--vcpus", "1") as vm:
        for args, text in (
                ({"calc-time": 0}, "Calculation time is out of range [50ms, 60000ms]."),
                ({"calc-time": 49, "calc-time-unit": "millisecond"}, "out of range"),
                ({"calc-time": 61}, "out of range"),
                ({"calc-time": 1, "sample-pages": 127}, "sample-pages is out of range[128, 16384]."),
                ({"calc-time": 1, "sample-pages": 512, "mode": "dirty-ring"},
                 "sample-pages is used only in page-sampling mode")):
            with pytest.raises(ExecuteError) as info:
                vm.cmd("calc-dirty-rate", args)
            assert text in str(info.value)
        vm.cmd("calc-dirty-rate", {"calc-time": 2})
        with pytest.raises(ExecuteError, match="the dirty rate is already being measured."):
            vm.cmd("calc-dirty-rate", {"calc-time": 1})
        assert vm.cmd("query-dirty-rate")["status"] == "measuring"


def test_engine_dirtyrate_command(tmp_path):
    with EngineVM(tmp_path, "vm", "--ram", "128M", "--vcpus", "2", "--workload", "random",
                  "--dirty-rate", str(RATE)) as vm:
        report = tmp_path / "rate.json"
        out = subprocess.run([*ENGINE_CMD, "dirtyrate", "--qmp", f"unix:{vm.qmp_path}",
                              "--mode", "dirty-ring", "--json", str(report)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == "Status: measured" and "Mode: dirty-ring" in lines
        assert [line for line in lines if line.startswith("vcpu[")][1].startswith("vcpu[1]")
        info = json.loads(report.read_text())
        assert abs(info["dirty-rate"] - RATE) <= 0.2 * RATE, info
        assert f"Dirty rate: {info['dirty-rate']} (MB/s)" in lines


def test_vcpu_dirty_limit(tmp_path):
    quota = 10
    with EngineVM(tmp_path, "vm", "--ram", "128M", "--vcpus", "2", "--workload", "random",
                  "--dirty-rate", "0") as vm:
        assert vm.cmd("query-vcpu-dirty-limit") == []
        with pytest.raises(ExecuteError, match="incorrect cpu index specified"):
            vm.cmd("set-vcpu-dirty-limit", {"cpu-index": 2, "dirty-rate": quota})
        vm.cmd("set-vcpu-dirty-limit", {"dirty-rate": quota})
        time.sleep(2.5)         # two measuring periods
        limits = vm.cmd("query-vcpu-dirty-limit")
        assert [d["cpu-index"] for d in limits] == [0, 1]
        for d in limits:
            assert d["limit-rate"] == quota
            assert abs(d["current-rate"] - quota) <= 25, limits
        ring = _measure(vm, "dirty-ring")
        assert abs(ring["dirty-rate"] - 2 * quota) <= 0.2 * 2 * quota, ring
        vm.cmd("cancel-vcpu-dirty-limit", {"cpu-index": 0})
        assert [d["cpu-index"] for d in vm.cmd("query-vcpu-dirty-limit")] == [1]
        vm.cmd("set-vcpu-dirty-limit", {"cpu-index": 1, "dirty-rate": 0})    # 0 cancels
        assert vm.cmd("query-vcpu-dirty-limit") == []


BANDWIDTH = 32 * MiB
DOWNTIME_MS = 300


def test_dirty_limit_makes_a_migration_converge(tmp_path):
    """The guest dirties as fast as it can (far above max-bandwidth); the
    dirty-limit capability holds each vCPU to 4 MB/s once the rate was high
    twice, and the migration completes.  A dirty-bitmap measurement during
    the migration does not disturb it: the (paused) destination's memory is
    the source's at switchover."""
    guest = ("--ram", "64M", "--vcpus", "2", "--workload", "random")
    src, dst = vm_pair(tmp_path, (*guest, "--dirty-rate", "0"), (*guest, "-S"))
    with src, dst:
        for vm in (src, dst):
            vm.set_caps(events=True, dirty_limit=True, pause_before_switchover=True)
        src.set_params(max_bandwidth=BANDWIDTH, downtime_limit=DOWNTIME_MS,
                       vcpu_dirty_limit=4, x_vcpu_dirty_limit_period=200)
        uri = f"unix:{tmp_path}/migration.sock"
        dst.cmd("migrate-incoming", {"uri": uri})
        assert src.cmd("query-vcpu-dirty-limit") == []
        src.cmd("migrate", {"uri": uri})
        src.cmd("calc-dirty-rate", {"calc-time": 1, "mode": "dirty-bitmap"})
        src.wait_status("pre-switchover", timeout=90)
        info = src.cmd("query-migrate")
        remaining = info["ram"]["remaining"]
        assert remaining < BANDWIDTH * DOWNTIME_MS // 1000, info
        assert info["dirty-limit-throttle-time-per-round"] > 0, info
        assert info["dirty-limit-ring-full-time"] > 0, info
        # QEMU's rule: the limit is not applied before the second sync period.
        passes = [e["data"]["pass"] for e in src.events if e["event"] == "MIGRATION_PASS"]
        assert len(passes) >= 3, passes
        assert [d["limit-rate"] for d in src.cmd("query-vcpu-dirty-limit")] == [4, 4]
        with pytest.raises(ExecuteError, match="can't cancel dirty page rate limit while "
                                               "migration is running"):
            src.cmd("cancel-vcpu-dirty-limit")
        src.cmd("migrate-continue", {"state": "pre-switchover"})
        src.wait_status("completed")
        dst.wait_status("completed")
        # The migration's end cancels the limit.
        assert src.cmd("query-vcpu-dirty-limit") == []
        assert "dirty-limit-ring-full-time" not in src.cmd("query-migrate")
        rate = src.cmd("query-dirty-rate")
        assert rate["status"] == "measured" and rate["dirty-rate"] > 0, rate
        assert dst.cmd("query-status")["status"] == "paused"
        assert src.cmd("x-engine-memory-digests") == dst.cmd("x-engine-memory-digests")


def test_engine_migrate_with_dirty_limit(tmp_path):
    """The same from the command line: a guest dirtying as fast as it can
    migrates over 32 MiB/s once dirty-limit holds its vCPUs."""
    report = tmp_path / "report.json"
    out = subprocess.run(
        [*ENGINE_CMD, "migrate", "--ram", "64M", "--vcpus", "2", "--workload", "random",
         "--dirty-rate", "0", "--cap", "dirty-limit=on",
         "--param", f"max-bandwidth={BANDWIDTH}", "--param", f"downtime-limit={DOWNTIME_MS}",
         "--param", "vcpu-dirty-limit=4", "--quiet", "--json", str(report)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(report.read_text())
    info = result["migration"]
    assert info["status"] == "completed" and info["ram"]["dirty-sync-count"] >= 3, info
    assert result["verification"]["ok"] is True, result["verification"]


def test_without_dirty_limit_the_same_migration_does_not_converge(tmp_path):
    """The control: the same guest and bandwidth, no capability; after four
    passes it is still iterating with more left than the downtime allows."""
    guest = ("--ram", "64M", "--vcpus", "2", "--workload", "random")
    src, dst = vm_pair(tmp_path, (*guest, "--dirty-rate", "0"), guest)
    with src, dst:
        for vm in (src, dst):
            vm.set_caps(events=True)
        src.set_params(max_bandwidth=BANDWIDTH, downtime_limit=DOWNTIME_MS)
        uri = f"unix:{tmp_path}/migration.sock"
        dst.cmd("migrate-incoming", {"uri": uri, "exit-on-error": False})
        src.cmd("migrate", {"uri": uri})
        src.wait_event("MIGRATION_PASS", lambda e: e["data"]["pass"] >= 4, timeout=90)
        info = src.cmd("query-migrate")
        assert info["status"] == "active", info
        assert info["ram"]["remaining"] > BANDWIDTH * DOWNTIME_MS // 1000, info
        assert "dirty-limit-ring-full-time" not in info
        src.cmd("migrate_cancel")
        src.wait_status("cancelled")
