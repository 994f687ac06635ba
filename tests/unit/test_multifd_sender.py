"""The send side of a multifd channel: batches into packets, without a worker process."""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from engine.compress import get_codec
from engine.multifd.packet import MultiFDPacketHeader, packet_size
from engine.multifd.receiver import PacketReader
from engine.multifd.sender import PacketWriter
from engine.ram.block import RamBlock

PS = 4096
PC = 4                       # pages per packet: a 16-page batch makes 4 packets
ZERO = {6, 7, 12, 13, 14}
BATCH = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 20], np.uint64)


class RecordingChannel:
    """Keeps what each send call carried."""

    def __init__(self):
        self.calls: list[bytes] = []

    def sendmsg_all(self, buffers):
        data = b"".join(bytes(memoryview(b)) for b in buffers)
        self.calls.append(data)
        return len(data)

    send_views = sendmsg_all

    def sendall(self, data):
        self.calls.append(bytes(data))


@pytest.fixture
def src():
    with RamBlock.create("m0", 24 * PS) as block:
        for i in range(block.npages):
            block.pages[i] = 0 if i in ZERO else i + 1
        yield block


def packets(stream: bytes, page_count: int = PC):
    """(header, payload) of each packet in ``stream``."""
    out, at, hsize = [], 0, packet_size(page_count)
    while at < len(stream):
        h = MultiFDPacketHeader.unpack(stream[at:at + hsize], page_count)
        at += hsize
        out.append((h, stream[at:at + h.payload_size]))
        at += h.payload_size
    return out


def test_nocomp_batch_is_one_send_with_runs_split_at_packets(src):
    ch = RecordingChannel()
    w = PacketWriter(ch, [src], "none", None, True, PS, PC)
    normal, zero, nbytes = w.send_batch(0, BATCH, 40)
    assert len(ch.calls) == 1                        # the whole batch, one send
    got = packets(ch.calls[0])
    expect = [([0, 1, 2, 3], []), ([4, 5], [6, 7]), ([9, 10, 11], [12]), ([15, 20], [13, 14])]
    assert [h.packet_num for h, _ in got] == [40, 41, 42, 43]
    for (h, payload), (n, z) in zip(got, expect):
        assert (h.normal_offsets // PS).tolist() == n
        assert (h.zero_offsets // PS).tolist() == z
        assert h.next_packet_size == len(n) * PS == len(payload)
        assert payload == b"".join(src.pages[p].tobytes() for p in n)
    assert (normal, zero) == (11, 5)
    assert nbytes == len(ch.calls[0]) == w.wire_bytes


def test_without_zero_detection_every_page_is_data(src):
    ch = RecordingChannel()
    w = PacketWriter(ch, [src], "none", None, False, PS, PC)
    assert w.send_batch(0, BATCH, 0)[:2] == (16, 0)
    got = packets(ch.calls[0])
    assert [h.zero_pages for h, _ in got] == [0, 0, 0, 0]
    assert b"".join(p for _, p in got) == src.pages[BATCH.astype(np.int64)].tobytes()


def test_compressed_batch_sends_packet_by_packet_and_decodes(src):
    ch = RecordingChannel()
    w = PacketWriter(ch, [src], "zstd", 1, True, PS, PC)
    w.send_batch(0, BATCH, 0)
    assert len(ch.calls) == 4
    got = packets(b"".join(ch.calls))
    dec = get_codec("zstd").new_decoder()
    for h, payload in got:
        n = (h.normal_offsets // PS).astype(np.int64)
        assert h.next_packet_size == len(payload)
        out = np.empty((len(n), PS), np.uint8)
        dec.decode(payload, out)
        assert (out == src.pages[n]).all()


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_batch_round_trip_through_a_reader(src, codec):
    """What the writer sends, the reader lands: the pages, and nothing else."""
    a, b = socket.socketpair()
    with a, b, RamBlock.create("m0", 24 * PS) as dst:
        dst.array[:] = 0xFF
        received = type("Log", (), {"log": np.zeros(24, np.uint8)})()
        writer = PacketWriter(RecordingChannel(), [src], codec, 1, True, PS, PC)
        writer.send_batch(0, BATCH, 0)
        stream = b"".join(writer.channel.calls)
        t = threading.Thread(target=a.sendall, args=(stream,))
        t.start()
        reader = PacketReader(b, 0, [dst], [received], [True], codec, PS, PC)
        for _ in range(4):
            reader.read_packet()
        t.join()
        sent = [p for p in BATCH.tolist() if p not in ZERO]
        assert (dst.pages[sent] == src.pages[sent]).all()
        others = [p for p in range(24) if p not in sent]
        assert (dst.pages[others] == 0xFF).all()     # fresh: zero pages left alone
        assert np.flatnonzero(received.log).tolist() == sorted(BATCH.tolist())
