"""A source multifd worker: one process, one channel (QEMU's multifd_send_thread).

The worker maps the guest's RAM blocks itself.  For each batch the
coordinator hands over (a block and page indexes, never bytes) it builds
QEMU packets of up to ``page_count`` pages and lets the codec's send methods
(:class:`~engine.compress.base.SendMethods`, looked up once) lay out the
wire buffers: for ``none`` the whole batch in one scatter-gather send (each
packet's 1344-byte header, then its pages straight out of shared memory, one
iovec per run of adjacent pages); for zlib/zstd each packet's header and
compressed snapshot.  With ``zero-page-detection=multifd`` the worker finds
the batch's zero pages itself (vectorised, the whole batch at once) and
lists them in the packets instead of sending them.

A page the guest rewrites while it is being sent may go out torn; that is
fine for the same reason it is in QEMU: the write marked the page dirty
again, so a later round sends it again, after a SYNC that orders the two
copies on the destination.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from engine.compress import get_codec
from engine.compress.zeropage import block_zero_page_mask
from engine.multifd import control as ctl
from engine.multifd.packet import MultiFDInit, MultiFDPacketHeader, RamPacketBatch
from engine.multifd.worker import control_socket
from engine.ram.holes import HoleMap
from engine.trace import trace

if TYPE_CHECKING:
    from engine.ram.seams import MappedBlock
    from engine.transport.seams import ByteChannel


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
    """Turns batches into packets on one channel (no zmq, testable alone).

    The codec is looked up once: its :class:`~engine.compress.base.SendMethods`
    lay out each batch's buffers (QEMU's ``send_prepare``), and the writer sends
    them as they come.
    """

    def __init__(self, channel: ByteChannel, blocks: Sequence[MappedBlock], codec: str,
                 level, zero_detect: bool,
                 page_size: int = 4096, page_count: int = 128, channel_id: int = 0):
        self.channel = channel
        self.blocks = blocks
        self.id = channel_id
        self.codec = get_codec(codec)
        self.methods = self.codec.send_setup(level)
        self.zero_detect = zero_detect
        self.page_size = page_size
        self.page_count = page_count
        self.wire_bytes = 0
        #: holes of each block's file, learned since the last SYNC (every pass has one)
        self.holes = [HoleMap(b.fd, page_size) for b in blocks]

    def send_init(self, uuid: bytes, channel_id: int) -> None:
        self.id = channel_id
        data = MultiFDInit(uuid, channel_id).pack()
        self.channel.sendall(data)
        self.wire_bytes += len(data)

    def send_batch(self, block_index: int, pages: np.ndarray,
                   first_packet_num: int) -> tuple[int, int, int]:
        """Send ``pages`` (ascending indexes) of a block; returns (normal, zero, bytes)."""
        block = self.blocks[block_index]
        ps = self.page_size
        idx = pages.astype(np.int64)
        # One look at the whole batch: the per-call cost is paid once, not per packet.
        zero = (block_zero_page_mask(block, idx, ps, self.holes[block_index]) if self.zero_detect
                else np.zeros(len(idx), dtype=bool))
        batch = RamPacketBatch(flags=self.codec.flag, first_packet_num=first_packet_num,
                               ramblock=block.idstr, pages=idx, zero=zero,
                               page_size=ps, page_count=self.page_count)
        send = self.channel.send_views
        for buffers in self.methods.send_prepare(batch, block, idx, zero):
            send(buffers)
        sent = len(batch) * batch.header_size + batch.payload_bytes()
        for k in range(len(batch)):     # per packet, as QEMU; a dict lookup when off
            trace("multifd_send", id=self.id, packet_num=first_packet_num + k,
                  normal=batch.normal[k], zero=batch.zero[k], flags=self.codec.flag)
        self.wire_bytes += sent
        normal_total = len(idx) - int(np.count_nonzero(zero))
        return normal_total, len(idx) - normal_total, sent

    def send_sync(self, packet_num: int) -> int:
        for holes in self.holes:
            holes.forget()
        header = MultiFDPacketHeader.sync(packet_num).pack(self.page_count)
        self.channel.sendall(header)
        self.wire_bytes += len(header)
        trace("multifd_send_sync_main_signal", id=self.id, packet_num=packet_num)
        return len(header)

    def cleanup(self) -> None:
        """QEMU's ``send_cleanup``: the codec lets go of its stream."""
        self.methods.send_cleanup()


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
                                          cfg.zero_detect, cfg.page_size, cfg.page_count,
                                          msg.channel_id)
                    writer.send_init(msg.uuid, msg.channel_id)
                    trace("multifd_send_thread_start", id=msg.channel_id)
                    sock.send_multipart(ctl.Ready(msg.channel_id).frames())
                elif isinstance(msg, ctl.Batch):
                    assert writer is not None   # the pool sends CONNECT first
                    normal, zero, nbytes = writer.send_batch(msg.block_index, msg.pages,
                                                             msg.first_packet_num)
                    sock.send_multipart(ctl.Ack(msg.seq, normal, zero, nbytes).frames())
                elif isinstance(msg, ctl.Sync):
                    assert writer is not None   # the pool sends CONNECT first
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
            if writer is not None:
                writer.cleanup()
                writer = None
            if channel is not None:
                channel.close()
            for b in blocks:
                b.close()
