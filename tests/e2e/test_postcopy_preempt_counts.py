"""Postcopy-preempt end to end: the fault handler's urgent pages are counted.

A source guest that precopy cannot converge (QEMU's `ab` loop at full speed,
1 ms downtime limit) goes postcopy after one pass, with the preempt channel
and a slow postcopy background, so the destination's vCPUs fault and their
pages come on the preempt channel, placed by the fault handler through its
own RamLoader.  The handler's statistics count them, and the destination's
query-migrate adds them to what the main channel brought: every page the
source sent arrived somewhere, and memory is the source's.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from engine import uffd
from engine.library import make_options
from engine.machine import get_profile
from engine.migration.destination import DestinationMigration
from engine.migration.source import SourceMigration
from engine.ram.abcheck import ab_region
from engine.ram.guest import Guest
from engine.ram.workloads import WorkloadSpec
from engine.transport import connect, listen

HAVE_UFFD, UFFD_REASON = uffd.probe()
FAULT_MODES = [pytest.param("userfaultfd", marks=pytest.mark.skipif(
    not HAVE_UFFD, reason=f"userfaultfd: {UFFD_REASON}")), "software"]

RAM = 16 << 20
PS = 4096
TIMEOUT = 120
PROFILE = get_profile("engine")
WORKLOAD = WorkloadSpec("ab", dirty_rate_mbps=0)


def _fill(guest: Guest) -> None:
    """Contents worth comparing: random pages, every fourth one zero."""
    pages = guest.block("ram0").pages
    rng = np.random.default_rng(5)
    pages[:] = rng.integers(0, 256, size=pages.shape, dtype=np.uint8)
    pages[::4] = 0


@pytest.mark.parametrize("faults", FAULT_MODES)
def test_preempt_pages_are_counted_and_land(faults):
    sg = Guest.create([("ram0", RAM)], vcpus=2, workload=WORKLOAD, start=False)
    dg = Guest.create([("ram0", RAM)], vcpus=2, workload=WORKLOAD, start=False)
    listener = listen("tcp:127.0.0.1:0")
    try:
        _fill(sg)
        sg.start()
        # A slow background (about 2 s for the guest), so that the pages the
        # destination's vCPUs touch are asked for and come on the preempt channel.
        opts = make_options({"postcopy-ram": True, "postcopy-preempt": True},
                            {"downtime-limit": 1, "max-postcopy-bandwidth": 8 << 20})
        dst = DestinationMigration(PROFILE, opts, guest=dg, vcpus=2, verify=True,
                                   ab_check=True, postcopy_faults=faults)
        dst.prepare()
        result: dict = {}

        def serve():
            try:
                with listener.accept(timeout=30) as ch:
                    result["info"] = dst.run(ch, listener=listener)
            finally:
                dst.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        src = SourceMigration(sg, PROFILE, opts, vcpus=2, postcopy_after=1)
        with connect(listener.uri) as ch:
            sinfo = src.run(ch, listener.uri)
        t.join(TIMEOUT)
        assert not t.is_alive(), "the destination did not finish"
        assert sinfo.status == "completed", sinfo.error_desc
        dinfo = result["info"]
        assert dinfo.status == "completed", dinfo.error_desc
        assert dst.ab_result is not None and dst.ab_result.ok

        stats = dst.postcopy.stats()
        assert stats["postcopy-requests"] > 0, stats
        assert stats["preempt-pages"] + stats["preempt-zero-pages"] > 0, stats
        # The preempt channel's figures are in the ram counts, not members.
        assert not {"preempt-pages", "preempt-zero-pages"} & set(dinfo.extra or {})
        npages = RAM // PS
        got = dinfo.ram.normal + dinfo.ram.duplicate
        assert got >= npages
        # Every page the source sent, on either channel, was counted here.
        assert got == sinfo.ram.normal + sinfo.ram.duplicate, (dinfo.ram, sinfo.ram)
        assert dinfo.ram.normal >= dst.pages + stats["preempt-pages"]
        assert dinfo.ram.duplicate >= dst.zero_pages + stats["preempt-zero-pages"]

        # Memory: the source's (stopped since switchover), except byte 0 of
        # the `ab` region's pages, which the destination's vCPUs go on
        # incrementing (the ab check above judged those).
        dg.stop()
        s = sg.block("ram0").pages
        d = dg.block("ram0").pages
        assert np.array_equal(s[:, 1:], d[:, 1:])
        lo, hi = ab_region(len(s), PS)
        assert np.array_equal(s[:lo], d[:lo]) and np.array_equal(s[hi:], d[hi:])
    finally:
        listener.close()
        sg.close()
        dg.close()
