"""A source multifd worker: one process, one channel (QEMU's multifd_send_thread).

The worker maps the guest's RAM blocks itself.  For each batch the
coordinator hands over (a block and page indexes, never bytes) it builds
QEMU packets of up to ``page_count`` pages.  For ``none`` the whole batch
goes out in one scatter-gather send: each packet's 1344-byte header, then
its pages straight out of shared memory (one iovec per run of adjacent
pages); for zlib/zstd each packet is the header and the compressed snapshot.
With ``zero-page-detection=multifd`` the worker finds the batch's zero pages
itself (vectorised, the whole batch at once) and lists them in the packets
instead of sending them.

A page the guest rewrites while it is being sent may go out torn; that is
fine for the same reason it is in QEMU: the write marked the page dirty
again, so a later round sends it again, after a SYNC that orders the two
copies on the destination.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.compress import get_codec, payload_nbytes
from engine.compress.zeropage import block_zero_page_mask
from engine.multifd import control as ctl
from engine.multifd.packet import MultiFDInit, MultiFDPacketHeader, RamPacketBatch
from engine.multifd.worker import control_socket
from engine.ram.holes import HoleMap, block_fd
from engine.trace import trace


@dataclass(frozen=True)
class SendWorkerConfig:
    """Everything a source worker needs (picklable)."""
    index: int
    endpoint: str                 # the coordinator's zmq ROUTER
    blocks: tuple                 # RamBlockHandle per block, in block-list order
    codec: str = "none"
    level: int | None = None
    zero_detect: bool = True      # zero-page-detection=multifd
    page_size: int = 4096
    page_count: int = 128
    parent_pid: int = 0


class PacketWriter:
    """Turns batches into packets on one channel (no zmq, testable alone)."""

    def __init__(self, channel, blocks, codec: str, level, zero_detect: bool,
                 page_size: int = 4096, page_count: int = 128):
        self.channel = channel
        self.blocks = blocks
        self.codec = get_codec(codec)
        self.encoder = self.codec.new_encoder(level)
        self.zero_detect = zero_detect
        self.page_size = page_size
        self.page_count = page_count
        self.wire_bytes = 0
        #: holes of each block's file, learned since the last SYNC (every pass has one)
        self.holes = [HoleMap(block_fd(b), page_size) for b in blocks]

    def send_init(self, uuid: bytes, channel_id: int) -> None:
        data = MultiFDInit(uuid, channel_id).pack()
        self.channel.sendall(data)
        self.wire_bytes += len(data)

    def send_batch(self, block_index: int, pages: np.ndarray,
                   first_packet_num: int) -> tuple[int, int, int]:
        """Send ``pages`` (ascending indexes) of a block; returns (normal, zero, bytes)."""
        block = self.blocks[block_index]
        ps, pc = self.page_size, self.page_count
        idx = pages.astype(np.int64)
        # One look at the whole batch: the per-call cost is paid once, not per packet.
        zero = (block_zero_page_mask(block, idx, ps, self.holes[block_index]) if self.zero_detect
                else np.zeros(len(idx), dtype=bool))
        batch = RamPacketBatch(flags=self.codec.flag, first_packet_num=first_packet_num,
                               ramblock=block.idstr, pages=idx, zero=zero,
                               page_size=ps, page_count=pc)
        normal_total = sum(batch.normal)
        if self.codec.name == "none":
            # nocomp payloads are views of guest memory: the whole batch goes
            # out in one scatter-gather send (a few system calls, not one per
            # packet).
            out: list = []
            for k, runs in enumerate(self._nocomp_runs(block.buf, idx, zero)):
                out.append(batch.header(k))
                out.extend(runs)
            if out:
                self.channel.send_views(out)
            sent = len(batch) * batch.header_size + normal_total * ps
        else:
            sent = 0
            for k in range(len(batch)):
                if batch.normal[k]:
                    payload = self.encoder.encode_gather(block.pages,
                                                         idx[batch.normal_positions(k)])
                    size = payload_nbytes(payload)
                else:
                    payload, size = [], 0
                batch.set_payload_size(k, size)
                # A codec's output is only valid until its next call.
                self.channel.sendmsg_all([batch.header(k), *payload])
                sent += batch.header_size + size
        self.wire_bytes += sent
        return normal_total, len(idx) - normal_total, sent

    def _nocomp_runs(self, buf: memoryview, idx: np.ndarray, zero: np.ndarray) -> list:
        """Per packet of the batch, its normal pages as views of ``buf``: one per run
        of adjacent pages (a run never crosses into the next packet)."""
        ps, pc = self.page_size, self.page_count
        if buf.ndim != 1 or buf.format != "B":
            buf = buf.cast("B")
        npackets = -(-len(idx) // pc)
        pos = np.flatnonzero(~zero)
        runs: list[list] = [[] for _ in range(npackets)]
        if len(pos) == 0:
            return runs
        pages = idx[pos]
        packet = pos // pc
        brk = np.flatnonzero((np.diff(pages) != 1) | (np.diff(packet) != 0)) + 1
        firsts = np.concatenate(([0], brk))
        ends = np.concatenate((brk, [len(pos)]))
        starts = (pages[firsts] * ps).tolist()
        stops = ((pages[firsts] + (ends - firsts)) * ps).tolist()
        for p, a, b in zip(packet[firsts].tolist(), starts, stops):
            runs[p].append(buf[a:b])
        return runs

    def send_sync(self, packet_num: int) -> int:
        for holes in self.holes:
            holes.forget()
        header = MultiFDPacketHeader.sync(packet_num).pack(self.page_count)
        self.channel.sendall(header)
        self.wire_bytes += len(header)
        return len(header)


def packets_needed(npages: int, page_count: int = 128) -> int:
    return -(-npages // page_count)


def send_worker_main(cfg: SendWorkerConfig) -> None:
    """Process body: connect when told, then send what the coordinator hands out."""
    from engine.ram.block import RamBlock
    from engine.transport import connect

    with control_socket(cfg.endpoint, cfg.index, cfg.parent_pid, "send") as sock:
        blocks, channel, writer = [], None, None
        try:
            blocks = [RamBlock.attach(h) for h in cfg.blocks]
            sock.send_multipart(ctl.Hello(cfg.index).frames())       # mapped, idle
            while True:
                msg = ctl.decode(sock.recv_multipart(copy=False))
                if isinstance(msg, ctl.Connect):
                    channel = connect(msg.uri)
                    writer = PacketWriter(channel, blocks, cfg.codec, cfg.level,
                                          cfg.zero_detect, cfg.page_size, cfg.page_count)
                    writer.send_init(msg.uuid, msg.channel_id)
                    trace("multifd_send_thread_start", id=msg.channel_id)
                    sock.send_multipart(ctl.Ready(msg.channel_id).frames())
                elif isinstance(msg, ctl.Batch):
                    normal, zero, nbytes = writer.send_batch(msg.block_index, msg.pages,
                                                             msg.first_packet_num)
                    sock.send_multipart(ctl.Ack(msg.seq, normal, zero, nbytes).frames())
                elif isinstance(msg, ctl.Sync):
                    writer.send_sync(msg.packet_num)
                    sock.send_multipart(ctl.Synced(msg.round).frames())
                elif isinstance(msg, ctl.Bye):
                    wire = writer.wire_bytes if writer else 0
                    trace("multifd_send_thread_end", id=cfg.index, bytes=wire)
                    if channel is not None:
                        channel.close()
                        channel = None
                    sock.send_multipart(ctl.Done(wire).frames())
                    return
        finally:
            writer = None
            if channel is not None:
                channel.close()
            for b in blocks:
                b.close()
