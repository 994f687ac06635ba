"""Postcopy from an engine source to a real QEMU destination (7.2 and 10.0).

The guest is QEMU's ``-M none`` with 16 MiB of file-backed RAM (block ``m0``,
``share=on``) filled by :func:`fill_image`; the engine source is a
:class:`SourceMigration` in this process over a :class:`Guest` on its own RAM
file.  QEMU needs ``postcopy-ram`` on its side too; it runs with ``-S``, so
after POSTCOPY_RUN its guest stays paused and nothing but the migration writes
its RAM: the proof of a correct migration is the two RAM files being equal
byte for byte.

Both predate ``postcopy-device`` (10.2): they answer the package's PING 0x42
as any other PING, and the engine source must still move ``postcopy-device``
-> ``postcopy-active`` -> ``completed`` - the "an older destination works"
case of spec 4.4.  7.2 is spoken to with the ``none-7.2`` profile.  No preempt channel here: QEMU 7.2
opens it at setup (what later QEMUs keep as ``x-preempt-pre-7-2``), the
engine at postcopy start, as QEMU 8.0 and later do.

Every process is started inside a ``with`` that kills and reaps it, and every
wait is bounded.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from engine.machine import get_profile
from engine.migration.source import SourceMigration
from engine.ram.guest import Guest
from engine.ram.workloads import WorkloadSpec
from engine.transport import connect
from tests.qemu import PAGE_SIZE, QemuVM, fill_image, image_differences, parse_size

pytestmark = pytest.mark.interop

SIZE = "16M"
SIZE_BYTES = parse_size(SIZE)
SEED = 7_2_2
#: Upper bound for any single wait; never reached when things work.
WAIT_S = 120.0
#: What QEMU's RAM file holds before the migration: no page of it is zero,
#: and no page of the source looks like it.
STALE_BYTE = 0xA5


def _second_path(shm_path: Path, suffix: str) -> Path:
    # Same prefix so the suite's /dev/shm leak check covers it.
    return shm_path.with_name(f"{shm_path.name}-{suffix}")


def _fill_stale(path: Path) -> None:
    with open(path, "wb") as f:
        chunk = bytes([STALE_BYTE]) * (1 << 20)
        for _ in range(SIZE_BYTES // len(chunk)):
            f.write(chunk)


def _run_bounded(mig: SourceMigration, uri: str):
    out: dict = {}

    def run():
        try:
            with connect(uri) as channel:
                out["info"] = mig.run(channel, uri)
        except BaseException as exc:     # noqa: BLE001 - re-raised below
            out["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(WAIT_S)
    assert not t.is_alive(), f"the engine source hung in {mig.state.status}"
    if "error" in out:
        raise out["error"]
    return out["info"]


@pytest.mark.parametrize("after", [0, 1], ids=["at-once", "after-1-pass"])
def test_engine_postcopy_to_qemu(qemu, tmp_shm_path, after):
    """``after`` 0: every page goes in postcopy.  1: one precopy pass, during
    which the guest rewrites a quarter of its memory (every other page of
    it, so the discards are many short ranges); those pages are discarded
    and sent in postcopy."""
    engine_ram = tmp_shm_path
    qemu_ram = _second_path(tmp_shm_path, "qemu")
    fill_image(engine_ram, SIZE, SEED)
    _fill_stale(qemu_ram)
    guest = None
    try:
        guest = Guest.create([("m0", SIZE_BYTES, str(engine_ram))], vcpus=0,
                             workload=WorkloadSpec("none"), start=False)
        block = guest.blocks[0]
        rewritten = np.arange(block.npages // 2, block.npages * 3 // 4, 2)

        def rewrite(passes: int) -> None:
            # What a running guest would do: store, then mark dirty.
            rng = np.random.default_rng(passes)
            block.pages[rewritten] = rng.integers(0, 256, (len(rewritten), PAGE_SIZE),
                                                  dtype=np.uint8)
            guest.dirty_log("m0").mark_pages(rewritten)

        profile = get_profile("none" if qemu.modern else "none-7.2")
        opts = profile.default_options().with_capabilities({"postcopy-ram": True})
        mig = SourceMigration(guest, profile, opts, vcpus=0,
                              postcopy_after=after, on_pass=rewrite)
        with QemuVM(qemu_ram, SIZE, incoming="defer", name="qemu-dst", qemu=qemu) as dst:
            dst.set_caps({"postcopy-ram": True})
            dst.migrate_incoming("tcp:127.0.0.1:0")
            uri = f"tcp:127.0.0.1:{dst.incoming_port()}"
            info = _run_bounded(mig, uri)
            q = info.to_qmp()
            assert q["status"] == "completed", (
                f"{q}\nerror: {mig.error}\nQEMU query-migrate: {dst.query_migrate()}\n"
                f"QEMU log: {dst.log_tail()}")
            states = [s.value for _, s in mig.state.history]
            assert states[-4:] == ["device", "postcopy-device", "postcopy-active", "completed"]
            assert 0x42 in mig.pongs                # answered as any PING
            assert q["ram"]["postcopy-bytes"] > 0
            dst.wait_for_status("completed", timeout=WAIT_S)
            # -S: the destination leaves the guest paused after POSTCOPY_RUN.
            assert dst.query_status() in ("prelaunch", "paused")
            guest.close()
            guest = None
            diff = image_differences(engine_ram, qemu_ram)
            assert diff is None, diff
    finally:
        if guest is not None:
            guest.close()
        qemu_ram.unlink(missing_ok=True)
