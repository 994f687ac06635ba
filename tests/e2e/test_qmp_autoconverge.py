"""QEMU's migration-test auto-converge case, over QMP between two ``engine vm``s.

The source dirties memory faster than max-bandwidth carries it; with
auto-converge the throttle climbs until the precopy converges.  At
pre-switchover (pause-before-switchover) cpu-throttle-percentage is at least
cpu-throttle-initial and at most max-cpu-throttle, in query-migrate and in
HMP ``info migrate``; once completed it is gone (QEMU's cpu_throttle_stop).
"""
from __future__ import annotations

import subprocess

import pytest

from tests.conftest import ENGINE_CMD
from tests.e2e.test_qmp_harness import WAIT, vm_pair

qemu_qmp = pytest.importorskip("qemu.qmp")

MIB = 1 << 20
GUEST = ("--ram", "64M", "--vcpus", "1", "--workload", "random", "--dirty-rate", "200")
INITIAL, MAX = 40, 90


def test_auto_converge_throttle_at_pre_switchover(tmp_path):
    src, dst = vm_pair(tmp_path, GUEST, GUEST)
    with src, dst:
        for vm in (src, dst):
            vm.set_caps(events=True)
        src.set_caps(auto_converge=True, pause_before_switchover=True)
        src.set_params(max_bandwidth=64 * MIB, downtime_limit=500,
                       cpu_throttle_initial=INITIAL, cpu_throttle_increment=25,
                       max_cpu_throttle=MAX)
        uri = f"unix:{tmp_path}/migration.sock"
        dst.cmd("migrate-incoming", {"uri": uri})
        src.cmd("migrate", {"uri": uri})
        # Throttled while still active (QEMU's test waits for this too).
        src.wait_event("MIGRATION_PASS", lambda e: e["data"]["pass"] >= 4)
        src.wait_status("pre-switchover")
        info = src.cmd("query-migrate")
        pct = info["cpu-throttle-percentage"]
        assert INITIAL <= pct <= MAX, info
        r = subprocess.run([*ENGINE_CMD, "info", "migrate", "--qmp", f"unix:{src.qmp_path}"],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 0, r.stderr
        assert f"cpu throttle percentage: {pct}" in r.stdout.splitlines()
        src.cmd("migrate-continue", {"state": "pre-switchover"})
        src.wait_status("completed")
        dst.wait_status("completed")
        assert "cpu-throttle-percentage" not in src.cmd("query-migrate")
