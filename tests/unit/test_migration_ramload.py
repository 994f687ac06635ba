"""RamLoader: precopy page records landing in guest memory, a run at a time."""
from __future__ import annotations

import numpy as np

from engine.migration.ramload import RamLoader
from engine.ram.block import RamBlock
from engine.stream import events as ev

PS = 4096


def loader(tmp_shm_path, fresh: bool, npages: int = 16):
    if not fresh:
        tmp_shm_path.write_bytes(b"\x55" * npages * PS)     # a used destination
    block = RamBlock.create("m0", npages * PS, mem_path=str(tmp_shm_path))
    assert block.fresh is fresh
    received = {"m0": np.zeros(npages, np.uint8)}
    return block, RamLoader([block], received, PS)


def offsets(*pages):
    return np.array(pages, np.uint64) * np.uint64(PS)


def test_a_run_lands_where_its_offsets_say_and_the_last_copy_wins(tmp_shm_path):
    block, ram = loader(tmp_shm_path, fresh=True)
    with block:
        data = np.stack([np.full(PS, v, np.uint8) for v in (1, 2, 3, 4)])
        ram.apply(ev.RamPages("m0", offsets(7, 2, 9, 2), data))
        assert block.pages[7, 0] == 1 and block.pages[9, 0] == 3
        assert (block.pages[2] == 4).all()                  # sent twice: the later one
        assert np.flatnonzero(ram.received["m0"]).tolist() == [2, 7, 9]
        assert ram.pages == 4
        ram.apply(ev.RamPage("m0", 5 * PS, memoryview(bytes([8]) * PS)))
        assert (block.pages[5] == 8).all() and ram.pages == 5


def test_zero_pages_clear_a_used_block(tmp_shm_path):
    block, ram = loader(tmp_shm_path, fresh=False)
    with block:
        block.pages[3] = 0
        ram.apply(ev.RamZeros("m0", offsets(1, 3, 4)))
        assert not block.pages[[1, 3, 4]].any()
        assert (block.pages[[0, 2, 5]] == 0x55).all()
        assert ram.zero_pages == 3
        assert np.flatnonzero(ram.received["m0"]).tolist() == [1, 3, 4]


def test_a_fresh_block_trusts_its_zeros_until_a_page_arrives(tmp_shm_path):
    """Memory this process created is zero where nothing was received; only a
    page that was received before is cleared (or even touched) again."""
    block, ram = loader(tmp_shm_path, fresh=True)
    with block:
        ram.apply(ev.RamPages("m0", offsets(6), np.full((1, PS), 9, np.uint8)))
        # Stand-in for memory the loader must not touch: if it did, it would
        # clear this page.
        block.pages[2] = 0x77
        ram.apply(ev.RamZeros("m0", offsets(2, 6)))
        assert (block.pages[2] == 0x77).all()               # trusted, untouched
        assert not block.pages[6].any()                     # received before: cleared
        ram.apply(ev.RamZero("m0", 2 * PS))
        assert not block.pages[2].any()                     # received now: cleared


# -- postcopy: through a Placer, first copy wins, requested pages reported ---------------

def _postcopy_loader(tmp_shm_path, lock=None):
    from engine.postcopy.placer import Placer
    block = RamBlock.create("m0", 16 * PS, mem_path=str(tmp_shm_path))
    received = np.zeros(16, np.uint8)
    requested = np.zeros(16, np.uint8)
    ram = RamLoader([block], {"m0": received}, PS)
    placed = []
    ram.place_through(Placer([block], [received], lock=lock), [requested],
                      lambda b, p: placed.append((b, p)))
    return block, ram, received, requested, placed


def test_postcopy_pages_go_in_once_and_requested_ones_are_reported(tmp_shm_path):
    import threading
    block, ram, received, requested, placed = _postcopy_loader(tmp_shm_path,
                                                               lock=threading.Lock())
    with block:
        ram.apply(ev.RamPages("m0", offsets(3), np.full((1, PS), 1, np.uint8)))
        requested[[3, 5, 8]] = 1
        data = np.stack([np.full(PS, v, np.uint8) for v in (2, 3, 4, 5)])
        # Page 3 is in place already (a vCPU may have changed it since), and
        # page 5 comes twice in the run: its first copy wins.
        ram.apply(ev.RamPages("m0", offsets(3, 5, 7, 5), data))
        assert (block.pages[3] == 1).all()
        assert (block.pages[5] == 3).all() and (block.pages[7] == 4).all()
        assert np.flatnonzero(received).tolist() == [3, 5, 7]
        assert ram.pages == 5
        ram.apply(ev.RamZeros("m0", offsets(8, 9)))
        assert received[8] and received[9] and not block.pages[8].any()
        # Requested pages are reported whether or not this run placed them.
        assert (0, 3) in placed and (0, 5) in placed and (0, 8) in placed
        assert (0, 7) not in placed and (0, 9) not in placed


def test_postcopy_zero_pages_clear_a_used_block_only_where_needed(tmp_shm_path):
    tmp_shm_path.write_bytes(b"\x55" * 16 * PS)
    block, ram, received, _, _ = _postcopy_loader(tmp_shm_path)
    with block:
        assert not block.fresh
        block.pages[4] = 0
        ram.apply(ev.RamZeros("m0", offsets(2, 4)))
        assert not block.pages[[2, 4]].any() and (block.pages[3] == 0x55).all()
        assert received[2] and received[4] and ram.zero_pages == 2
