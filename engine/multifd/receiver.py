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
  (1 GiB, 2 channels).

Which of the two a block uses is its :class:`MappedLanding` or
:class:`FileLanding`, chosen once; what the payload is (raw pages, a zlib or
zstd stream) is the codec's business, through its receive methods
(:mod:`engine.compress.base`), also chosen once.  A codec's error about the
payload becomes a :class:`~engine.errors.RemoteProtocolError` naming the
channel, the packet number and the payload's offset in the channel.

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
from typing import TYPE_CHECKING, Sequence

import numpy as np

from engine.compress import get_codec
from engine.errors import ChannelClosedError, CodecError, EngineError, RemoteProtocolError
from engine.multifd import control as ctl
from engine.multifd.packet import MultiFDPacketHeader, packet_size
from engine.multifd.worker import control_socket
from engine.ram.runs import index_runs, run_bounds
from engine.trace import trace

if TYPE_CHECKING:
    from engine.ram.seams import MappedBlock

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


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (a short write is resumed)."""
    done = os.pwrite(fd, data, offset)
    while done < len(data):
        if done <= 0:
            raise OSError(f"pwrite wrote nothing at offset {offset}")
        data, offset = data[done:], offset + done
        done = os.pwrite(fd, data, offset)


class MappedLanding:
    """Pages land through this process's mapping of the block, populated at
    start-up (``prealloc``): raw pages are read straight into place."""

    def __init__(self, block: MappedBlock) -> None:
        self.pages = block.pages
        self.buf = block.buf
        self.page_size = block.page_size

    def recv_pages(self, source, idx: np.ndarray) -> None:
        buf, ps = self.buf, self.page_size
        starts, counts = index_runs(idx)
        source.recv_views([buf[p * ps:(p + n) * ps]
                           for p, n in zip(starts.tolist(), counts.tolist())], "page data")

    def write(self, idx: np.ndarray, data) -> None:
        self.pages[idx] = np.frombuffer(data, dtype=np.uint8).reshape(len(idx), -1)

    def zero(self, idx: np.ndarray) -> None:
        self.pages[idx] = 0


class FileLanding:
    """Pages land through the block's file: one ``pwrite`` per run of adjacent
    pages (see the module's docstring for why not through the mapping)."""

    def __init__(self, block: MappedBlock, zeros: memoryview) -> None:
        self.fd = block.fd
        self.page_size = block.page_size
        #: zero bytes, at least a packet's worth, for zero pages that must be written
        self.zeros = zeros

    def recv_pages(self, source, idx: np.ndarray) -> None:
        self.write(idx, source.recv_payload(len(idx) * self.page_size, "page data"))

    def write(self, idx: np.ndarray, data) -> None:
        """Write page ``i`` of ``data`` to page ``idx[i]`` of the file."""
        self._write_runs(idx, memoryview(data), False)

    def zero(self, idx: np.ndarray) -> None:
        self._write_runs(idx, self.zeros, True)

    def _write_runs(self, idx: np.ndarray, data: memoryview, zeros: bool) -> None:
        """One call per run of adjacent pages (with ``zeros``, every run comes from
        the start of ``data``)."""
        fd, ps = self.fd, self.page_size
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


class PacketReader:
    """Reads and applies packets from one channel (no zmq, testable alone).

    The codec is looked up once; its :class:`~engine.compress.base.RecvMethods`
    reads each payload (QEMU's ``recv``) from this reader, which is its
    :class:`~engine.compress.base.PayloadSource`.  Errors the remote data causes
    leave :meth:`read_packet` as :class:`RemoteProtocolError` naming the channel,
    the packet and the byte offset in the channel's stream.
    """

    def __init__(self, sock: socket.socket, index: int, blocks: Sequence[MappedBlock],
                 received, fresh, codec: str, page_size: int = 4096, page_count: int = 128):
        self.sock = sock
        self.id = index
        self.name = f"multifd {index}"
        #: the source of zero pages that must be written
        zeros = memoryview(bytes(page_count * page_size))
        #: idstr -> (block, received log, fresh, where its pages land)
        self.blocks = {b.idstr: (b, r, f, MappedLanding(b) if b.populated
                                 else FileLanding(b, zeros))
                       for b, r, f in zip(blocks, received, fresh)}
        self.codec = get_codec(codec)
        self.methods = self.codec.recv_setup()
        self.page_size = page_size
        self.page_count = page_count
        self.header = bytearray(packet_size(page_count))
        self.payload = bytearray(page_count * page_size + 4096)
        self.offset = 64  # the coordinator consumed MultiFDInit
        self.normal = self.zero = 0

    # -- PayloadSource ----------------------------------------------------------
    def recv_views(self, views: list, what: str) -> None:
        self.offset += recv_exact(self.sock, views, what, self.offset, self.name)

    def recv_payload(self, size: int, what: str) -> memoryview:
        if size > len(self.payload):
            self.payload = bytearray(size)
        view = memoryview(self.payload)[:size]
        self.offset += recv_exact(self.sock, [view], what, self.offset, self.name)
        return view

    # ----------------------------------------------------------------------------
    def read_packet(self) -> MultiFDPacketHeader | None:
        """Apply the next packet; None at a clean end of channel."""
        hdr = memoryview(self.header)
        first = self.sock.recv_into(hdr, len(hdr), socket.MSG_WAITALL)
        if first == 0:
            return None
        self.offset += first
        if first < len(hdr):
            self.recv_views([hdr[first:]], "a multifd packet header")
        start = self.offset - len(hdr)
        h = MultiFDPacketHeader.unpack(hdr, self.page_count, channel=self.name,
                                       stream_offset=start)
        trace("multifd_recv", id=self.id, packet_num=h.packet_num, normal=h.normal_pages,
              zero=h.zero_pages, flags=h.flags, next_packet_size=h.payload_size)
        if h.normal_pages or h.zero_pages:
            entry = self.blocks.get(h.ramblock)
            if entry is None:
                raise RemoteProtocolError(f"multifd: unknown RAM block {h.ramblock!r}",
                                          start + 64, self.name)
            block, received, fresh, landing = entry
            h.validate(block.used_length, self.page_size, self.name, start)
            ps = self.page_size
            if h.normal_pages:
                h.check_compression(self.codec.flag, channel=self.name, stream_offset=start)
                idx = (h.normal_offsets // np.uint64(ps)).astype(np.int64)
                size = h.payload_size
                want = self.methods.payload_size(len(idx), ps)
                if want is not None and size != want:
                    raise RemoteProtocolError(
                        f"multifd: payload of {size} bytes for {len(idx)} pages",
                        start + 20, self.name)
                payload_at = self.offset
                try:
                    self.methods.recv(self, landing, idx, size, ps)
                except CodecError as exc:
                    # The one place a codec's complaint about remote bytes
                    # becomes the peer's protocol error, with where it came.
                    raise RemoteProtocolError(
                        f"multifd packet {h.packet_num}: {exc}", payload_at,
                        self.name) from exc
                received.log[idx] = 1
                self.normal += len(idx)
            if h.zero_pages:
                zidx = (h.zero_offsets // np.uint64(ps)).astype(np.int64)
                if fresh:
                    touch = zidx[received.log[zidx] != 0]
                else:
                    touch = zidx
                if len(touch):
                    landing.zero(touch)
                received.log[zidx] = 1
                self.zero += len(zidx)
        return h

    def cleanup(self) -> None:
        """QEMU's ``recv_cleanup``: the codec lets go of its stream."""
        self.methods.recv_cleanup()


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
                    trace("multifd_recv_sync_main_wait", id=channel_id, round=rounds,
                          packet_num=h.packet_num)
                    reply = ctl.decode(zs.recv_multipart())
                    if isinstance(reply, ctl.Bye):
                        return
        finally:
            if reader is not None:
                reader.cleanup()
                reader = None
            if sock is not None:
                sock.close()
            closing: tuple[DirtyLog | RamBlock, ...] = (*logs, *blocks)
            for r in closing:
                r.close()
