"""QEMU's migration-test flow against two ``engine vm`` processes, over QMP.

As QEMU's harness does: both sides get the ``events`` capability and the
capabilities of the case, the destination starts with ``-incoming defer``
and is told ``migrate-incoming``, the source ``migrate``s, and the test
waits for MIGRATION events.  The source runs QEMU's a-b workload on two
vCPUs; the proof is the a-b check on the (stopped) destination.  Precopy
starts out unable to converge (downtime-limit 1 ms) and is let converge
once a second pass has begun, QEMU's way of proving a live migration.
"""
from __future__ import annotations

import subprocess

import pytest

from tests.conftest import ENGINE_CMD
from tests.e2e.test_qmp_harness import WAIT, EngineVM, vm_pair

qemu_qmp = pytest.importorskip("qemu.qmp")

GUEST = ("--ram", "64M", "--vcpus", "2", "--workload", "ab")


def _pair(tmp_path, *dst_args, src_args=()):
    return vm_pair(tmp_path, (*GUEST, *src_args), (*GUEST, *dst_args))


def _start(src, dst, tmp_path, **caps) -> str:
    for vm in (src, dst):
        vm.set_caps(events=True, **caps)
        if caps.get("multifd"):
            vm.set_params(multifd_channels=2)
    uri = f"unix:{tmp_path}/migration.sock"
    dst.cmd("migrate-incoming", {"uri": uri})
    assert dst.cmd("query-status")["status"] == "inmigrate"
    # Cannot converge: every pass leaves more than 1 ms worth of dirty pages.
    src.set_params(downtime_limit=1, max_bandwidth=1_000_000_000)
    src.cmd("migrate", {"uri": uri})
    return uri


def _passes(vm) -> list[int]:
    return [e["data"]["pass"] for e in vm.events if e["event"] == "MIGRATION_PASS"]


def _check_memory(dst) -> None:
    """QEMU's migrate_end: the destination runs; stop it, check its memory."""
    assert dst.cmd("query-status") == {"status": "running", "running": True}
    dst.cmd("stop")
    dst.wait_event("STOP")
    result = dst.cmd("x-engine-check-ab")
    assert result["ok"], result


def _precopy(tmp_path, **caps):
    src, dst = _pair(tmp_path)
    with src, dst:
        _start(src, dst, tmp_path, **caps)
        src.wait_event("MIGRATION_PASS", lambda e: e["data"]["pass"] >= 2)
        src.set_params(downtime_limit=30_000)       # now converge
        src.wait_status("completed")
        dst.wait_status("completed")
        info = src.cmd("query-migrate")
        assert info["status"] == "completed" and info["ram"]["total"] == 64 << 20

        assert src.timeline() == ["setup", "active", "STOP", "device", "completed"]
        assert dst.timeline() == ["setup", "active", "RESUME", "completed"]
        passes = _passes(src)
        assert passes == list(range(1, len(passes) + 1))
        assert passes[-1] == info["ram"]["dirty-sync-count"]
        assert src.cmd("query-status")["status"] == "postmigrate"
        _check_memory(dst)
        return src, info


def test_precopy(tmp_path):
    src, info = _precopy(tmp_path)
    assert info["ram"]["multifd-bytes"] == 0


def test_precopy_multifd_two_channels(tmp_path):
    src, info = _precopy(tmp_path, multifd=True)
    assert info["ram"]["multifd-bytes"] > 0


def _switch_to_postcopy(src, dst):
    src.wait_event("MIGRATION_PASS")
    src.cmd("migrate-start-postcopy")
    src.wait_status("postcopy-active")
    dst.wait_event("RESUME")        # the guest runs on the destination now


#: the source's vCPUs as fast as they go: precopy never converges (with a
#: 1 ms downtime limit), so it is postcopy that completes
NEVER_CONVERGES = ("--dirty-rate", "0")


