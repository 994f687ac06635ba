"""A destination multifd worker: one process, one channel (multifd_recv_thread).

The coordinator accepts the connection, reads its MultiFDInit to learn the
channel id, and passes the socket to this worker over a unix socket
(SCM_RIGHTS).  The worker then reads packets and lands their pages in the
destination's RAM, one of two ways per block:

* through its mapping, when the guest was made with ``prealloc`` (QEMU's
  ``prealloc=on``): the worker populated its own mapping at start-up, so
  ``recvmsg_into`` takes the pages straight from the socket into guest
  memory, one buffer per run of adjacent pages, as QEMU's receive threads
  do; for zlib/zstd the codec decompresses into the pages;
* through the block's file otherwise: the payload goes to a reused buffer
  (for zlib/zstd, decompressed into a second one) and each run of adjacent
  pages to the file with one ``pwrite``.  Each worker has its own page
  tables, so storing through an unpopulated mapping costs that worker a
  page fault per page; measured, that made landing a page three times as
  expensive as a ``pwrite``, which copies into the page cache's page
  without mapping it, and ``MADV_POPULATE_WRITE`` over the runs of each
  packet cost as much as the faults it saved.  With the mapping populated
  before the clock the direct path costs a third less CPU than ``pwrite``
  (1 GiB, 2 channels).  Blocks without a file descriptor (tests' stand-ins)
  are written through the mapping.

Zero pages listed in a packet are only written if the page was received
before or the memory was not known to be zero: a destination never touches
memory for a zero page it has never received (QEMU 9.0's received bitmap),
so an idle guest's untouched memory costs no page faults.  The others are
written without looking first (as QEMU's multifd receiver does): a page
costs less to clear than to gather and test from Python.  The "received"
bitmap is shared with the coordinator (which receives pages on the main
channel too): one byte per page in shared memory.

After a SYNC packet the worker reports SYNCED and applies nothing more until
the coordinator says RELEASE (see :mod:`engine.multifd.control`).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import numpy as np

from engine.compress import get_codec
from engine.errors import ChannelClosedError, EngineError, RemoteProtocolError
from engine.multifd import control as ctl
from engine.multifd.packet import MultiFDPacketHeader, packet_size
from engine.multifd.worker import control_socket
from engine.trace import trace

#: at most this many iovecs per recvmsg_into call (Linux IOV_MAX)
_IOV_MAX = 1024


@dataclass(frozen=True)
class RecvWorkerConfig:
    index: int
    endpoint: str
    blocks: tuple                 # RamBlockHandle per block
    received: tuple               # DirtyLogHandle per block: the received bitmap
    fresh: tuple                  # per block: memory known to be all zero at start
    codec: str = "none"
    prealloc: bool = False        # populate the mappings at start-up, land through them
    page_size: int = 4096
    page_count: int = 128
    parent_pid: int = 0


def recv_exact(sock: socket.socket, views: list, what: str, offset: int, channel: str) -> int:
    """Fill every view in ``views`` (1-D byte memoryviews) from ``sock``; returns
    the byte count."""
    total, i = 0, 0
    while i < len(views):
        chunk = views[i:i + _IOV_MAX]
        n = sock.recvmsg_into(chunk)[0]
        if n == 0:
            raise ChannelClosedError(
                f"channel {channel}: stream truncated at offset {offset + total}: "
                f"expected {what}")
        total += n
        if n == sum(map(len, chunk)):
            i += len(chunk)
            continue
        while n:                # a short read: resume inside the view it stopped in
            v = views[i]
            if n >= len(v):
                n -= len(v)
                i += 1
            else:
                views[i] = v[n:]
                n = 0
    return total


def run_bounds(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, end) positions in ``idx`` of each run of adjacent page indexes."""
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    return np.concatenate(([0], breaks)), np.concatenate((breaks, [len(idx)]))


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (a short write is resumed)."""
    done = os.pwrite(fd, data, offset)
    while done < len(data):
        if done <= 0:
            raise OSError(f"pwrite wrote nothing at offset {offset}")
        data, offset = data[done:], offset + done
        done = os.pwrite(fd, data, offset)


def page_runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """(first page, count) for each run of adjacent page indexes."""
    if len(idx) == 0:
        return []
    starts, ends = run_bounds(idx)
    return list(zip(idx[starts].tolist(), (ends - starts).tolist()))


class PacketReader:
    """Reads and applies packets from one channel (no zmq, testable alone)."""

    def __init__(self, sock: socket.socket, index: int, blocks, received, fresh,
                 codec: str, page_size: int = 4096, page_count: int = 128):
        self.sock = sock
        self.name = f"multifd {index}"
        #: idstr -> (block, received log, fresh, file descriptor to pwrite to, or
        #: None to land through the mapping: populated here, or no file)
        self.blocks = {b.idstr: (b, r, f, None if getattr(b, "populated", False)
                                 else getattr(b, "fd", None))
                       for b, r, f in zip(blocks, received, fresh)}
        self.codec = get_codec(codec)
        self.decoder = self.codec.new_decoder()
        self.page_size = page_size
        self.page_count = page_count
        self.header = bytearray(packet_size(page_count))
        self.payload = bytearray(page_count * page_size + 4096)
        #: the source of zero pages that must be written
        self.zeros = memoryview(bytes(page_count * page_size))
        self.offset = 64  # the coordinator consumed MultiFDInit
        self.normal = self.zero = 0

    def read_packet(self) -> MultiFDPacketHeader | None:
        """Apply the next packet; None at a clean end of channel."""
        hdr = memoryview(self.header)
        first = self.sock.recv_into(hdr, len(hdr), socket.MSG_WAITALL)
        if first == 0:
            return None
        if first < len(hdr):
            self.offset += first
            self.offset += recv_exact(self.sock, [hdr[first:]], "a multifd packet header",
                                      self.offset, self.name)
        else:
            self.offset += first
        start = self.offset - len(hdr)
        h = MultiFDPacketHeader.unpack(hdr, self.page_count, channel=self.name,
                                       stream_offset=start)
        if h.normal_pages or h.zero_pages:
            entry = self.blocks.get(h.ramblock)
            if entry is None:
                raise RemoteProtocolError(f"multifd: unknown RAM block {h.ramblock!r}",
                                          start + 64, self.name)
            block, received, fresh, fd = entry
            h.validate(block.used_length, self.page_size, self.name, start)
            ps = self.page_size
            if h.normal_pages:
                h.check_compression(self.codec.flag, channel=self.name, stream_offset=start)
                idx = (h.normal_offsets // np.uint64(ps)).astype(np.int64)
                size = h.payload_size
                if self.codec.name == "none":
                    if size != len(idx) * ps:
                        raise RemoteProtocolError(
                            f"multifd: payload of {size} bytes for {len(idx)} pages",
                            start + 20, self.name)
                    if fd is None:
                        buf = block.buf
                        views = [buf[p * ps:(p + n) * ps] for p, n in page_runs(idx)]
                        self.offset += recv_exact(self.sock, views, "page data",
                                                  self.offset, self.name)
                    else:
                        view = memoryview(self.payload)[:size]
                        self.offset += recv_exact(self.sock, [view], "page data",
                                                  self.offset, self.name)
                        self._write_runs(fd, idx, view)
                else:
                    if size > len(self.payload):
                        self.payload = bytearray(size)
                    view = memoryview(self.payload)[:size]
                    self.offset += recv_exact(self.sock, [view], "compressed page data",
                                              self.offset, self.name)
                    if fd is None:
                        self.decoder.decode_scatter(view, block.pages, idx)
                    else:
                        plain = self.decoder.decode_bytes(view, len(idx), ps)
                        self._write_runs(fd, idx, memoryview(plain))
                received.log[idx] = 1
                self.normal += len(idx)
            if h.zero_pages:
                zidx = (h.zero_offsets // np.uint64(ps)).astype(np.int64)
                if fresh:
                    touch = zidx[received.log[zidx] != 0]
                else:
                    touch = zidx
                if len(touch):
                    if fd is None:
                        block.pages[touch] = 0
                    else:
                        self._write_runs(fd, touch, self.zeros, zeros=True)
                received.log[zidx] = 1
                self.zero += len(zidx)
        return h

    def _write_runs(self, fd: int, idx: np.ndarray, data: memoryview,
                    zeros: bool = False) -> None:
        """Write page ``i`` of ``data`` to page ``idx[i]`` of the file, one call per
        run of adjacent pages (with ``zeros``, every run comes from the start of
        ``data``)."""
        ps = self.page_size
        firsts, ends = run_bounds(idx)
        if len(firsts) == 1:
            pwrite_all(fd, data[:len(idx) * ps], int(idx[0]) * ps)
            return
        at = (idx[firsts] * ps).tolist()
        pwrite = os.pwrite
        # One call per run, tens per packet: the loop stays inline and only a
        # short write (rare on tmpfs) goes through pwrite_all.
        if zeros:
            for off, size in zip(at, ((ends - firsts) * ps).tolist()):
                if pwrite(fd, data[:size], off) != size:
                    pwrite_all(fd, data[:size], off)
        else:
            for a, b, off in zip((firsts * ps).tolist(), (ends * ps).tolist(), at):
                if pwrite(fd, data[a:b], off) != b - a:
                    pwrite_all(fd, data[a:b], off)


def recv_worker_main(cfg: RecvWorkerConfig, fd_sock: socket.socket) -> None:
    from engine.ram.block import RamBlock
    from engine.ram.dirty import DirtyLog

    with control_socket(cfg.endpoint, cfg.index, cfg.parent_pid, "receive",
                        failures=(EngineError, OSError, ValueError)) as zs:
        blocks, logs, sock, reader = [], [], None, None
        try:
            blocks = [RamBlock.attach(h) for h in cfg.blocks]
            logs = [DirtyLog.attach(h) for h in cfg.received]
            if cfg.prealloc:
                for b in blocks:
                    b.populate()    # this process's page tables: before the clock
            zs.send_multipart(ctl.Hello(cfg.index).frames())
            msg, fds, _, _ = socket.recv_fds(fd_sock, 16, 1)
            if not fds:
                return  # the coordinator gave up before a channel arrived
            sock = socket.socket(fileno=fds[0])
            channel_id = int(msg.decode() or cfg.index)
            reader = PacketReader(sock, channel_id, blocks, logs, cfg.fresh, cfg.codec,
                                  cfg.page_size, cfg.page_count)
            zs.send_multipart(ctl.Ready(channel_id).frames())
            trace("multifd_recv_thread_start", id=channel_id)
            rounds = 0
            while True:
                h = reader.read_packet()
                if h is None:
                    trace("multifd_recv_thread_end", id=channel_id, pages=reader.normal,
                          zero=reader.zero, bytes=reader.offset)
                    zs.send_multipart(ctl.Done(reader.offset, reader.normal, reader.zero).frames())
                    return
                if h.is_sync:
                    rounds += 1
                    zs.send_multipart(ctl.Synced(rounds, reader.normal, reader.zero,
                                                 reader.offset).frames())
                    reply = ctl.decode(zs.recv_multipart())
                    if isinstance(reply, ctl.Bye):
                        return
        finally:
            reader = None
            if sock is not None:
                sock.close()
            for r in (*logs, *blocks):
                r.close()
