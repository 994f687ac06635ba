"""Source and destination coordinators in one process, over a real socket.

Guests are real (shared memory, vCPU processes); only the two coordinators
share a process, which lets the test look at both sides' internals.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.library import make_options
from engine.machine import get_profile
from engine.migration.destination import DestinationMigration
from engine.migration.source import SourceMigration
from engine.migration.verify import memory_digests
from engine.ram.guest import Guest
from engine.ram.workloads import REG_PASSES, WorkloadSpec
from engine.transport import connect, listen


def migrate_pair(src_guest, dst_guest, options, vcpus, machine="engine"):
    profile = get_profile(machine)
    listener = listen("tcp:127.0.0.1:0")
    dst = DestinationMigration(profile, options, guest=dst_guest, vcpus=vcpus, verify=True)
    result = {}

    def serve():
        with listener.accept(timeout=30) as ch:
            result["dst"] = dst.run(ch)

    t = threading.Thread(target=serve)
    t.start()
    src = SourceMigration(src_guest, profile, options, vcpus=vcpus)
    src.compute_digests = True
    with connect(listener.uri) as ch:
        info = src.run(ch)
    t.join(60)
    listener.close()
    return src, dst, info, result["dst"]


def test_live_multi_block_guest_with_return_path(tmp_shm_path):
    blocks = [("pc.ram", 32 << 20, None), ("vga.vram", 8 << 20, str(tmp_shm_path)),
              ("rom", 4096, None)]
    opts = make_options({"return-path": True}, {"downtime-limit": 1000})
    wl = WorkloadSpec("ab", dirty_rate_mbps=64)
    with Guest.create(blocks, vcpus=2, workload=wl) as sg, \
            Guest.create([(b[0], b[1]) for b in blocks], vcpus=2, workload=wl,
                         start=False) as dg:
        sg.block("vga.vram").array[:] = 0x5A
        sg.block("rom").array[:16] = np.arange(16, dtype=np.uint8)
        time.sleep(0.2)
        src, dst, info, dinfo = migrate_pair(sg, dg, opts, vcpus=2)
        assert info.status == "completed", info.error_desc
        assert dinfo.status == "completed", dinfo.error_desc
        assert src.pongs == [1]                      # PING(1) after OPEN_RETURN_PATH
        assert src.switchover_digests == dst.digests
        assert dst.ab_result is None or dst.ab_result.ok
        assert not sg.running                       # QEMU leaves the source stopped
        # device state moved: registers and counter equal at switchover
        src_regs = sg.registers.copy()
        assert dst.devices_loaded["counter"]["value"] == sg.counter
        assert [list(map(int, r)) for r in src_regs] == \
            [dst.devices_loaded[f"cpu/{i}"]["regs"] for i in range(2)]
        # and the destination's vCPUs resumed from them
        assert dg.running
        deadline = time.monotonic() + 20
        while dg.registers[:, REG_PASSES].min() <= src_regs[:, REG_PASSES].min():
            assert time.monotonic() < deadline, "destination guest did not run on"
            time.sleep(0.01)
        dg.stop()
        assert dg.check_ab(slices=2).ok
        q = info.to_qmp()
        assert q["ram"]["total"] == sum(b[1] for b in blocks)
        assert q["ram"]["remaining"] == 0 and q["downtime"] >= 0
        assert q["ram"]["precopy-bytes"] > 0 and q["ram"]["downtime-bytes"] > 0


def test_paused_guest_stays_paused_on_destination():
    opts = make_options()
    with Guest.create([("m0", 4 << 20)], vcpus=1, workload=WorkloadSpec("ab"),
                      start=False) as sg, \
            Guest.create([("m0", 4 << 20)], vcpus=1, workload=WorkloadSpec("ab"),
                         start=False) as dg:
        sg.block("m0").array[::4096] = 3
        src, dst, info, dinfo = migrate_pair(sg, dg, opts, vcpus=1)
        assert info.status == dinfo.status == "completed"
        assert dst.devices_loaded["globalstate"]["runstate"].rstrip(b"\0") == b"prelaunch"
        assert not dg.running
        assert memory_digests(sg.blocks) == memory_digests(dg.blocks)


def test_pause_before_switchover_waits_for_migrate_continue():
    opts = make_options({"pause-before-switchover": True, "return-path": True,
                         "switchover-ack": True})
    profile = get_profile("engine")
    seen = []
    with Guest.create([("m0", 4 << 20)], vcpus=1, workload=WorkloadSpec("ab", 16)) as sg, \
            Guest.create([("m0", 4 << 20)], vcpus=1, workload=WorkloadSpec("ab", 16),
                         start=False) as dg:
        listener = listen("tcp:127.0.0.1:0")
        dst = DestinationMigration(profile, opts, guest=dg, vcpus=1, verify=True)
        t = threading.Thread(target=lambda: dst.run(listener.accept(timeout=30)))
        t.start()
        src = SourceMigration(sg, profile, opts, vcpus=1,
                              on_status=lambda old, new: seen.append(new.value))
        result = {}
        runner = threading.Thread(target=lambda: result.setdefault(
            "info", src.run(connect(listener.uri))))
        runner.start()
        deadline = time.monotonic() + 30
        while src.state.status.value != "pre-switchover":
            assert time.monotonic() < deadline and runner.is_alive()
            time.sleep(0.01)
        assert not sg.running                        # stopped before pre-switchover
        time.sleep(0.2)
        assert src.state.status.value == "pre-switchover"
        with pytest.raises(Exception):
            src.migrate_continue("active")            # guarded by the expected state
        src.migrate_continue("pre-switchover")
        runner.join(30)
        t.join(30)
        listener.close()
        assert result["info"].status == "completed"
        assert seen[-4:] == ["active", "pre-switchover", "device", "completed"]
        assert dst.state.status.value == "completed"


def test_multifd_sync_orders_rounds_ab_four_channels():
    """QEMU's SYNC guarantee under a live ab guest: 4 channels, many rounds.

    QEMU's own recipe: start with settings that cannot converge (a 1 ms
    downtime limit and a bandwidth cap: QEMU <= 7.2 used 30 MB/s), prove
    several bitmap rounds went by, then switch to settings that converge.  Pages re-sent in later rounds travel on other
    channels than their older copies; a stale copy applied last would break
    the ab pattern (or the digests) on the destination.
    """
    opts = make_options({"multifd": True}, {"multifd-channels": 4, "downtime-limit": 1,
                                            "max-bandwidth": 30_000_000})
    profile = get_profile("engine")
    wl = WorkloadSpec("ab", dirty_rate_mbps=100)
    with Guest.create([("m0", 8 << 20)], vcpus=2, workload=wl) as sg, \
            Guest.create([("m0", 8 << 20)], vcpus=2, workload=wl, start=False) as dg:
        from engine.migration.channels import accept_channels
        listener = listen("tcp:127.0.0.1:0")
        dst = DestinationMigration(profile, opts, guest=dg, vcpus=2, verify=True,
                                   ab_check=True, resume=False)
        dst.prepare()
        out = {}

        def serve():
            main, mf = accept_channels(listener, 4, timeout=60)
            with main:
                out["dst"] = dst.run(main, mf)

        t = threading.Thread(target=serve)
        t.start()
        src = SourceMigration(sg, profile, opts, vcpus=2)
        src.compute_digests = True
        runner = threading.Thread(target=lambda: out.setdefault(
            "src", src.run(connect(listener.uri), listener.uri)))
        runner.start()
        deadline = time.monotonic() + 60
        while src.info().to_qmp().get("ram", {}).get("dirty-sync-count", 0) < 6:
            assert time.monotonic() < deadline and runner.is_alive(), src.info()
            time.sleep(0.02)
        src.set_parameters({"downtime-limit": 30000, "max-bandwidth": 1 << 30})
        runner.join(60)
        t.join(60)
        listener.close()
        if dst.pool is not None:
            dst.pool.kill()
        assert out["src"].status == "completed", out["src"].error_desc
        assert out["dst"].status == "completed", out["dst"].error_desc
        assert out["src"].to_qmp()["ram"]["dirty-sync-count"] >= 6
        assert out["src"].to_qmp()["ram"]["multifd-bytes"] > 0
        assert src.switchover_digests == dst.digests
        assert dst.ab_result.ok, dst.ab_result
