"""``engine vm`` and QEMU (7.2 and 10.0) migrating to each other, both driven
over QMP.

The smallest guest both can run: ``-M none`` (no vCPUs, no devices) with
16 MiB of file-backed RAM named ``m0``; equal RAM files are the proof.  The
engine speaks 7.2's dialect with its ``none-7.2`` machine profile.
Each side is told what QEMU's harness tells it: ``events`` on, the
destination ``-incoming defer`` then ``migrate-incoming`` on tcp port 0
(the port read back from ``query-migrate``'s socket-address).
"""
from __future__ import annotations

import pytest

from tests.e2e.test_qmp_harness import WAIT, EngineVM
from tests.qemu import Qemu, QemuVM, fill_image, image_differences

pytestmark = pytest.mark.interop

SIZE = "16M"
FAST = 1_000_000_000


def guest(qemu: Qemu) -> tuple[str, ...]:
    machine = "none" if qemu.modern else "none-7.2"
    return ("--machine", machine, "--vcpus", "0", "--workload", "none", "--ram", SIZE)


def _port(info: dict) -> int:
    [addr] = info["socket-address"]
    assert addr["type"] == "inet"
    return int(addr["port"])


def test_engine_vm_to_qemu(qemu, tmp_shm_path, tmp_path):
    engine_ram = tmp_shm_path
    qemu_ram = tmp_shm_path.with_name(tmp_shm_path.name + "-qemu")
    fill_image(engine_ram, SIZE, seed=5)
    try:
        with QemuVM(qemu_ram, SIZE, incoming="defer", name="qemu-dst", qemu=qemu) as dst, \
                EngineVM(tmp_path, "engine-src", *guest(qemu),
                         "--mem-path", str(engine_ram)) as src:
            dst.set_caps({"events": True})
            src.set_caps(events=True)
            dst.migrate_incoming("tcp:127.0.0.1:0")
            port = dst.incoming_port()
            src.set_params(max_bandwidth=FAST)
            src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            src.wait_status("completed")
            dst.wait_for_status("completed", timeout=WAIT)
            assert src.timeline() == ["setup", "active", "STOP", "device", "completed"]
            qemu_saw = [e["data"]["status"] for e in dst.events if e["event"] == "MIGRATION"]
            assert qemu_saw == ["setup", "active", "completed"]
            assert dst.query_status() == "paused"       # QEMU -S: received, not started
            assert src.cmd("query-status")["status"] == "postmigrate"
            assert image_differences(engine_ram, qemu_ram) is None
    finally:
        qemu_ram.unlink(missing_ok=True)


def test_qemu_to_engine_vm(qemu, tmp_shm_path, tmp_path):
    qemu_ram = tmp_shm_path
    engine_ram = tmp_shm_path.with_name(tmp_shm_path.name + "-engine-dst")
    fill_image(qemu_ram, SIZE, seed=6)
    try:
        with QemuVM(qemu_ram, SIZE, name="qemu-src", qemu=qemu) as src, \
                EngineVM(tmp_path, "engine-dst", *guest(qemu), "--mem-path", str(engine_ram),
                         "--incoming", "defer") as dst:
            src.set_caps({"events": True})
            dst.set_caps(events=True)
            dst.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            port = _port(dst.cmd("query-migrate"))
            src.set_params({"max-bandwidth": FAST})
            src.migrate(f"tcp:127.0.0.1:{port}")
            src.wait_for_status("completed", timeout=WAIT)
            dst.wait_status("completed")
            assert dst.statuses() == ["setup", "active", "completed"]
            # QEMU's source was in prelaunch (-S): so is the destination.
            assert dst.cmd("query-status")["status"] == "prelaunch"
            assert image_differences(qemu_ram, engine_ram) is None
    finally:
        engine_ram.unlink(missing_ok=True)
