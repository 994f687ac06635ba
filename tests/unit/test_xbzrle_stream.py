"""XBZRLE records on the main stream: the source's batch encoder
(engine/migration/xbzrle.py), the decoder's RamXbzrle event and the RAM
loader applying it (QEMU's save_xbzrle_page, load_xbzrle)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from engine.devices import lookup_qemu_vmsd
from engine.errors import RemoteProtocolError
from engine.migration.ramload import RamLoader
from engine.migration.xbzrle import XbzrleSaver
from engine.stats.accumulator import StatsAccumulator
from engine.stats.hmp import format_info_migrate
from engine.stream import encoder as enc
from engine.stream import NEED_DATA, RamPages, RamXbzrle, RamZeros, StreamDecoder
from engine.stream.encoder import RamRecordEncoder

TPS = 4096
NPAGES = 64


def _stream(body: bytes, blocks=(("m0", NPAGES * TPS),)) -> bytes:
    return (enc.section_start(1, "ram", 0, 4) + enc.ram_block_list(list(blocks))
            + enc.ram_eos() + enc.section_footer(1) + enc.section_part(1) + body)


def _events(data: bytes) -> list:
    dec = StreamDecoder(lookup_qemu_vmsd, expect_header=False, page_runs=True)
    dec.feed(data)
    out = []
    while (e := dec.next_event()) is not NEED_DATA:
        out.append(e)
    return out


def _fail(data: bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        _events(data)
    return info.value


class _Dest:
    """A destination's block and the loader landing a stream in it."""

    def __init__(self):
        self.pages = np.zeros((NPAGES, TPS), np.uint8)
        block = SimpleNamespace(idstr="m0", pages=self.pages, fresh=True)
        self.loader = RamLoader([block], {"m0": np.zeros(NPAGES, bool)}, TPS)
        self.dec = StreamDecoder(lookup_qemu_vmsd, expect_header=False, page_runs=True)

    def load(self, data: bytes) -> list:
        """Decode ``data`` (more of one stream) and land its pages."""
        self.dec.feed(data)
        events = []
        while (e := self.dec.next_event()) is not NEED_DATA:
            events.append(e)
        for e in events:
            if isinstance(e, (RamPages, RamZeros, RamXbzrle)):
                self.loader.apply(e)
        return events


# -- decoder and loader ----------------------------------------------------------

def test_an_xbzrle_record_patches_the_page_the_destination_holds():
    rec = RamRecordEncoder()
    old = np.full(TPS, 7, np.uint8)
    new = old.copy()
    new[100:104] = 1
    encoding = bytes((100, 4, 1, 1, 1, 1))
    data = _stream(rec.page("m0", 3 * TPS, old.tobytes()) + rec.xbzrle_page("m0", 3 * TPS, encoding))
    dest = _Dest()
    events = dest.load(data)
    x = [e for e in events if isinstance(e, RamXbzrle)]
    assert len(x) == 1 and x[0].block == "m0" and x[0].offset == 3 * TPS
    assert bytes(x[0].data) == encoding
    assert np.array_equal(dest.pages[3], new)
    assert dest.loader.xbzrle_pages == 1


def test_xbzrle_record_naming_its_block():
    data = _stream(RamRecordEncoder().xbzrle_page("m0", 2 * TPS, bytes((0, 1, 9))))
    dest = _Dest()
    dest.load(data)
    assert dest.pages[2, 0] == 9 and not dest.pages[2, 1:].any()


@pytest.mark.parametrize("tail,needle", [
    (b"\x02" + (3).to_bytes(2, "big") + b"\x00\x01\x09", "wrong compression"),
    (b"\x01" + (TPS + 1).to_bytes(2, "big") + bytes(TPS + 1), "len overflow"),
])
def test_xbzrle_header_checks_are_qemus(tail, needle):
    head = _stream(b"")
    word = (TPS | 0x40).to_bytes(8, "big") + b"\x02m0"
    err = _fail(head + word + tail)
    assert "Failed to load XBZRLE page" in str(err) and needle in str(err)
    assert err.offset == len(head) + len(word) + (1 if needle == "len overflow" else 0)


def test_truncated_xbzrle_record_waits_for_more():
    full = _stream(RamRecordEncoder().xbzrle_page("m0", 0, bytes((0, 2, 5, 6))))
    assert not any(isinstance(e, RamXbzrle) for e in _events(full[:-1]))


def test_a_bad_encoding_is_a_protocol_error_naming_the_page():
    # A zero-length changed run: QEMU's decoder returns -1.
    data = _stream(RamRecordEncoder().xbzrle_page("m0", 5 * TPS, bytes((4, 0, 0))))
    dest = _Dest()
    with pytest.raises(RemoteProtocolError, match=r"Failed to load XBZRLE page of m0 at 0x5000"):
        dest.load(data)


def test_no_xbzrle_in_postcopy():
    dest = _Dest()
    dest.loader.place_through(object())
    with pytest.raises(RemoteProtocolError, match="in postcopy"):
        dest.loader.patch("m0", 0, b"\x00\x01\x01")


# -- the source's batch encoder ----------------------------------------------------

class _Source:
    """A block, its XBZRLE saver and the channel's record encoder."""

    def __init__(self, cache_size=NPAGES * TPS):
        rng = np.random.default_rng(5)
        self.pages = rng.integers(0, 256, (NPAGES, TPS), dtype=np.uint8)
        self.pages[40:48] = 0
        self.saver = XbzrleSaver([SimpleNamespace(idstr="m0", used_length=NPAGES * TPS)],
                                 cache_size, TPS)
        self.saver.started = True
        self.rec = RamRecordEncoder()
        self.generation = 1

    def send(self, idx) -> tuple[bytes, object, int, int]:
        buffers, normal, zero, wire, counts = self.saver.encode_batch(
            "m0", self.pages, np.asarray(idx), True, self.rec, self.generation)
        data = b"".join(bytes(b) for b in buffers)
        assert len(data) == wire
        return data, counts, normal, zero


