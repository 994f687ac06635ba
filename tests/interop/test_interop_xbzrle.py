"""XBZRLE between the engine and a real QEMU, both ways.

* engine -> QEMU: a live ``engine migrate`` of a guest whose vCPU re-dirties
  a hot set, over a slow link, into a QEMU ``-M none`` destination that was
  not told about xbzrle (a QEMU destination takes XBZRLE records whenever
  they come).  RAM byte-equal, and XBZRLE records were sent.
* QEMU -> engine: QEMU 10 boots the boot-sector guest (tests/bootblock.py),
  which keeps incrementing a byte in each of 143 pages, and migrates with
  xbzrle into a file; the engine's decoder and RAM loader apply the stream's
  RAM and must end with the RAM QEMU's source stopped with.  QEMU 7.2 loses
  this guest's writes under TCG (see test_bootblock_guest.py), so it cannot
  be such a source.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from engine.migration.ramload import RamLoader
from engine.stream import events as ev
from engine.stream.decoder import StreamDecoder
from tests import bootblock
from tests.interop.test_bootblock_guest import wait_until_dirtying
from tests.interop.test_interop_precopy import qemu_machine
from tests.qemu import ManagedProcess, QemuVM, fill_image, image_differences, parse_size

pytestmark = pytest.mark.interop

WAIT_S = 120.0


def test_engine_xbzrle_source_to_qemu(qemu, engine_cmd, tmp_shm_path, tmp_path):
    size = "32M"
    engine_ram = tmp_shm_path
    qemu_ram = tmp_shm_path.with_name(f"{tmp_shm_path.name}-qemu")
    report = tmp_path / "migrate.json"
    fill_image(engine_ram, size, 14)
    try:
        with QemuVM(qemu_ram, size, incoming="defer", name="qemu-dst", qemu=qemu) as dst:
            dst.migrate_incoming("tcp:127.0.0.1:0")
            uri = f"tcp:127.0.0.1:{dst.incoming_port()}"
            with ManagedProcess([*engine_cmd, "migrate", "--to", uri,
                                 "--machine", qemu_machine(qemu), "--ram", size,
                                 "--mem-path", engine_ram, "--vcpus", "1",
                                 "--workload", "random", "--dirty-rate", "8",
                                 "--hot-set", "0.05", "--cap", "xbzrle=on",
                                 "--param", "max-bandwidth=16M",
                                 "--param", "downtime-limit=20",
                                 "--param", "xbzrle-cache-size=16M", "--json", report],
                                tmp_path, "engine-migrate") as src:
                rc = src.wait(timeout=WAIT_S)
            dst.completed_from(src, rc, timeout=WAIT_S)
            # The engine's source stays stopped after switchover: its RAM file
            # is what the destination must hold.
            diff = image_differences(engine_ram, qemu_ram)
            assert diff is None, f"QEMU's RAM differs from the engine's at switchover: {diff}"
        data = json.loads(report.read_text())
        x = data["migration"]["xbzrle-cache"]
        assert x["pages"] > 0, x
        assert data["migration"]["ram"]["dirty-sync-count"] >= 3
    finally:
        qemu_ram.unlink(missing_ok=True)


class _DevicesReached(Exception):
    """The first FULL device section: RAM is all in (-M pc's devices are not ours)."""


def _no_devices(idstr, instance_id):
    raise _DevicesReached(idstr)


class _Block:
    def __init__(self, idstr, length, page_size):
        self.idstr = idstr
        self.pages = np.zeros((length // page_size, page_size), np.uint8)
        self.fresh = True


def _load_ram(stream_path, page_size=4096):
    """Apply a stream's RAM with the engine's decoder and loader: (blocks, counts)."""
    dec = StreamDecoder(_no_devices, channel="qemu.stream", page_runs=True)
    blocks = loader = None
    kinds: dict[str, int] = {}
    with open(stream_path, "rb") as f:
        dec.feed(f.read())
    dec.feed_eof()
    try:
        while (e := dec.next_event()) is not ev.NEED_DATA:
            kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
            if isinstance(e, ev.RamBlockList):
                blocks = {b.idstr: _Block(b.idstr, b.used_length, page_size) for b in e.blocks}
                received = {k: np.zeros(len(b.pages), bool) for k, b in blocks.items()}
                loader = RamLoader(list(blocks.values()), received, page_size)
            elif isinstance(e, (ev.RamPages, ev.RamZeros, ev.RamXbzrle)):
                loader.apply(e)
    except _DevicesReached:
        pass
    else:
        pytest.fail(f"the stream ended without a device section: {kinds}")
    return blocks, loader, kinds


def test_qemu10_xbzrle_stream_decoded_by_the_engine(qemu10, tmp_path, tmp_shm_path):
    size = "32M"
    image = bootblock.write_image(tmp_path / "boot.img")
    stream = tmp_path / "qemu.stream"
    with QemuVM(tmp_shm_path, size, qemu=qemu10, machine="pc",
                extra_args=bootblock.boot_args(image), name="qemu-src") as src:
        src.set_caps({"xbzrle": True})
        # Slow enough for the guest's pages to be dirty again at every pass,
        # so that they reach the pass where xbzrle encodes them.
        src.set_params({"max-bandwidth": 4 << 20, "downtime-limit": 20})
        src.cmd("cont")
        wait_until_dirtying(tmp_shm_path)
        src.migrate(f"exec:cat > {stream}")
        # QEMU judges convergence by whole pages, not their XBZRLE size: once
        # pages went as XBZRLE, a downtime-limit the guest's pages fit lets it
        # finish (a fast guest never fits 20 ms, and the file keeps growing).
        deadline = time.monotonic() + WAIT_S
        while src.query_migrate().get("xbzrle-cache", {}).get("pages", 0) == 0:
            assert time.monotonic() < deadline, src.query_migrate()
            time.sleep(0.1)
        src.set_params({"downtime-limit": 2000})
        info = src.wait_for_status("completed", timeout=WAIT_S)
        assert info["xbzrle-cache"]["pages"] > 0, info
        # The guest stays stopped after a completed migration: its RAM file
        # now holds what the stream ended with.
        with open(tmp_shm_path, "rb") as f:
            final = f.read()
    blocks, loader, kinds = _load_ram(stream)
    assert kinds.get("RamXbzrle", 0) > 0 and loader.xbzrle_pages == kinds["RamXbzrle"], kinds
    ram = [b for b in blocks.values() if b.pages.nbytes == parse_size(size)]
    assert len(ram) == 1, sorted(blocks)
    got = ram[0].pages.tobytes()
    if got != final:
        bad = np.flatnonzero((np.frombuffer(got, np.uint8) != np.frombuffer(final, np.uint8))
                             .reshape(-1, 4096).any(axis=1))
        pytest.fail(f"{len(bad)} pages of {ram[0].idstr} differ, first {bad[:8].tolist()}")
    os.unlink(stream)
