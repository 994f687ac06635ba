"""Encoder -> decoder round trips of every element of the main stream."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.devices import (GLOBALSTATE_VMSD, TIMER_VMSD, globalstate_values,
                            lookup_qemu_vmsd, timer_values)
from engine.errors import LocalProtocolError
from engine.stream import encoder as enc
from engine.stream import (NEED_DATA, Configuration, DeviceState, EnableColo, Eof,
                           FileHeader, OpenReturnPath, Packaged, Ping, PostcopyAdvise,
                           PostcopyListen, PostcopyRamDiscard, PostcopyResume, PostcopyRun,
                           RamBlockInfo, RamBlockList, RamEOS, RamFlush, RamPage, RamPages,
                           RamRecordEncoder, RamZero, RamZeros, RecvBitmap, SectionEnd, SectionFooter,
                           SectionPart, SectionStart, StreamDecoder,
                           SwitchoverStart, VMDescription, build_vmdesc,
                           parse_config_capabilities)

TPS = 4096


def events_of(data: bytes, chunk: int | None = None, **kw) -> list:
    """All events of ``data``; pages as ``("page", block, offset, bytes)``."""
    dec = StreamDecoder(lookup_qemu_vmsd, **kw)
    pieces = iter([data] if chunk is None else
                  [data[i:i + chunk] for i in range(0, len(data), chunk)])
    out = []
    while True:
        ev = dec.next_event()
        if ev is NEED_DATA:
            if dec.finished:
                return out
            piece = next(pieces, None)
            dec.feed_eof() if piece is None else dec.feed(piece)
            continue
        if isinstance(ev, RamPage):
            ev = ("page", ev.block, ev.offset, bytes(ev.data))
        elif isinstance(ev, RamPages):      # page_runs: one event per run of records
            assert ev.data.shape == (len(ev), TPS) and not ev.data.flags.writeable
            out += [("page", ev.block, int(o), bytes(d)) for o, d in zip(ev.offsets, ev.data)]
            continue
        elif isinstance(ev, RamZeros):
            out += [RamZero(ev.block, int(o)) for o in ev.offsets]
            continue
        out.append(ev)


def page(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, TPS, dtype=np.uint8).tobytes()


def test_whole_stream_round_trip():
    rec = RamRecordEncoder()
    blocks = [("pc.ram", 64 * TPS), ("vga.vram", 4 * TPS)]
    timer, gs = timer_values(123, -456), globalstate_values("running")
    caps = enc.config_capabilities(["x-ignore-shared"])
    parts = [
        enc.file_header(),
        enc.configuration("pc-q35-7.2", {"configuration/capabilities": caps,
                                         "configuration/uuid": bytes(range(16))}),
        enc.open_return_path(), enc.ping(1), enc.postcopy_advise(),
        enc.section_start(2, "ram", 0, 4), enc.ram_block_list(blocks), enc.ram_flush(),
        enc.ram_eos(), enc.section_footer(2),
        enc.section_part(2),
        rec.page("pc.ram", 0, page(0)), rec.page("pc.ram", TPS, page(1)),
        rec.zero_page("pc.ram", 2 * TPS), rec.page("vga.vram", 3 * TPS, page(2)),
        rec.zero_page("pc.ram", 63 * TPS), enc.ram_flush(), enc.ram_eos(),
        enc.section_footer(2),
        enc.switchover_start(),
        enc.section_end(2), rec.page("pc.ram", 5 * TPS, page(3)), enc.ram_eos(),
        enc.section_footer(2),
        enc.section_full(0, "timer", 0, 2, TIMER_VMSD.encode(timer)),
        enc.section_full(4, "globalstate", 0, 1, GLOBALSTATE_VMSD.encode(gs)),
        enc.enable_colo(), enc.postcopy_listen(), enc.postcopy_run(), enc.postcopy_resume(),
        enc.recv_bitmap("pc.ram"), enc.postcopy_ram_discard("pc.ram", [(0, TPS)]),
        enc.eof(),
        enc.vmdescription(build_vmdesc(TPS, [("timer", 0, TIMER_VMSD, timer),
                                             ("globalstate", 0, GLOBALSTATE_VMSD, gs)])),
    ]
    data = b"".join(parts)
    expected = [
        FileHeader(3),
        Configuration("pc-q35-7.2", {"configuration/capabilities": caps,
                                     "configuration/uuid": bytes(range(16))}),
        OpenReturnPath(), Ping(1), PostcopyAdvise(None, None),
        SectionStart(2, "ram", 0, 4),
        RamBlockList(68 * TPS, (RamBlockInfo("pc.ram", 64 * TPS),
                                RamBlockInfo("vga.vram", 4 * TPS))),
        RamFlush(), RamEOS(), SectionFooter(2),
        SectionPart(2),
        ("page", "pc.ram", 0, page(0)), ("page", "pc.ram", TPS, page(1)),
        RamZero("pc.ram", 2 * TPS), ("page", "vga.vram", 3 * TPS, page(2)),
        RamZero("pc.ram", 63 * TPS), RamFlush(), RamEOS(), SectionFooter(2),
        SwitchoverStart(),
        SectionEnd(2), ("page", "pc.ram", 5 * TPS, page(3)), RamEOS(), SectionFooter(2),
        DeviceState(0, "timer", 0, 2, timer), SectionFooter(0),
        DeviceState(4, "globalstate", 0, 1, gs), SectionFooter(4),
        EnableColo(), PostcopyListen(), PostcopyRun(), PostcopyResume(),
        RecvBitmap("pc.ram"), PostcopyRamDiscard("pc.ram", ((0, TPS),)),
        Eof(),
    ]
    for chunk in (None, 1, 5, 4099):
        got = events_of(data, chunk)
        assert got[:-1] == expected
        assert isinstance(got[-1], VMDescription)
        assert got[-1].data["devices"][0]["name"] == "timer"
    assert parse_config_capabilities(caps) == ("x-ignore-shared",)


def test_continue_is_kept_across_sections():
    rec = RamRecordEncoder()
    first = rec.page("m0", 0, page(0))
    second = rec.zero_page("m0", TPS)
    assert len(first) == 8 + 3 + TPS and len(second) == 9        # second: CONTINUE
    data = (enc.section_start(1, "ram", 0, 4) + enc.ram_block_list([("m0", 2 * TPS)])
            + first + enc.ram_eos() + enc.section_footer(1)
            + enc.section_part(1) + second + enc.ram_eos() + enc.section_footer(1))
    got = events_of(data, expect_header=False)
    assert RamZero("m0", TPS) in got


def test_packaged_blob_is_a_nested_stream():
    inner = (enc.postcopy_listen()
             + enc.section_full(0, "timer", 0, 2, TIMER_VMSD.encode(timer_values(1, 2)))
             + enc.ping(3) + enc.ping(0x42) + enc.postcopy_run())
    outer = (enc.file_header() + enc.configuration("none") + enc.open_return_path()
             + enc.postcopy_advise(TPS, TPS) + enc.packaged(inner) + enc.ping(4) + enc.eof())
    got = events_of(outer, chunk=3)
    assert got[3] == PostcopyAdvise(TPS, TPS)
    assert got[4] == Packaged(inner) and got[5] == Ping(4)
    nested = events_of(got[4].data, expect_header=False)
    assert nested == [PostcopyListen(), DeviceState(0, "timer", 0, 2, timer_values(1, 2)),
                      SectionFooter(0), Ping(3), Ping(0x42), PostcopyRun()]


def test_postcopy_block_list_with_page_sizes():
    """After a POSTCOPY_ADVISE, huge-page blocks carry their page size."""
    huge = 2 << 20
    data = (enc.file_header() + enc.configuration("none") + enc.postcopy_advise(huge | TPS, TPS)
            + enc.section_start(2, "ram", 0, 4)
            + enc.ram_block_list([("pc.ram", 4 * huge), ("rom", TPS)], page_sizes={"pc.ram": huge})
            + enc.ram_eos() + enc.section_footer(2) + enc.eof())
    sizes = {"pc.ram": huge, "rom": TPS}
    got = events_of(data, block_page_size=sizes.__getitem__)
    assert got[4] == RamBlockList(4 * huge + TPS, (RamBlockInfo("pc.ram", 4 * huge, huge),
                                                   RamBlockInfo("rom", TPS)))


def test_ignore_shared_block_list_carries_addresses():
    data = (enc.section_start(2, "ram", 0, 4)
            + enc.ram_block_list([("a", TPS), ("b", TPS)], gpas={"a": 0, "b": 1 << 32})
            + enc.ram_eos() + enc.section_footer(2))
    got = events_of(data, expect_header=False, ignore_shared=True)
    assert got[1].blocks == (RamBlockInfo("a", TPS, None, 0), RamBlockInfo("b", TPS, None, 1 << 32))


def test_discard_ranges_split_by_twelve():
    ranges = [(i * TPS, TPS) for i in range(30)]
    data = enc.postcopy_ram_discard("pc.ram", ranges)
    got = events_of(data, expect_header=False)
    assert [len(e.ranges) for e in got] == [12, 12, 6]
    assert [r for e in got for r in e.ranges] == ranges
    assert enc.postcopy_ram_discard("pc.ram", []) == b""


def test_vectorised_records_match_scalar_ones():
    offsets = np.array([0, 7, 8, 100], dtype=np.uint64) * TPS
    data = np.random.default_rng(5).integers(0, 256, (4, TPS), dtype=np.uint8)
    scalar, vector = RamRecordEncoder(), RamRecordEncoder()
    for start in ("other", None):
        scalar.last_block = vector.last_block = start
        want = b"".join(scalar.page("m0", int(o), d.tobytes()) for o, d in zip(offsets, data))
        assert bytes(vector.pages("m0", offsets, data)) == want
        scalar.last_block = vector.last_block = start
        heads = vector.page_headers("m0", offsets)
        assert b"".join(h + d.tobytes() for h, d in zip(heads, data)) == want
        scalar.last_block = vector.last_block = start
        want = b"".join(scalar.zero_page("m0", int(o)) for o in offsets)
        assert vector.zero_pages("m0", offsets) == want
    assert vector.last_block == "m0"
    vector.reset()
    assert vector.page_header("m0", 0)[8:] == b"\x02m0"
    assert bytes(vector.pages("m0", np.array([], np.uint64), np.zeros((0, TPS), np.uint8))) == b""
    with pytest.raises(LocalProtocolError):
        vector.page_header("m0", 100)
    with pytest.raises(LocalProtocolError):
        vector.pages("m0", np.array([1], np.uint64), data[:1])


_names = st.sampled_from(["pc.ram", "m0", "vga.vram"])
_records = st.lists(st.tuples(st.sampled_from(["page", "zero", "flush"]), _names,
                              st.integers(0, 15), st.integers(0, 2**31)),
                    max_size=40)


@settings(max_examples=80, deadline=None)
@given(_records, st.integers(1, 9000), st.booleans(), st.booleans())
def test_ram_records_round_trip(records, chunk, vectorised, runs):
    blocks = [("pc.ram", 16 * TPS), ("m0", 16 * TPS), ("vga.vram", 16 * TPS)]
    rec = RamRecordEncoder()
    body, expected = [], []
    for kind, block, index, seed in records:
        offset = index * TPS
        if kind == "page":
            data = np.random.default_rng(seed).integers(0, 256, TPS, dtype=np.uint8)
            body.append(bytes(rec.pages(block, [offset], data[None])) if vectorised
                        else rec.page(block, offset, data.tobytes()))
            expected.append(("page", block, offset, data.tobytes()))
        elif kind == "zero":
            body.append(rec.zero_pages(block, [offset]) if vectorised
                        else rec.zero_page(block, offset))
            expected.append(RamZero(block, offset))
        else:
            body.append(enc.ram_flush())
            expected.append(RamFlush())
    data = (enc.section_start(7, "ram", 0, 4) + enc.ram_block_list(blocks) + enc.ram_eos()
            + enc.section_footer(7) + enc.section_part(7) + b"".join(body) + enc.ram_eos()
            + enc.section_footer(7))
    got = events_of(data, chunk=chunk, expect_header=False, page_runs=runs)
    assert got[5:-2] == expected
    assert got[-2:] == [RamEOS(), SectionFooter(7)]


def test_page_views_stay_valid_while_feeding():
    """Holding RamPage views across feed() makes the decoder copy, never corrupt."""
    rec = RamRecordEncoder()
    data = (enc.section_start(1, "ram", 0, 4) + enc.ram_block_list([("m0", 8 * TPS)])
            + enc.ram_eos() + enc.section_footer(1) + enc.section_part(1)
            + b"".join(rec.page("m0", i * TPS, page(i)) for i in range(8)))
    dec = StreamDecoder(lookup_qemu_vmsd, expect_header=False)
    views = []
    for i in range(0, len(data), 1000):
        dec.feed(data[i:i + 1000])
        while (ev := dec.next_event()) is not NEED_DATA:
            if isinstance(ev, RamPage):
                views.append(ev)
    assert [bytes(v.data) for v in views] == [page(i) for i in range(8)]
    with pytest.raises(TypeError):
        views[0].data[0] = 1                                   # read-only


def test_records_only_channel():
    """The postcopy preempt channel: bare RAM records against the main channel's blocks."""
    rec = RamRecordEncoder()
    data = rec.page("m0", TPS, page(1)) + rec.zero_page("m0", 0)
    kw = dict(ram_records_only=True, ram_blocks=[RamBlockInfo("m0", 2 * TPS)])
    assert events_of(data, chunk=100, **kw) == [("page", "m0", TPS, page(1)), RamZero("m0", 0)]
    assert events_of(data + enc.ram_eos(), **kw)[-1] == RamEOS()