def test_postcopy(tmp_path):
    src, dst = _pair(tmp_path, src_args=NEVER_CONVERGES)
    with src, dst:
        _start(src, dst, tmp_path, postcopy_ram=True, postcopy_blocktime=True)
        _switch_to_postcopy(src, dst)
        src.wait_status("completed")
        dst.wait_status("completed")
        assert src.timeline() == ["setup", "active", "STOP", "device", "postcopy-device",
                                  "postcopy-active", "completed"]
        assert dst.timeline() == ["setup", "active", "postcopy-device", "postcopy-active",
                                  "RESUME", "completed"]
        assert "postcopy-blocktime" in dst.cmd("query-migrate")
        assert src.cmd("query-migrate")["ram"]["postcopy-bytes"] > 0
        _check_memory(dst)


def test_postcopy_recovery(tmp_path):
    """QEMU's /migration/postcopy/recovery/plain: pause the source in
    postcopy-active, both sides wait in postcopy-paused, migrate-recover
    out of band on the destination, migrate resume=true on the source.

    The destination's vCPUs fault in what they touch whatever the background
    rate, so they touch slowly here (1 MiB/s): postcopy lasts long enough
    to be paused."""
    src, dst = _pair(tmp_path, "--dirty-rate", "1", src_args=NEVER_CONVERGES)
    with src, dst:
        _start(src, dst, tmp_path, postcopy_ram=True)
        src.set_params(max_postcopy_bandwidth=4096)       # cannot finish on its own
        _switch_to_postcopy(src, dst)
        dst.wait_status("postcopy-active")
        src.cmd("migrate-pause")
        src.wait_status("postcopy-paused")
        dst.wait_status("postcopy-paused")
        assert dst.cmd("query-status")["status"] == "running"     # what is there runs

        uri = f"unix:{tmp_path}/recover.sock"
        dst.cmd("migrate-recover", {"uri": uri}, oob=True)
        src.cmd("migrate", {"uri": uri, "resume": True})
        src.set_params(max_postcopy_bandwidth=0)
        src.wait_status("completed")
        dst.wait_status("completed")
        assert src.statuses() == ["setup", "active", "device", "postcopy-device",
                                  "postcopy-active", "postcopy-paused", "postcopy-recover-setup",
                                  "postcopy-recover", "postcopy-active", "completed"]
        assert dst.statuses() == ["setup", "active", "postcopy-device", "postcopy-active",
                                  "postcopy-paused", "postcopy-recover", "postcopy-active",
                                  "completed"]
        _check_memory(dst)


def test_info_migrate_prints_like_hmp(tmp_path):
    src, dst = _pair(tmp_path)
    with src, dst:
        _start(src, dst, tmp_path)
        src.set_params(downtime_limit=30_000)
        src.wait_status("completed")
        r = subprocess.run([*ENGINE_CMD, "info", "migrate", "--qmp", f"unix:{src.qmp_path}"],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith("capabilities: ") and "events: on" in lines[0]
        assert lines[1] == "Migration status: completed"
        assert any(line.startswith("transferred ram: ") and line.endswith(" kbytes")
                   for line in lines)
        assert "total ram: 65536 kbytes" in lines
        r = subprocess.run([*ENGINE_CMD, "info", "status", "--qmp", f"unix:{dst.qmp_path}"],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.stdout == "VM status: running\n", r.stderr


def test_signal_ends_the_vm_cleanly(tmp_path):
    """-S starts in prelaunch; SIGTERM ends the VM as QEMU: SHUTDOWN, exit 0."""
    import signal
    vm = EngineVM(tmp_path, "vm", *GUEST, "-S")
    try:
        assert vm.cmd("query-status")["status"] == "prelaunch"
        vm.cmd("cont")
        vm.wait_event("RESUME")
        vm.proc.proc.send_signal(signal.SIGTERM)
        ev = vm.wait_event("SHUTDOWN", timeout=WAIT)
        assert ev["data"] == {"guest": False, "reason": "host-signal"}
        assert vm.proc.wait(WAIT) == 0
    finally:
        vm.close(quit=False)