def test_batches_decode_to_the_source_pages():
    src, dest = _Source(), _Dest()
    everything = np.arange(NPAGES)
    data, counts, normal, zero = src.send(everything)
    assert (counts.cache_miss, counts.pages, normal, zero) == (56, 0, 56, 8)
    dest.load(_stream(data))
    assert np.array_equal(dest.pages, src.pages)

    rng = np.random.default_rng(1)
    for generation in range(2, 6):
        src.generation = generation
        touched = rng.choice(NPAGES, 20, replace=False)
        for p in touched:                   # a few bytes here and there
            src.pages[p, rng.integers(0, TPS, 5)] += 1
        src.pages[touched[0]] = rng.integers(0, 256, TPS, dtype=np.uint8)  # overflows
        src.pages[touched[1]] = 0                                          # now zero
        data, counts, normal, zero = src.send(np.sort(touched))
        assert counts.sent > 0 and counts.overflow >= 1
        assert counts.bytes == counts.wire_bytes - 8 * counts.sent + counts.overflow * TPS
        dest.load(data)
        assert np.array_equal(dest.pages, src.pages), generation


def test_unchanged_pages_are_not_sent_and_misses_fill_the_cache():
    src = _Source()
    src.send(np.arange(8))
    src.generation = 2
    data, counts, normal, zero = src.send(np.arange(8))
    assert data == b"" and counts.pages == 8 and counts.cache_miss == 0
    assert (normal, zero, counts.sent) == (0, 0, 0)


def test_the_last_stage_leaves_the_cache_alone():
    src = _Source()
    src.send(np.arange(4))
    before = src.saver.cache.data.copy()
    src.saver.last_stage = True
    src.pages[0:6, 0] += 1
    _, counts, _, _ = src.send(np.arange(6))
    assert counts.sent == 4 and counts.cache_miss == 2
    assert np.array_equal(src.saver.cache.data, before)


def test_a_fresh_page_keeps_its_slot_and_the_other_goes_whole():
    src = _Source(cache_size=4 * TPS)          # pages 1 and 5 share a slot
    src.send([1])
    src.pages[1, 0] += 1
    src.pages[5, 0] += 1
    data, counts, normal, _ = src.send([1, 5])
    assert counts.pages == 1 and counts.cache_miss == 1 and counts.sent == 1 and normal == 1
    assert src.saver.cache.addr[1] == TPS


def test_resize_keeps_the_cached_copies():
    src = _Source()
    src.send(np.arange(NPAGES))
    assert src.saver.resize(16 * TPS) == 16 * TPS
    src.generation = 2
    src.pages[np.arange(16), 1] += 1
    _, counts, _, _ = src.send(np.arange(16))
    assert counts.pages == 16 and counts.sent == 16 and counts.cache_miss == 0


def test_encode_speed_on_a_realistic_batch(capsys):
    """2048 pages (a precopy batch), each re-dirtied in a few 8-byte words."""
    src = _Source(cache_size=4096 * TPS)
    rng = np.random.default_rng(3)
    src.pages = rng.integers(0, 256, (2048, TPS), dtype=np.uint8)
    src.saver = XbzrleSaver([SimpleNamespace(idstr="m0", used_length=2048 * TPS)],
                            4096 * TPS, TPS)
    src.saver.started = True
    src.send(np.arange(2048))
    rows = np.repeat(np.arange(2048), 8)
    cols = rng.integers(0, TPS // 8, rows.size) * 8
    best = None
    for generation in range(2, 5):
        src.generation = generation
        src.pages.view(np.uint64).reshape(2048, -1)[rows, cols // 8] += 1
        t = time.perf_counter()
        _, counts, _, _ = src.send(np.arange(2048))
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
        assert counts.sent == 2048
    with capsys.disabled():
        print(f"\nxbzrle: {2048 / best:,.0f} pages/s encoded (2048-page batch, 8 words changed "
              "per page, cache lookup and records included)")
    assert 2048 / best > 5000


# -- stats ------------------------------------------------------------------------

def test_xbzrle_cache_member_and_rates_follow_qemu():
    now = [0.0]
    acc = StatsAccumulator(NPAGES * TPS, TPS, clock=lambda: now[0], xbzrle_cache=1 << 20)
    acc.start()
    acc.dirty_sync(0, NPAGES)
    acc.add_normal(10, 10 * (8 + TPS))
    counts = SimpleNamespace(pages=6, bytes=300 + TPS, cache_miss=4, overflow=1, sent=5,
                             wire_bytes=340)
    assert acc.add_xbzrle(counts) == 340
    now[0] = 1.5
    acc.dirty_sync(3, 3)
    x = acc.snapshot("active").to_qmp()["xbzrle-cache"]
    assert list(x) == ["cache-size", "bytes", "pages", "cache-miss", "cache-miss-rate",
                       "encoding-rate", "overflow"]
    assert x["cache-size"] == 1 << 20 and x["pages"] == 6 and x["cache-miss"] == 4
    assert x["cache-miss-rate"] == pytest.approx(4 / 15)       # misses / target pages
    assert x["encoding-rate"] == pytest.approx(6 * TPS / (300 + TPS))
    assert acc.transferred == 10 * (8 + TPS) + 340
    text = format_info_migrate(acc.snapshot("active"))
    assert "xbzrle cache miss rate: 0.27\n" in text and "xbzrle overflow: 1\n" in text