def _run_stream(body: bytes, blocks=(("m0", 64 * TPS),)) -> bytes:
    return (enc.section_start(1, "ram", 0, 4) + enc.ram_block_list(list(blocks))
            + enc.ram_eos() + enc.section_footer(1) + enc.section_part(1) + body)


def _all_events(dec: StreamDecoder, data: bytes) -> list:
    dec.feed(data)
    out = []
    while (ev := dec.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def test_page_runs_come_as_one_event_per_run():
    """A batch as the source sends it (pages, then its zero pages) arrives as
    one RamPages and one RamZeros, whatever the order of the offsets."""
    rec = RamRecordEncoder()
    idx = np.array([9, 3, 4, 5, 40, 41, 63, 0], np.uint64)
    pages = np.stack([np.frombuffer(page(int(i)), np.uint8) for i in idx])
    zeros = np.array([1, 2, 7], np.uint64) * np.uint64(TPS)
    body = bytes(rec.pages("m0", idx * np.uint64(TPS), pages)) + rec.zero_pages("m0", zeros)
    dec = StreamDecoder(lookup_qemu_vmsd, expect_header=False, page_runs=True)
    got = [e for e in _all_events(dec, _run_stream(body)) if isinstance(e, (RamPages, RamZeros))]
    # The first record names its block: a run of one; the rest continue it.
    assert [type(e).__name__ for e in got] == ["RamPages", "RamPages", "RamZeros"]
    assert [len(e) for e in got] == [1, 7, 3]
    assert np.concatenate([got[0].offsets, got[1].offsets]).tolist() == (idx * TPS).tolist()
    assert np.array_equal(np.concatenate([got[0].data, got[1].data]), pages)
    assert got[2].offsets.tolist() == zeros.tolist()


@pytest.mark.parametrize("bad,message,at", [
    (lambda r: r.page_header("m0", 64 * TPS), "outside block 'm0'", 0),
    (lambda r: r.zero_page("m0", 5 * TPS)[:-1] + b"\x01", "fill byte 0x01", 8),
    (lambda r: (5 * TPS | 0x800 | 0x20).to_bytes(8, "big"), "Unknown combination", 0),
    (lambda r: (5 * TPS | 0x40 | 0x20).to_bytes(8, "big"), "XBZRLE page - wrong compression", 8),
])
def test_a_bad_record_ends_a_run_and_is_refused_at_its_offset(bad, message, at):
    """The records before it are delivered; the bad one raises with its own offset."""
    rec = RamRecordEncoder()
    good = b"".join(rec.page("m0", i * TPS, page(i)) for i in range(5))
    head = _run_stream(good)
    data = head + bad(rec) + bytes(TPS)
    dec = StreamDecoder(lookup_qemu_vmsd, expect_header=False, page_runs=True)
    got = []
    with pytest.raises(Exception) as info:
        dec.feed(data)
        while (ev := dec.next_event()) is not NEED_DATA:
            got.append(ev)
    assert message in str(info.value)
    assert f"offset {len(head) + at}" in str(info.value)
    assert sum(len(e) for e in got if isinstance(e, RamPages)) == 5


@pytest.mark.parametrize("runs", [False, True])
def test_receiving_into_the_decoder_gives_the_same_events(runs):
    """get_buffer / buffer_updated (a transport's recv_into) and feed() are two
    ways of giving the decoder bytes; mixed, in odd sizes, the events are the
    same, and views held across store changes keep their bytes."""
    rec = RamRecordEncoder()
    data = _run_stream(b"".join(rec.page("m0", i * TPS, page(i)) + rec.zero_page("m0", 40 * TPS)
                                for i in range(30))) + enc.ram_eos() + enc.section_footer(1)
    expected = events_of(data, expect_header=False, page_runs=runs)
    dec = StreamDecoder(lookup_qemu_vmsd, expect_header=False, page_runs=runs)
    got, held, i, turn = [], [], 0, 0
    while i < len(data):
        size = (997, 5000, 70000)[turn % 3]
        piece = data[i:i + size]
        if turn % 2:
            dec.feed(piece)
        else:
            buf = dec.get_buffer(size)
            buf[:len(piece)] = piece
            dec.buffer_updated(len(piece))
        i, turn = i + len(piece), turn + 1
        while (e := dec.next_event()) is not NEED_DATA:
            held.append(e)
    for e in held:          # expanded only now, after every store change
        if isinstance(e, RamPages):
            got += [("page", e.block, int(o), bytes(d)) for o, d in zip(e.offsets, e.data)]
        elif isinstance(e, RamZeros):
            got += [RamZero(e.block, int(o)) for o in e.offsets]
        elif isinstance(e, RamPage):
            got.append(("page", e.block, e.offset, bytes(e.data)))
        else:
            got.append(e)
    assert got == expected
    with pytest.raises(LocalProtocolError):
        dec.buffer_updated(1 << 30)
