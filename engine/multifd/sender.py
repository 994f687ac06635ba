"""A source multifd worker: one process, one channel (QEMU's multifd_send_thread).

The worker maps the guest's RAM blocks itself.  For each batch the
coordinator hands over (a block and page indexes, never bytes) it builds
QEMU packets of up to ``page_count`` pages and writes them with one
scatter-gather send per packet: the 1344-byte header, then for ``none`` the
guest pages straight out of shared memory (one iovec per run of adjacent
pages), for zlib/zstd the compressed snapshot.  With
``zero-page-detection=multifd`` the worker finds the batch's zero pages
itself (vectorised) and lists them in the packet instead of sending them.

A page the guest rewrites while it is being sent may go out torn; that is
fine for the same reason it is in QEMU: the write marked the page dirty
again, so a later round sends it again, after a SYNC that orders the two
copies on the destination.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.compress import get_codec
from engine.compress.zeropage import zero_page_mask_from_buffer
from engine.multifd import control as ctl
from engine.multifd.packet import MultiFDInit, MultiFDPacketHeader
from engine.multifd.worker import control_socket


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

    def send_init(self, uuid: bytes, channel_id: int) -> None:
        data = MultiFDInit(uuid, channel_id).pack()
        self.channel.sendall(data)
        self.wire_bytes += len(data)

    def send_batch(self, block_index: int, pages: np.ndarray,
                   first_packet_num: int) -> tuple[int, int, int]:
        """Send ``pages`` (ascending indexes) of a block; returns (normal, zero, bytes)."""
        block = self.blocks[block_index]
        ps = self.page_size
        normal_total = zero_total = sent = 0
        packet_num = first_packet_num
        for start in range(0, len(pages), self.page_count):
            idx = pages[start:start + self.page_count].astype(np.int64)
            offsets = idx.astype(np.uint64) * np.uint64(ps)
            if self.zero_detect:
                zero = zero_page_mask_from_buffer(block.buf, offsets, ps)
                normal_idx, zero_off = idx[~zero], offsets[zero]
                normal_off = offsets[~zero]
            else:
                normal_idx, normal_off = idx, offsets
                zero_off = offsets[:0]
            payload = (self.encoder.encode_gather(block.pages, normal_idx)
                       if len(normal_idx) else [])
            size = sum(memoryview(b).nbytes for b in payload)
            header = MultiFDPacketHeader.ram(
                flags=self.codec.flag, packet_num=packet_num, ramblock=block.idstr,
                normal=normal_off, zero=zero_off, next_packet_size=size,
                page_count=self.page_count).pack(self.page_count)
            self.channel.sendmsg_all([header, *payload])
            sent += len(header) + size
            normal_total += len(normal_idx)
            zero_total += len(zero_off)
            packet_num += 1
        self.wire_bytes += sent
        return normal_total, zero_total, sent

    def send_sync(self, packet_num: int) -> int:
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
