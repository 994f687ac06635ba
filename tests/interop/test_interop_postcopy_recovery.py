"""Postcopy, postcopy-preempt and postcopy recovery between ``engine vm`` and
QEMU (7.2 and 10.0), both directions, both sides driven over QMP.

Each case is QEMU's /migration/postcopy/recovery test: switch to postcopy
early, hold the background pages back (``max-postcopy-bandwidth`` of a few
KiB/s), ``migrate-pause`` the source, both sides wait in postcopy-paused,
``migrate-recover`` (out of band) on the destination, ``migrate`` with
``resume: true`` on the source, lift the cap, and both complete with the RAM
files equal.  The guest is ``-M none`` (no vCPU) with file-backed RAM; QEMU
runs with ``-S``, so nothing but the migration writes either file.

postcopy-preempt is tested against 10.0 only: QEMU 7.2 opens the preempt
channel at setup, QEMU 8.0 and later (and the engine) when postcopy starts,
and the two do not talk (QEMU keeps 7.2's way behind the compat property
``x-preempt-pre-7-2``, which the engine does not implement).
"""
from __future__ import annotations

import pytest

from tests.e2e.test_qmp_harness import WAIT, EngineVM
from tests.qemu import Qemu, QemuVM, fill_image, image_differences

pytestmark = pytest.mark.interop

SIZE = "16M"
#: precopy slow enough that migrate-start-postcopy comes well before the end
SLOW = 4 << 20
#: postcopy's background rate while the test pauses and recovers (bytes/s)
CRAWL = 4096


def _guest(qemu: Qemu) -> tuple[str, ...]:
    machine = "none" if qemu.modern else "none-7.2"
    return ("--machine", machine, "--vcpus", "0", "--workload", "none", "--ram", SIZE)


def _caps(preempt: bool) -> dict:
    caps = {"postcopy-ram": True, "events": True}
    if preempt:
        caps["postcopy-preempt"] = True
    return caps


def _skip_unsupported(qemu: Qemu, preempt: bool) -> None:
    if preempt and not qemu.modern:
        pytest.skip("QEMU 7.2's postcopy-preempt opens its channel at setup; QEMU 8.0+ "
                    "and the engine at the switch (x-preempt-pre-7-2 is not implemented)")


def _wait_qemu(vm: QemuVM, status: str) -> None:
    vm.wait_for_status(status, timeout=WAIT, fail_on=("failed", "cancelled"))


def _qemu_statuses(vm: QemuVM) -> list[str]:
    return [e["data"]["status"] for e in vm.events if e["event"] == "MIGRATION"]


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
def test_engine_vm_postcopy_recovery_to_qemu(qemu, preempt, tmp_shm_path, tmp_path):
    _skip_unsupported(qemu, preempt)
    engine_ram = tmp_shm_path
    qemu_ram = tmp_shm_path.with_name(tmp_shm_path.name + "-qemu")
    fill_image(engine_ram, SIZE, seed=12)
    try:
        with QemuVM(qemu_ram, SIZE, incoming="defer", name="qemu-dst", qemu=qemu) as dst, \
                EngineVM(tmp_path, "engine-src", *_guest(qemu),
                         "--mem-path", str(engine_ram)) as src:
            dst.set_caps(_caps(preempt))
            src.cmd("migrate-set-capabilities", {"capabilities": [
                {"capability": k, "state": v} for k, v in _caps(preempt).items()]})
            dst.migrate_incoming("tcp:127.0.0.1:0")
            port = dst.incoming_port()
            src.set_params(max_bandwidth=SLOW, downtime_limit=1, max_postcopy_bandwidth=CRAWL)
            src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            src.wait_status("active")
            src.cmd("migrate-start-postcopy")
            src.wait_status("postcopy-active")
            _wait_qemu(dst, "postcopy-active")

            src.cmd("migrate-pause")
            src.wait_status("postcopy-paused")
            _wait_qemu(dst, "postcopy-paused")
            # QEMU listens before the command returns.
            dst.cmd("migrate-recover", uri=f"unix:{tmp_path}/recover.sock")
            src.cmd("migrate", {"uri": f"unix:{tmp_path}/recover.sock", "resume": True})
            src.wait_status("postcopy-active")
            src.set_params(max_postcopy_bandwidth=0)
            src.wait_status("completed")
            _wait_qemu(dst, "completed")
            assert "postcopy-paused" in _qemu_statuses(dst)
            assert src.statuses()[-4:] == ["postcopy-recover-setup", "postcopy-recover",
                                           "postcopy-active", "completed"]
            assert image_differences(engine_ram, qemu_ram) is None
    finally:
        qemu_ram.unlink(missing_ok=True)


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
def test_qemu_postcopy_recovery_to_engine_vm(qemu, preempt, tmp_shm_path, tmp_path):
    _skip_unsupported(qemu, preempt)
    qemu_ram = tmp_shm_path
    engine_ram = tmp_shm_path.with_name(tmp_shm_path.name + "-engine")
    fill_image(qemu_ram, SIZE, seed=13)
    try:
        with QemuVM(qemu_ram, SIZE, name="qemu-src", qemu=qemu) as src, \
                EngineVM(tmp_path, "engine-dst", *_guest(qemu), "--mem-path", str(engine_ram),
                         "--incoming", "defer") as dst:
            src.set_caps(_caps(preempt))
            dst.cmd("migrate-set-capabilities", {"capabilities": [
                {"capability": k, "state": v} for k, v in _caps(preempt).items()]})
            dst.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            [addr] = dst.cmd("query-migrate")["socket-address"]
            src.set_params({"max-bandwidth": SLOW, "downtime-limit": 1,
                            "max-postcopy-bandwidth": CRAWL})
            src.migrate(f"tcp:127.0.0.1:{addr['port']}")
            _wait_qemu(src, "active")
            src.cmd("migrate-start-postcopy")
            _wait_qemu(src, "postcopy-active")
            dst.wait_status("postcopy-active")

            src.cmd("migrate-pause")
            _wait_qemu(src, "postcopy-paused")
            dst.wait_status("postcopy-paused")
            dst.cmd("migrate-recover", {"uri": f"unix:{tmp_path}/recover.sock"}, oob=True)
            src.cmd("migrate", uri=f"unix:{tmp_path}/recover.sock", resume=True)
            _wait_qemu(src, "postcopy-active")
            src.set_params({"max-postcopy-bandwidth": 0})
            _wait_qemu(src, "completed")
            dst.wait_status("completed")
            assert "postcopy-recover" in _qemu_statuses(src)
            assert dst.statuses()[-4:] == ["postcopy-paused", "postcopy-recover",
                                           "postcopy-active", "completed"]
            assert image_differences(qemu_ram, engine_ram) is None
    finally:
        engine_ram.unlink(missing_ok=True)
