"""The boot-sector guest (tests/bootblock.py) under QEMU 7.2 and 10.0.

It is what makes a QEMU source re-dirty memory: these tests show that it
boots, keeps every page of its range changing, and makes QEMU's own xbzrle
encode re-sent pages in a QEMU-to-QEMU migration that ends with equal RAM.

The migration test runs with QEMU 10.0 only.  QEMU 7.2 (Debian's 7.2.22,
TCG) was seen to lose track of this guest's writes after the first passes:
its own destination ended with stale bytes (the BIOS data area's timer tick
without xbzrle, the guest's counters with it) and no page was re-sent a
second time, so it never reaches xbzrle's third pass.  10.0 never showed it.
"""
from __future__ import annotations

import os
import time

import pytest

from tests import bootblock
from tests.qemu import QemuVM, free_tcp_port, image_differences

pytestmark = pytest.mark.interop

SIZE = "32M"


def _ram(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def wait_until_dirtying(ram_path, timeout: float = 30.0) -> None:
    """Return once every page of the guest's range has changed (it booted and loops)."""
    deadline = time.monotonic() + timeout
    before = bootblock.counters(_ram(ram_path))
    while True:
        time.sleep(0.2)
        after = bootblock.counters(_ram(ram_path))
        if all(a != b for a, b in zip(before, after)):
            return
        assert time.monotonic() < deadline, \
            f"the guest's pages did not all change in {timeout} s: {before} -> {after}"


def test_the_guest_keeps_dirtying_its_pages(qemu, tmp_path, tmp_shm_path):
    image = bootblock.write_image(tmp_path / "boot.img")
    with QemuVM(tmp_shm_path, SIZE, qemu=qemu, machine="pc",
                extra_args=bootblock.boot_args(image)) as vm:
        vm.cmd("cont")
        wait_until_dirtying(tmp_shm_path)


def test_qemu_xbzrle_migration_of_the_guest(qemu10, tmp_path, tmp_shm_path):
    qemu = qemu10
    image = bootblock.write_image(tmp_path / "boot.img")
    dst_path = f"{tmp_shm_path}-dst"
    port = free_tcp_port()
    args = bootblock.boot_args(image)
    with QemuVM(tmp_shm_path, SIZE, qemu=qemu, machine="pc", extra_args=args,
                name="src") as src, \
            QemuVM(dst_path, SIZE, qemu=qemu, machine="pc", extra_args=args, name="dst",
                   incoming=f"tcp:127.0.0.1:{port}") as dst:
        for vm in (src, dst):
            vm.set_caps({"xbzrle": True})
        # Slow enough that the guest's 143 pages are dirty again at every
        # pass, so pages reach the third pass where xbzrle encodes them.
        src.set_params({"max-bandwidth": 4 << 20, "downtime-limit": 20})
        src.cmd("cont")
        wait_until_dirtying(tmp_shm_path)
        src.migrate_when_listening(f"tcp:127.0.0.1:{port}")
        # QEMU judges convergence by whole pages, not by their XBZRLE size:
        # once pages went as XBZRLE, a downtime-limit that fits the guest's
        # 143 pages lets it finish (a fast guest never fits 20 ms).
        deadline = time.monotonic() + 60
        while src.query_migrate().get("xbzrle-cache", {}).get("pages", 0) == 0:
            assert time.monotonic() < deadline, f"no page went as XBZRLE: {src.query_migrate()}"
            time.sleep(0.1)
        src.set_params({"downtime-limit": 2000})
        info = src.wait_for_status("completed", timeout=120)
        assert info["xbzrle-cache"]["pages"] > 0, f"no page went as XBZRLE: {info}"
        assert dst.query_status() in ("paused", "running", "postmigrate", "inmigrate")
    try:
        assert image_differences(tmp_shm_path, dst_path) is None
    finally:
        os.unlink(dst_path)
