"""The receive side of a multifd channel, fed by hand over a socketpair."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from engine.errors import RemoteProtocolError
from engine.multifd.packet import MultiFDPacketHeader
from engine.multifd.receiver import PacketReader
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog

PS = 4096


@pytest.fixture
def block():
    """A real block whose memory starts as 0xFF so any write shows."""
    with RamBlock.create("m0", 8 * PS) as b:
        b.array[:] = 0xFF
        yield b


@pytest.fixture
def received():
    with DirtyLog.create(8) as log:
        yield log


@pytest.fixture
def reader_for():
    """(source end, reader) over a real socketpair; both closed at the end."""
    socks = []

    def make(block, received, fresh):
        a, b = socket.socketpair()
        socks.extend((a, b))
        return a, PacketReader(b, 0, [block], [received], [fresh], "none")

    yield make
    for s in socks:
        s.close()


def send_packet(sock, normal, zero, payload=b""):
    h = MultiFDPacketHeader.ram(flags=0, packet_num=1, ramblock="m0",
                                normal=np.array(normal, np.uint64) * PS,
                                zero=np.array(zero, np.uint64) * PS,
                                next_packet_size=len(payload))
    sock.sendall(h.pack() + payload)


@pytest.mark.parametrize("fresh, received_before, written", [
    (True, False, False),    # never received, memory known zero: do not touch it
    (True, True, True),      # received before: must be zeroed now
    (False, False, True),    # memory not known to be zero: must be zeroed
])
def test_zero_page_written_only_when_needed(block, received, reader_for,
                                            fresh, received_before, written):
    if received_before:
        received.log[3] = 1
    src, reader = reader_for(block, received, fresh)
    send_packet(src, [], [3])
    reader.read_packet()
    assert (block.pages[3] == 0).all() == written
    assert (block.pages[3] == 0xFF).all() == (not written)
    assert received.log[3] == 1
    assert (block.pages[[0, 1, 2, 4, 5, 6, 7]] == 0xFF).all()


def test_normal_pages_land_in_place_and_are_marked(block, received, reader_for):
    src, reader = reader_for(block, received, True)
    data = bytes([1]) * PS + bytes([2]) * PS + bytes([5]) * PS
    send_packet(src, [1, 2, 5], [], data)
    reader.read_packet()
    assert (block.pages[1] == 1).all() and (block.pages[2] == 2).all()
    assert (block.pages[5] == 5).all() and (block.pages[0] == 0xFF).all()
    assert received.log.tolist() == [0, 1, 1, 0, 0, 1, 0, 0]


def test_unknown_block_and_bad_offset_are_refused(block, received, reader_for):
    src, reader = reader_for(block, received, True)
    h = MultiFDPacketHeader.ram(flags=0, packet_num=1, ramblock="pc.ram",
                                normal=[0], next_packet_size=PS)
    src.sendall(h.pack() + bytes(PS))
    with pytest.raises(RemoteProtocolError, match="unknown RAM block 'pc.ram'"):
        reader.read_packet()
    src, reader = reader_for(block, received, True)
    send_packet(src, [8], [], bytes(PS))
    with pytest.raises(RemoteProtocolError, match="invalid for block 'm0'"):
        reader.read_packet()


def test_clean_end_of_channel_and_truncated_packet(block, received, reader_for):
    src, reader = reader_for(block, received, True)
    src.close()
    assert reader.read_packet() is None
    src, reader = reader_for(block, received, True)
    h = MultiFDPacketHeader.ram(flags=0, packet_num=1, ramblock="m0", normal=[0],
                                next_packet_size=PS)
    src.sendall(h.pack() + bytes(100))
    src.close()
    with pytest.raises(Exception, match="truncated"):
        reader.read_packet()
