"""The RAM save side and the switchover pieces, in one process."""
from __future__ import annotations

import numpy as np
import pytest

from engine.errors import BlockMismatchError
from engine.migration.destination import check_block_list
from engine.migration.ramsave import BlockBitmap, encode_batch
from engine.migration.ratelimit import RateLimiter
from engine.stream import events as ev
from engine.stream.decoder import StreamDecoder
from engine.stream import encoder as enc

PS = 4096


def decode_records(data: bytes, blocks):
    """Wrap records in a RAM section and decode them with the real decoder."""
    stream = (enc.file_header() + enc.configuration("none")
              + enc.section_start(2, "ram", 0, 4) + enc.ram_block_list(blocks)
              + enc.ram_eos() + enc.section_footer(2)
              + enc.section_part(2) + data + enc.ram_eos() + enc.section_footer(2))
    dec = StreamDecoder(lambda *_: None)
    dec.feed(stream)
    out = []
    while (e := dec.next_event()) is not ev.NEED_DATA:
        if isinstance(e, ev.RamPage):
            out.append(("page", e.block, e.offset, bytes(e.data)))
        elif isinstance(e, ev.RamZero):
            out.append(("zero", e.block, e.offset))
    return out


@pytest.mark.parametrize("detect_zero", [True, False])
def test_encode_batch_round_trips_through_the_decoder(detect_zero):
    rng = np.random.default_rng(1)
    pages = rng.integers(0, 256, size=(64, PS), dtype=np.uint8)
    pages[[3, 4, 10, 63]] = 0
    idx = np.array([0, 3, 4, 5, 10, 20, 63])
    res = encode_batch("blk", pages, idx, PS, detect_zero)
    data = b"".join(bytes(b) for b in res.buffers)
    assert res.wire_bytes == len(data)
    got = decode_records(data, [("blk", 64 * PS)])
    zero_idx = {3, 4, 10, 63} if detect_zero else set()
    assert res.zero == len(zero_idx) and res.normal == len(idx) - len(zero_idx)
    seen = {}
    for rec in got:
        assert rec[1] == "blk"
        seen[rec[2] // PS] = rec
    assert set(seen) == set(idx.tolist())
    for i, rec in seen.items():
        if i in zero_idx:
            assert rec[0] == "zero"
        else:
            assert rec[0] == "page" and rec[3] == pages[i].tobytes()


def test_encode_batch_all_zero_names_its_block_once():
    pages = np.zeros((8, PS), np.uint8)
    res = encode_batch("m0", pages, np.arange(8), PS, True)
    got = decode_records(b"".join(bytes(b) for b in res.buffers), [("m0", 8 * PS)])
    assert [r[0] for r in got] == ["zero"] * 8
    # 8-byte address word + fill byte each, plus the name once
    assert res.wire_bytes == 8 * 9 + 1 + len("m0")


def test_encode_batch_sends_pages_from_guest_memory():
    """No staging copy: each PAGE record is its header and a view of the page
    where it lies (a write after this is a dirty page, sent again later)."""
    pages = np.full((4, PS), 7, np.uint8)
    res = encode_batch("b", pages, np.arange(4), PS, True)
    views = [b for b in res.buffers if len(b) == PS]
    assert len(views) == 4
    assert all(np.shares_memory(np.frombuffer(v, np.uint8), pages) for v in views)
    pages[2] = 9
    got = decode_records(b"".join(bytes(b) for b in res.buffers), [("b", 4 * PS)])
    assert got[2][3] == bytes([9]) * PS


class FakeLog:
    def __init__(self):
        self.pending = np.array([], dtype=np.int64)

    def harvest(self):
        out, self.pending = self.pending, np.array([], dtype=np.int64)
        return out


class FakeBlock:
    def __init__(self, npages):
        self.npages = npages


def test_block_bitmap_rounds_and_sync():
    log = FakeLog()
    bm = BlockBitmap(FakeBlock(1000), log, 4096)
    assert bm.pending() == 1000                     # first round: everything
    taken = np.concatenate([bm.take(256) for _ in range(4)])
    assert sorted(taken.tolist()) == list(range(1000))
    assert bm.pending() == 0 and len(bm.take(256)) == 0
    log.pending = np.array([5, 500, 999])          # harvest: unique, ascending
    bm.seek(0)
    assert bm.sync() == 3
    assert bm.take(256).tolist() == [5, 500, 999]
    log.pending = np.array([7])
    bm.sync()
    bm.seek(0)
    log.pending = np.array([7, 8])                  # 7 already pending: only 8 is new
    assert bm.sync() == 1
    assert bm.pending() == 2 == np.count_nonzero(bm.bits)


def test_block_bitmap_keeps_its_count_and_skips_what_was_taken_meanwhile():
    """take, take_range, take_page and set_missing keep pending() equal to the
    bits; pages a request took out of the scan's way are not taken twice."""
    log = FakeLog()
    bm = BlockBitmap(FakeBlock(1000), log, 4096)
    first = bm.take(100)
    assert first.tolist() == list(range(100))
    # A request takes 150..159 and one page; the scan goes on after them.
    assert bm.take_range(150, 10).tolist() == list(range(150, 160))
    assert bm.take_page(170) and not bm.take_page(170)
    assert bm.take(5).tolist() == [171, 172, 173, 174, 175]
    assert bm.pending() == np.count_nonzero(bm.bits) == 1000 - 100 - 10 - 1 - 5
    bm.seek(0)
    rest = np.concatenate([bm.take(64) for _ in range(20)])
    assert 150 not in rest and 170 not in rest and 100 in rest
    assert bm.pending() == 0
    received = np.zeros(1000, bool)
    received[::2] = True
    bm.set_missing(received)
    assert bm.pending() == 500 and bm.take(3).tolist() == [1, 3, 5]


def test_rate_limiter_budget_per_window():
    now = [0.0]
    lim = RateLimiter(1000, clock=lambda: now[0])   # 100 bytes per 100 ms window
    assert not lim.exceeded()
    lim.account(99)
    assert not lim.exceeded()
    lim.account(1)
    assert lim.exceeded()
    now[0] = 0.1                                    # a new window starts fresh
    assert not lim.exceeded()
    assert not RateLimiter(0).exceeded()            # 0 = unlimited, as in QEMU


def test_check_block_list_names_block_and_lengths():
    class B:
        def __init__(self, idstr, n):
            self.idstr, self.used_length = idstr, n
    announced = ev.RamBlockList(32 << 20, (ev.RamBlockInfo("pc.ram", 32 << 20, None),))
    check_block_list(announced, [B("pc.ram", 32 << 20)])
    with pytest.raises(BlockMismatchError, match=r"pc\.ram: 0x2000000 .* 0x1000000"):
        check_block_list(announced, [B("pc.ram", 16 << 20)])
    with pytest.raises(BlockMismatchError, match='Unknown ramblock "pc.ram"'):
        check_block_list(announced, [B("m0", 32 << 20)])


def test_rate_limiter_sizes_batches_by_what_is_left_of_the_window():
    now = [0.0]
    lim = RateLimiter(10_000, clock=lambda: now[0])  # 1000 bytes per window
    assert lim.room() == 1000
    assert lim.batch_pages(100) == 10
    lim.account(750)
    assert lim.room() == 250 and lim.batch_pages(100) == 2
    assert lim.batch_pages(100, most=1) == 1
    lim.account(300)
    assert lim.room() == 0 and lim.batch_pages(100) == 1   # always moves a page
    lim.account(-500)                                       # bytes given back
    assert lim.room() == 450
    unlimited = RateLimiter(0)
    assert unlimited.room() is None and unlimited.batch_pages(100, most=77) == 77
