"""Multifd wire structures (engine.multifd.packet) against spec 3 and QEMU 7.2 bytes."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import LocalProtocolError, RemoteProtocolError
from engine.multifd.packet import (
    MULTIFD_FLAG_SYNC, MULTIFD_MAGIC, MULTIFD_VERSION, MultiFDInit,
    MultiFDPacketHeader, RamPacketBatch, multifd_packet_count, packet_size,
)
from tests.captures import CAPTURES


needs_captures = pytest.mark.skipif(
    not (CAPTURES / "ram-4MiB.img").is_file(), reason=f"no QEMU 7.2 captures in {CAPTURES}")


def test_sizes():
    assert (MULTIFD_MAGIC, MULTIFD_VERSION, MULTIFD_FLAG_SYNC) == (0x11223344, 1, 1)
    assert multifd_packet_count() == multifd_packet_count(4096) == 128
    assert multifd_packet_count(65536) == 8
    assert packet_size() == packet_size(128) == 1344
    assert packet_size(8) == 384
    with pytest.raises(ValueError):
        multifd_packet_count(3000)


# -- MultiFDInit ------------------------------------------------------------------

def test_init_layout():
    raw = MultiFDInit(bytes(range(16)), 3).pack()
    assert len(raw) == 64
    assert raw[:8] == bytes.fromhex("11223344 00000001")
    assert raw[8:24] == bytes(range(16))
    assert raw[24] == 3 and raw[25:] == bytes(39)


@given(uuid=st.binary(min_size=16, max_size=16), channel_id=st.integers(0, 255))
def test_init_round_trip(uuid, channel_id):
    init = MultiFDInit(uuid, channel_id)
    raw = bytearray(70)
    init.pack_into(raw, 6)
    assert bytes(raw[6:]) == init.pack()
    assert MultiFDInit.unpack(init.pack()) == init


def test_init_errors_name_channel_and_offset():
    raw = bytearray(MultiFDInit(bytes(16), 0).pack())
    raw[0] = 0x12
    with pytest.raises(RemoteProtocolError, match="magic") as exc:
        MultiFDInit.unpack(raw, channel=2, stream_offset=0)
    assert (exc.value.channel, exc.value.offset) == ("multifd 2", 0)
    assert "multifd 2" in str(exc.value)
    raw = bytearray(MultiFDInit(bytes(16), 0).pack())
    raw[7] = 2
    with pytest.raises(RemoteProtocolError, match="version") as exc:
        MultiFDInit.unpack(raw, channel="conn1")
    assert (exc.value.channel, exc.value.offset) == ("conn1", 4)
    with pytest.raises(RemoteProtocolError, match="truncated"):
        MultiFDInit.unpack(raw[:63])
    with pytest.raises(LocalProtocolError):
        MultiFDInit(bytes(15), 0)
    with pytest.raises(LocalProtocolError):
        MultiFDInit(bytes(16), 256)


# -- packet header ------------------------------------------------------------------

def test_header_layout():
    header = MultiFDPacketHeader.ram(
        flags=0x04, packet_num=0x0102030405060708, ramblock="pc.ram",
        normal=[0x1000, 0x3000], zero=[0x7000], next_packet_size=999)
    raw = header.pack()
    assert len(raw) == 1344
    assert struct.unpack_from(">IIIIIIQI", raw) == (
        0x11223344, 1, 0x04, 128, 2, 999, 0x0102030405060708, 1)
    assert raw[36:64] == bytes(28)
    assert raw[64:320] == b"pc.ram".ljust(256, b"\0")
    assert raw[320:344] == bytes.fromhex(
        "0000000000001000 0000000000003000 0000000000007000")
    assert raw[344:] == bytes(1000)
    assert header.normal_offsets.tolist() == [0x1000, 0x3000]
    assert header.zero_offsets.tolist() == [0x7000]
    assert header.payload_size == 999 and header.compression == 0x04
    assert not header.is_sync


@st.composite
def headers(draw):
    page_count = draw(st.sampled_from([128, 8, 1]))
    pages_alloc = draw(st.integers(0, page_count))
    normal = draw(st.integers(0, pages_alloc))
    zero = draw(st.integers(0, pages_alloc - normal))
    offsets = draw(st.lists(st.integers(0, 2**64 - 1), min_size=normal + zero,
                            max_size=normal + zero))
    return page_count, MultiFDPacketHeader(
        flags=draw(st.integers(0, 0x3F)),
        pages_alloc=pages_alloc, normal_pages=normal,
        next_packet_size=draw(st.integers(0, 2**32 - 1)),
        packet_num=draw(st.integers(0, 2**64 - 1)), zero_pages=zero,
        ramblock=draw(st.text(max_size=80).filter(
            lambda s: "\0" not in s and len(s.encode()) < 256)),
        offsets=offsets)


@settings(max_examples=200)
@given(case=headers())
def test_header_round_trip(case):
    page_count, header = case
    raw = header.pack(page_count)
    assert len(raw) == packet_size(page_count)
    back = MultiFDPacketHeader.unpack(raw, page_count)
    assert back == header and hash(back) == hash(header)
    assert back.pack(page_count) == raw


def test_header_value_semantics():
    a = MultiFDPacketHeader.ram(flags=2, packet_num=1, ramblock="m0",
                                normal=np.array([4096]), next_packet_size=9)
    b = MultiFDPacketHeader.ram(flags=2, packet_num=1, ramblock="m0",
                                normal=[4096], next_packet_size=9)
    c = MultiFDPacketHeader.ram(flags=2, packet_num=1, ramblock="m0",
                                normal=[8192], next_packet_size=9)
    assert a == b and a != c and len({a, b, c}) == 2
    with pytest.raises(ValueError):
        a.offsets[0] = 0  # read-only: the header is immutable
    with pytest.raises(LocalProtocolError):
        MultiFDPacketHeader(0, 128, 2, 0, 0, 0, "m0", [0])


def test_sync_packet():
    sync = MultiFDPacketHeader.sync(42)
    assert sync.is_sync and sync.payload_size == 0
    raw = sync.pack()
    assert struct.unpack_from(">IIIIIIQI", raw) == (0x11223344, 1, 1, 0, 0, 0, 42, 0)
    assert raw[36:] == bytes(1344 - 36)


def _raw(**overrides) -> bytearray:
    header = MultiFDPacketHeader.ram(flags=2, packet_num=5, ramblock="m0",
                                     normal=[0, 4096], zero=[8192], next_packet_size=10)
    raw = bytearray(header.pack())
    fields = {"magic": 0, "version": 4, "flags": 8, "pages_alloc": 12,
              "normal": 16, "zero": 32}
    for name, value in overrides.items():
        struct.pack_into(">I", raw, fields[name], value)
    return raw


@pytest.mark.parametrize("field,value,offset,message", [
    ("magic", 0x5145564D, 0, "magic"),
    ("version", 2, 4, "version"),
    ("pages_alloc", 129, 12, "129 pages"),
    ("normal", 129, 16, "129 normal pages"),
    ("zero", 127, 32, "127 zero pages"),        # 2 normal + 127 zero > 128
    ("flags", 0x40, 8, "device-state"),
])
def test_header_receiver_checks(field, value, offset, message):
    raw = _raw(**{field: value})
    with pytest.raises(RemoteProtocolError, match=message) as exc:
        MultiFDPacketHeader.unpack(raw, channel=1, stream_offset=10_000)
    assert exc.value.offset == 10_000 + offset
    assert exc.value.channel == "multifd 1"


def test_header_limits_follow_pages_alloc():
    # normal <= pages_alloc, zero <= pages_alloc - normal, with pages_alloc < 128.
    MultiFDPacketHeader.unpack(_raw(pages_alloc=3))
    with pytest.raises(RemoteProtocolError, match="zero pages"):
        MultiFDPacketHeader.unpack(_raw(pages_alloc=2))
    with pytest.raises(RemoteProtocolError, match="normal pages"):
        MultiFDPacketHeader.unpack(_raw(pages_alloc=1))
    with pytest.raises(RemoteProtocolError, match="truncated"):
        MultiFDPacketHeader.unpack(_raw()[:1343])
    # A smaller page_count (bigger target pages) reads a smaller header.
    small = MultiFDPacketHeader.ram(flags=0, packet_num=0, ramblock="m0",
                                    normal=[0], next_packet_size=65536, page_count=8)
    assert MultiFDPacketHeader.unpack(small.pack(8), 8) == small
    with pytest.raises(RemoteProtocolError, match="128 pages"):
        MultiFDPacketHeader.unpack(_raw(), 8)


def test_ramblock_name_is_forced_to_255_bytes():
    raw = _raw()
    raw[64:320] = b"x" * 256  # no terminator at all
    assert MultiFDPacketHeader.unpack(raw).ramblock == "x" * 255
    raw[64:320] = b"pc.ram\0garbage".ljust(256, b"\0")
    assert MultiFDPacketHeader.unpack(raw).ramblock == "pc.ram"


def test_offsets_validation():
    header = MultiFDPacketHeader.ram(flags=0, packet_num=0, ramblock="m0",
                                     normal=[0, 0x3000], zero=[0x1000],
                                     next_packet_size=8192)
    header.validate(0x4000)  # last page of a 16 KiB block is fine
    with pytest.raises(RemoteProtocolError, match=r"normal page offset 0x3000 \(entry 1\)") as exc:
        header.validate(0x3FFF, channel=0, stream_offset=64)
    assert exc.value.offset == 64 + 320 + 8 and exc.value.channel == "multifd 0"
    with pytest.raises(RemoteProtocolError, match="zero page offset 0x1000"):
        MultiFDPacketHeader.unpack(
            MultiFDPacketHeader.ram(flags=0, packet_num=0, ramblock="m0", normal=[0],
                                    zero=[0x1000], next_packet_size=4096).pack(),
            used_length=0x1000)
    with pytest.raises(RemoteProtocolError, match="aligned"):
        MultiFDPacketHeader.ram(flags=0, packet_num=0, ramblock="m0", normal=[0x800],
                                next_packet_size=4096).validate(0x10000)
    with pytest.raises(RemoteProtocolError):
        header.validate(0)  # a block smaller than a page holds no page
    MultiFDPacketHeader.sync(1).validate(0)  # nothing to check


def test_compression_check_skips_empty_packets():
    empty = MultiFDPacketHeader(0, 128, 0, 4242, 7, 0, "m0")
    empty.check_compression(0x04)  # 7.2 sends these without the codec bit
    assert empty.payload_size == 0  # ... and with a stale next_packet_size
    full = MultiFDPacketHeader.ram(flags=0x05, packet_num=1, ramblock="m0",
                                   normal=[0], next_packet_size=10)
    full.check_compression(0x04)  # SYNC bit is not a codec bit
    with pytest.raises(RemoteProtocolError, match="compression") as exc:
        full.check_compression(0x02, channel=3, stream_offset=100)
    assert exc.value.offset == 108


@pytest.mark.parametrize("kwargs,message", [
    (dict(ramblock="r" * 256), "too long"),
    (dict(next_packet_size=2**32), "be32"),
    (dict(packet_num=-1), "be64"),
])
def test_pack_refuses_what_the_format_cannot_carry(kwargs, message):
    args = dict(flags=0, packet_num=0, ramblock="m0", normal=[0], next_packet_size=1)
    args.update(kwargs)
    with pytest.raises(LocalProtocolError, match=message):
        MultiFDPacketHeader.ram(**args).pack()


def test_pack_refuses_more_offsets_than_page_count():
    header = MultiFDPacketHeader.ram(flags=0, packet_num=0, ramblock="m0",
                                     normal=np.arange(9) * 4096, next_packet_size=1)
    with pytest.raises(LocalProtocolError, match="9 offsets"):
        header.pack(8)


# -- a batch's headers packed at once ----------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.data())
def test_batch_headers_are_the_per_packet_headers(data):
    """Every header a RamPacketBatch packs is byte for byte the one
    MultiFDPacketHeader.ram makes of that packet: normal pages first, then
    zero pages, the last packet partial, packets without normal pages too."""
    page_count = data.draw(st.sampled_from([1, 4, 8, 128]))
    n = data.draw(st.integers(0, 3 * page_count + 3))
    pages = np.array(sorted(data.draw(st.sets(st.integers(0, 10_000), min_size=n,
                                              max_size=n))), dtype=np.int64)
    zero = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    first = data.draw(st.integers(0, 2**40))
    batch = RamPacketBatch(flags=0x02, first_packet_num=first, ramblock="pc.ram",
                           pages=pages, zero=zero, page_size=4096, page_count=page_count)
    assert len(batch) == -(-n // page_count)
    for k in range(len(batch)):
        sl = slice(k * page_count, (k + 1) * page_count)
        p, z = pages[sl], zero[sl]
        expected = MultiFDPacketHeader.ram(
            flags=0x02, packet_num=first + k, ramblock="pc.ram",
            normal=p[~z] * 4096, zero=p[z] * 4096,
            next_packet_size=int((~z).sum()) * 4096, page_count=page_count)
        assert bytes(batch.header(k)) == expected.pack(page_count)
        assert (batch.normal[k], batch.zero[k]) == (int((~z).sum()), int(z.sum()))
        assert pages[batch.normal_positions(k)].tolist() == p[~z].tolist()


def test_batch_payload_size_is_set_per_packet():
    pages = np.arange(10, dtype=np.int64)
    batch = RamPacketBatch(flags=0x04, first_packet_num=7, ramblock="m0", pages=pages,
                           zero=np.zeros(10, bool), page_size=4096, page_count=4)
    batch.set_payload_size(1, 1234)
    parsed = [MultiFDPacketHeader.unpack(batch.header(k), 4) for k in range(3)]
    assert [h.next_packet_size for h in parsed] == [4 * 4096, 1234, 2 * 4096]
    assert [h.packet_num for h in parsed] == [7, 8, 9]
    with pytest.raises(LocalProtocolError, match="be32"):
        batch.set_payload_size(0, 2**32)


@pytest.mark.parametrize("kwargs,message", [
    (dict(ramblock="r" * 256), "too long"),
    (dict(first_packet_num=-1), "be64"),
    (dict(first_packet_num=2**64 - 1), "be64"),   # the second packet would overflow
    (dict(zero=np.zeros(3, bool)), "3 zero flags for 5 pages"),
])
def test_batch_refuses_what_the_format_cannot_carry(kwargs, message):
    args = dict(flags=0, first_packet_num=0, ramblock="m0", pages=np.arange(5),
                zero=np.zeros(5, bool), page_size=4096, page_count=4)
    args.update(kwargs)
    with pytest.raises(LocalProtocolError, match=message):
        RamPacketBatch(**args)


# -- QEMU 7.2 captures ------------------------------------------------------------

@needs_captures
@pytest.mark.parametrize("codec,flag", [("none", 0), ("zlib", 2), ("zstd", 4)])
def test_parse_qemu_7_2_channels(codec, flag):
    carrying, channel_ids, saw_stale_size = [], set(), False
    for conn in (1, 2):
        data = (CAPTURES / f"multifd2-{codec}.conn{conn}").read_bytes()
        init = MultiFDInit.unpack(data, channel=conn)
        assert init.pack() == data[:64] and init.uuid == bytes(16)
        channel_ids.add(init.channel_id)
        pos, count = 64, 0
        while pos < len(data):
            raw = data[pos:pos + 1344]
            header = MultiFDPacketHeader.unpack(raw, channel=conn, stream_offset=pos,
                                                used_length=4 << 20)
            header.check_compression(flag)
            assert header.zero_pages == 0  # reserved in 7.2
            assert header.pages_alloc == 128
            used = 320 + 8 * header.normal_pages
            if header.normal_pages:
                assert header.ramblock == "m0"
                assert header.pack()[:used] == raw[:used]
            if header.normal_pages == 128:
                assert header.pack() == raw
            if header.normal_pages == 0 and header.next_packet_size:
                saw_stale_size = True
            if codec == "none" and header.normal_pages:
                assert header.payload_size == header.normal_pages * 4096
            if header.normal_pages or header.is_sync:
                carrying.append(header.packet_num)
            pos += 1344 + header.payload_size
            count += 1
        assert pos == len(data)  # payload sizes account for every byte
        assert count == 5
    assert channel_ids == {0, 1}
    # packet_num is one counter over all channels; 7.2 re-sends a stale one
    # in an empty non-SYNC packet, so only count packets that mean something.
    assert len(set(carrying)) == len(carrying)
    assert saw_stale_size
