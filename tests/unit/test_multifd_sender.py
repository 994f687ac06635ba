"""The send side of a multifd channel: batches into packets, without a worker process."""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from engine.compress import get_codec
from engine.multifd.packet import MultiFDPacketHeader, packet_size
from engine.multifd.receiver import PacketReader
from engine import trace
from engine.multifd.sender import PacketWriter
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog
from engine.transport import connect

PS = 4096
PC = 4                       # pages per packet: a 16-page batch makes 4 packets
ZERO = {6, 7, 12, 13, 14}
BATCH = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 20], np.uint64)


class Wire:
    """A real channel (``fd:`` over one end of a socketpair) and everything that
    reached the other end, collected by a thread; counts the writer's send calls."""

    def __init__(self, monkeypatch):
        a, self.peer = socket.socketpair()
        self.channel = connect(f"fd:{a.detach()}")
        self.sends = 0
        real = self.channel.send_views

        def counting(views):
            self.sends += 1
            return real(views)

        monkeypatch.setattr(self.channel, "send_views", counting)
        self.data = bytearray()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self):
        while chunk := self.peer.recv(1 << 16):
            self.data += chunk

    def stream(self) -> bytes:
        """Everything sent (the channel is closed first)."""
        self.channel.close()
        self._thread.join(10)
        assert not self._thread.is_alive()
        return bytes(self.data)

    def close(self):
        self.channel.close()
        self._thread.join(10)
        self.peer.close()


@pytest.fixture
def wire(monkeypatch):
    w = Wire(monkeypatch)
    yield w
    w.close()


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


def test_nocomp_batch_is_one_send_with_runs_split_at_packets(src, wire):
    w = PacketWriter(wire.channel, [src], "none", None, True, PS, PC)
    normal, zero, nbytes = w.send_batch(0, BATCH, 40)
    assert wire.sends == 1                           # the whole batch, one send
    stream = wire.stream()
    got = packets(stream)
    expect = [([0, 1, 2, 3], []), ([4, 5], [6, 7]), ([9, 10, 11], [12]), ([15, 20], [13, 14])]
    assert [h.packet_num for h, _ in got] == [40, 41, 42, 43]
    for (h, payload), (n, z) in zip(got, expect):
        assert (h.normal_offsets // PS).tolist() == n
        assert (h.zero_offsets // PS).tolist() == z
        assert h.next_packet_size == len(n) * PS == len(payload)
        assert payload == b"".join(src.pages[p].tobytes() for p in n)
    assert (normal, zero) == (11, 5)
    assert nbytes == len(stream) == w.wire_bytes


def test_without_zero_detection_every_page_is_data(src, wire):
    w = PacketWriter(wire.channel, [src], "none", None, False, PS, PC)
    assert w.send_batch(0, BATCH, 0)[:2] == (16, 0)
    got = packets(wire.stream())
    assert [h.zero_pages for h, _ in got] == [0, 0, 0, 0]
    assert b"".join(p for _, p in got) == src.pages[BATCH.astype(np.int64)].tobytes()


def test_compressed_batch_sends_packet_by_packet_and_decodes(src, wire):
    w = PacketWriter(wire.channel, [src], "zstd", 1, True, PS, PC)
    nbytes = w.send_batch(0, BATCH, 0)[2]
    assert wire.sends == 4
    stream = wire.stream()
    assert nbytes == len(stream)
    got = packets(stream)
    dec = get_codec("zstd").new_decoder()
    for h, payload in got:
        n = (h.normal_offsets // PS).astype(np.int64)
        assert h.next_packet_size == len(payload)
        out = np.empty((len(n), PS), np.uint8)
        dec.decode(payload, out)
        assert (out == src.pages[n]).all()


@pytest.mark.parametrize("codec", ["none", "zstd", "zlib"])
@pytest.mark.parametrize("populated", [False, True])
def test_batch_round_trip_through_a_reader(src, codec, populated):
    """What the writer sends, the reader lands: the pages, and nothing else."""
    a, b = socket.socketpair()
    channel = connect(f"fd:{a.detach()}")
    with channel, b, RamBlock.create("m0", 24 * PS) as dst, DirtyLog.create(24) as received:
        dst.array[:] = 0xFF
        if populated:
            dst.populate()                           # lands through the mapping
        writer = PacketWriter(channel, [src], codec, 1, True, PS, PC)
        t = threading.Thread(target=writer.send_batch, args=(0, BATCH, 0))
        t.start()
        reader = PacketReader(b, 0, [dst], [received], [True], codec, PS, PC)
        for _ in range(4):
            reader.read_packet()
        t.join(10)
        sent = [p for p in BATCH.tolist() if p not in ZERO]
        assert (dst.pages[sent] == src.pages[sent]).all()
        others = [p for p in range(24) if p not in sent]
        assert (dst.pages[others] == 0xFF).all()     # fresh: zero pages left alone
        assert np.flatnonzero(received.log).tolist() == sorted(BATCH.tolist())
        assert reader.offset - 64 == writer.wire_bytes


def test_each_packet_and_sync_is_traced_under_qemus_names(src, capsys):
    a, b = socket.socketpair()
    channel = connect(f"fd:{a.detach()}")
    trace.enable("multifd_send,multifd_recv,multifd_*sync*")
    try:
        with channel, b, RamBlock.create("m0", 24 * PS) as dst, DirtyLog.create(24) as log:
            writer = PacketWriter(channel, [src], "zstd", 1, True, PS, PC, channel_id=3)
            reader = PacketReader(b, 3, [dst], [log], [True], "zstd", PS, PC)
            t = threading.Thread(target=lambda: (writer.send_batch(0, BATCH, 40),
                                                 writer.send_sync(44)))
            t.start()
            for _ in range(5):
                reader.read_packet()
            t.join(10)
    finally:
        trace.enable(None)
    lines = [line.split(":", 1)[1] for line in capsys.readouterr().err.splitlines()]
    sent = [x for x in lines if x.startswith("multifd_send ")]
    got = [x for x in lines if x.startswith("multifd_recv ")]
    assert [x.split()[2] for x in sent] == [f"packet_num={n}" for n in range(40, 44)]
    assert sent[1].split()[1:5] == ["id=3", "packet_num=41", "normal=2", "zero=2"]
    assert [x.split()[2] for x in got] == [f"packet_num={n}" for n in range(40, 45)]
    assert "multifd_send_sync_main_signal id=3 packet_num=44" in lines
