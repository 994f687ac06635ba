"""The receive side landing pages in a real RAM block: through its file descriptor,
or (a destination made with prealloc) straight into its populated mapping."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from engine.compress import get_codec, payload_nbytes
from engine.errors import ChannelClosedError, CodecError, RemoteProtocolError
from engine.multifd import receiver
from engine.multifd.packet import MultiFDPacketHeader
from engine.multifd.receiver import PacketReader
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog

PS = 4096
NPAGES = 16


_made: list[DirtyLog] = []


@pytest.fixture(autouse=True)
def _release_logs():
    """Every received log a test made (real shared memory) is gone after it."""
    yield
    while _made:
        with _made.pop():
            pass


def Log() -> DirtyLog:
    log = DirtyLog.create(NPAGES)
    _made.append(log)
    return log


def _block(populated: bool):
    block = RamBlock.create("m0", NPAGES * PS)
    block.array[:] = 0xFF           # so that any write shows
    if populated:
        block.populate()
    return block


@pytest.fixture(params=["file", "mapping"])
def dst(request, monkeypatch):
    """A block filled with 0xFF, landed in through its file or its mapping."""
    with _block(request.param == "mapping") as block:
        if block.populated:
            # The mapping path never writes through the file.
            monkeypatch.setattr(receiver.os, "pwrite", None)
        yield block


@pytest.fixture
def file_dst():
    with _block(False) as block:
        yield block


def page(i: int) -> bytes:
    return bytes([i + 1]) * PS


def send(sock, normal, zero=(), payload=None, flags=0, size=None):
    payload = b"".join(page(p) for p in normal) if payload is None else payload
    h = MultiFDPacketHeader.ram(flags=flags, packet_num=1, ramblock="m0",
                                normal=np.array(normal, np.uint64) * PS,
                                zero=np.array(zero, np.uint64) * PS,
                                next_packet_size=payload_nbytes([payload]) if size is None
                                else size)
    sock.sendall(h.pack() + payload)


def reader(block, log, fresh=True, codec="none"):
    a, b = socket.socketpair()
    return a, PacketReader(b, 0, [block], [log], [fresh], codec)


def test_pages_in_any_order_land_in_place(dst):
    log = Log()
    src, r = reader(dst, log)
    order = [5, 3, 4, 9, 15, 0]                      # runs 3-5 out of order, singles
    send(src, order)
    r.read_packet()
    for p in range(NPAGES):
        expect = page(p) if p in order else b"\xff" * PS
        assert dst.pages[p].tobytes() == expect, p
    assert np.flatnonzero(log.log).tolist() == sorted(order)


def test_a_page_listed_twice_keeps_its_last_copy(dst):
    src, r = reader(dst, Log())
    send(src, [2, 2], payload=bytes([7]) * PS + bytes([8]) * PS)
    r.read_packet()
    assert (dst.pages[2] == 8).all() and (dst.pages[[1, 3]] == 0xFF).all()


@pytest.mark.parametrize("fresh, received_before, written", [
    (True, False, False),
    (True, True, True),
    (False, False, True),
])
def test_zero_pages_through_the_file(dst, fresh, received_before, written):
    log = Log()
    if received_before:
        log.log[[4, 5, 6, 10]] = 1
    src, r = reader(dst, log, fresh)
    send(src, [], [4, 5, 6, 10])
    r.read_packet()
    zeroed = (dst.pages[[4, 5, 6, 10]] == 0).all()
    assert zeroed == written
    assert (dst.pages[[4, 5, 6, 10]] == 0xFF).all() == (not written)
    assert (dst.pages[[0, 1, 2, 3, 7, 8, 9, 11]] == 0xFF).all()


def test_compressed_pages_land_through_the_file(dst):
    codec = get_codec("zstd")
    normal = [1, 2, 3, 8, 12]
    pages = np.stack([np.frombuffer(page(p), np.uint8) for p in normal])
    payload = b"".join(bytes(b) for b in codec.new_encoder(1).encode(pages))
    src, r = reader(dst, Log(), codec="zstd")
    send(src, normal, [0], payload, flags=codec.flag)
    r.read_packet()
    for p in range(NPAGES):
        assert dst.pages[p].tobytes() == (page(p) if p in normal else b"\xff" * PS), p


def test_short_writes_are_resumed(file_dst, monkeypatch):
    dst = file_dst
    real = receiver.os.pwrite
    calls = []

    def pwrite_in_bits(fd, data, offset):
        calls.append(offset)
        return real(fd, data[:5000], offset)         # never more than 5000 bytes at once

    monkeypatch.setattr(receiver.os, "pwrite", pwrite_in_bits)
    src, r = reader(dst, Log())
    send(src, [6, 7, 8])
    r.read_packet()
    assert (dst.pages[6:9].reshape(-1) == np.frombuffer(
        page(6) + page(7) + page(8), np.uint8)).all()
    assert len(calls) > 1 and (dst.pages[[5, 9]] == 0xFF).all()


def test_truncated_payload_is_an_error(dst):
    src, r = reader(dst, Log())
    send(src, [1, 2], payload=page(1) + page(2)[:100], size=2 * PS)
    src.close()
    with pytest.raises(ChannelClosedError, match="truncated"):
        r.read_packet()


@pytest.mark.parametrize("codec", ["zstd", "zlib"])
def test_a_corrupt_compressed_payload_names_channel_packet_and_offset(dst, codec):
    """The codec's complaint arrives as the peer's protocol error, located: the
    channel, the packet number and where the payload starts in the channel."""
    c = get_codec(codec)
    good = np.stack([np.frombuffer(page(p), np.uint8) for p in (1, 2)])
    payload = b"".join(bytes(b) for b in c.new_encoder(1).encode(good))
    src, r = reader(dst, Log(), codec=codec)
    send(src, [1, 2], payload=payload, flags=c.flag)              # packet at 64
    r.read_packet()
    garbage = bytes(range(256)) * 4
    send(src, [3], payload=garbage, flags=c.flag)                 # packet 1 again
    payload_at = 64 + 2 * 1344 + len(payload)
    with pytest.raises(RemoteProtocolError) as info:
        r.read_packet()
    err = info.value
    assert (err.channel, err.offset) == ("multifd 0", payload_at)
    assert "multifd packet 1:" in str(err) and codec in str(err)
    assert isinstance(err.__cause__, CodecError)


def test_a_payload_that_inflates_short_is_a_remote_error(dst):
    c = get_codec("zstd")
    pages = np.stack([np.frombuffer(page(1), np.uint8)])
    payload = b"".join(bytes(b) for b in c.new_encoder(1).encode(pages))
    src, r = reader(dst, Log(), codec="zstd")
    send(src, [1, 2], payload=payload, flags=c.flag)    # one page's worth for two
    with pytest.raises(RemoteProtocolError, match="expected 8192") as info:
        r.read_packet()
    assert info.value.offset == 64 + 1344
