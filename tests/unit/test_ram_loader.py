"""RamLoader's postcopy single-page path (the preempt channel's): straight to
a real Placer, and it says whether this call placed the page.

The fault handler wakes the placing vCPU's waiters itself only when the
call did not place the page (UFFDIO_COPY wakes them when it installs it),
so "placed" must be exact: a page placed twice answers 1, then 0.
"""
from __future__ import annotations

import contextlib
import multiprocessing

import numpy as np
import pytest

from engine.postcopy.placer import Placer
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog
from engine.ram.loader import RamLoader, received_maps
from engine.stream import events as ev
from engine.uffd import Userfaultfd, buffer_address, probe, punch_hole

PS = 4096
needs_uffd = pytest.mark.skipif(not probe()[0], reason=f"no userfaultfd here: {probe()[1]}")


def _page(value: int) -> bytes:
    return bytes([value]) * PS


@pytest.fixture
def ram():
    """Two blocks, all holes, and shared received bitmaps, as the fault
    handler has them."""
    with contextlib.ExitStack() as stack:
        blocks, logs = [], []
        for name, npages in (("pc.ram", 32), ("vga.vram", 8)):
            b = stack.enter_context(RamBlock.create(name, npages * PS))
            stack.callback(b.unlink)
            punch_hole(b.fd, 0, b.used_length)
            log = DirtyLog.create(npages)
            stack.callback(log.unlink)
            stack.callback(log.close)
            blocks.append(b)
            logs.append(log.log)
        yield blocks, logs


def _lock():
    return multiprocessing.get_context("spawn").Lock()


@pytest.mark.parametrize("mode", ["plain", "software"])
def test_a_single_page_placed_twice_is_placed_once(ram, mode):
    blocks, received = ram
    placer = Placer(blocks, received, lock=_lock() if mode == "software" else None)
    assert placer.mode == mode
    loader = RamLoader(blocks, received_maps(blocks, received), PS)
    loader.place_through(placer)
    assert loader.land_page("vga.vram", 3 * PS, _page(7)) == 1
    assert received[1][3] == 1 and (blocks[1].pages[3] == 7).all()
    # Again, other contents: not placed, the first copy stays.
    assert loader.land_page("vga.vram", 3 * PS, _page(9)) == 0
    assert (blocks[1].pages[3] == 7).all()
    # Zero pages the same way; a page that is there is not made zero.
    assert loader.apply(ev.RamZero("pc.ram", 5 * PS)) == 1
    assert loader.apply(ev.RamZero("pc.ram", 5 * PS)) == 0
    assert loader.apply(ev.RamZero("vga.vram", 3 * PS)) == 0
    assert (blocks[1].pages[3] == 7).all() and not blocks[0].pages[5].any()
    assert loader.apply(ev.RamPage("pc.ram", 6 * PS, memoryview(_page(1)))) == 1
    assert loader.apply(ev.RamPage("pc.ram", 6 * PS, memoryview(_page(2)))) == 0
    assert (blocks[0].pages[6] == 1).all()
    # Every record counts (it arrived), placed or not.
    assert (loader.pages, loader.zero_pages) == (4, 3)
    assert np.flatnonzero(received[0]).tolist() == [5, 6]


def test_a_requested_page_is_reported_once_placed(ram):
    blocks, received = ram
    requested = [np.zeros(b.npages, np.uint8) for b in blocks]
    requested[0][4] = 1
    seen = []
    loader = RamLoader(blocks, received_maps(blocks, received), PS)
    loader.place_through(Placer(blocks, received), requested,
                         lambda b, p: seen.append((b, p)))
    assert loader.land_page("pc.ram", 3 * PS, _page(3)) == 1
    assert seen == []
    assert loader.land_page("pc.ram", 4 * PS, _page(4)) == 1
    assert seen == [(0, 4)]


def test_precopy_single_pages_say_they_landed(ram):
    """Before LISTEN the same call lands through arrays and answers 1 each
    time (precopy: the last copy wins)."""
    blocks, received = ram
    loader = RamLoader(blocks, received_maps(blocks, received), PS)
    assert loader.land_page("pc.ram", 2 * PS, _page(5)) == 1
    assert loader.land_page("pc.ram", 2 * PS, _page(6)) == 1
    assert (blocks[0].pages[2] == 6).all() and received[0][2]


@needs_uffd
def test_uffd_copy_over_a_page_another_placer_installed_is_not_placed(ram):
    """Two placers, each with its own view of "received" (as if the other
    were another process that has not published its bit): the kernel's
    EEXIST makes the second one answer 0, and the first copy stays."""
    blocks, received = ram
    uffd = Userfaultfd.open()
    bases = tuple(buffer_address(b.pages) for b in blocks)
    try:
        for b, base in zip(blocks, bases):
            uffd.register(base, b.used_length)
        other = [np.zeros(b.npages, np.uint8) for b in blocks]
        first = RamLoader(blocks, received_maps(blocks, received), PS)
        first.place_through(Placer(blocks, received, uffd=uffd, bases=bases))
        second = RamLoader(blocks, received_maps(blocks, other), PS)
        second.place_through(Placer(blocks, other, uffd=uffd, bases=bases))
        assert first.land_page("pc.ram", 9 * PS, _page(1)) == 1
        assert second.land_page("pc.ram", 9 * PS, _page(2)) == 0
        assert first.land_page("pc.ram", 9 * PS, _page(3)) == 0
        assert second.land_page("vga.vram", 0, None) == 1
        assert first.land_page("vga.vram", 0, None) == 0
        # Both views count the page as there now.
        assert other[1][0] == 1 and received[1][0] == 1
    finally:
        for b, base in zip(blocks, bases):
            uffd.unregister(base, b.used_length)
        uffd.close()
    assert (blocks[0].pages[9] == 1).all()
