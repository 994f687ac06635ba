"""``multifd-compression=none``: the payload is the normal pages' raw bytes.

The encoder copies nothing: it hands back views of the pages themselves so a
worker can ``sendmsg`` straight out of guest shared memory.  A page the guest
rewrites while it is being sent goes out "newer" than the dirty bitmap
thinks, which is harmless because the write also re-dirtied it (QEMU's
zero-copy send relies on the same argument).

The channel methods keep the two fast paths: a batch goes out in one
scatter-gather send (each packet's header, then its pages straight out of
shared memory, one iovec per run of adjacent pages that stays inside the
packet), and a packet's pages are received straight into where they land.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from engine.compress.base import (
    MULTIFD_FLAG_NOCOMP, Buffer, Codec, PacketBatch, PageDecoder, PageEncoder,
    PageLanding, Pages, Payload, PayloadSource, RecvMethods, SendMethods,
    _check_indexes, _check_rows, _flat_bytes, _joined, _out_geometry, _scatter,
)
from engine.errors import CodecError
from engine.ram.runs import index_runs, run_bounds

__all__ = ["NoCompCodec", "NoCompEncoder", "NoCompDecoder",
           "NoCompSendMethods", "NoCompRecvMethods", "NOCOMP"]


class NoCompEncoder(PageEncoder):
    """Zero-copy encoder: the payload buffers are the pages themselves."""

    def encode(self, pages: Pages) -> list[Buffer]:
        if isinstance(pages, np.ndarray):
            _check_rows(pages)
            if pages.shape[0] == 0:
                return []
            if pages.flags.c_contiguous:
                return [pages.reshape(-1).data]
            return [_flat_bytes(row) for row in pages]
        return [_flat_bytes(page) for page in pages]

    def encode_gather(self, ram: np.ndarray, indexes: np.ndarray) -> list[Buffer]:
        """One buffer per run of consecutive pages (few iovecs for ``sendmsg``)."""
        idx = _check_indexes(ram, indexes)
        starts, lengths = index_runs(idx)
        return [ram[s:s + n].reshape(-1).data
                for s, n in zip(starts.tolist(), lengths.tolist())]


class NoCompDecoder(PageDecoder):
    """Copies the raw payload into the destination pages."""

    def decode(self, payload: Payload, out: Pages) -> None:
        n, page_size = _out_geometry(out)
        data = self._checked(payload, n * page_size)
        if n:
            _scatter(data.reshape(n, page_size), out)

    def decode_scatter(self, payload: Payload, ram: np.ndarray,
                       indexes: np.ndarray) -> None:
        idx = _check_indexes(ram, indexes)
        if not ram.flags.writeable:
            raise CodecError("destination RAM array is read-only")
        data = self._checked(payload, idx.size * ram.shape[1])
        if idx.size:
            ram[idx] = data.reshape(idx.size, -1)

    @staticmethod
    def _checked(payload: Payload, expected: int) -> np.ndarray:
        data = np.frombuffer(_joined(payload), dtype=np.uint8)
        if data.size != expected:
            raise CodecError(
                f"nocomp: payload of {data.size} bytes, expected {expected}")
        return data


class NoCompSendMethods(SendMethods):
    """The whole batch as one list: header, page runs, header, page runs..."""

    def send_prepare(self, batch: PacketBatch, block, idx: np.ndarray,
                     zero: np.ndarray) -> Iterator[list[Buffer]]:
        buf = block.buf
        if buf.ndim != 1 or buf.format != "B":
            buf = buf.cast("B")
        ps = block.page_size
        out: list = []
        k = -1                           # the last packet whose header is in out
        pos = np.flatnonzero(~zero)
        if len(pos):
            pages = idx[pos]
            packet = pos // batch.page_count
            firsts, ends = run_bounds(pages, packet)
            starts = (pages[firsts] * ps).tolist()
            stops = ((pages[firsts] + (ends - firsts)) * ps).tolist()
            for p, a, b in zip(packet[firsts].tolist(), starts, stops):
                while k < p:             # headers of this and any page-less packets
                    k += 1
                    out.append(batch.header(k))
                out.append(buf[a:b])
        for k in range(k + 1, len(batch)):
            out.append(batch.header(k))
        if out:
            yield out


class NoCompRecvMethods(RecvMethods):
    """The raw pages straight from the channel to where they land."""

    def payload_size(self, npages: int, page_size: int) -> int:
        return npages * page_size

    def recv(self, source: PayloadSource, landing: PageLanding, idx: np.ndarray,
             size: int, page_size: int) -> None:
        if size != len(idx) * page_size:
            raise CodecError(f"nocomp: payload of {size} bytes for {len(idx)} pages")
        landing.recv_pages(source, idx)


class NoCompCodec(Codec):
    """No compression (QEMU's ``multifd-nocomp.c``)."""

    name = "none"
    flag = MULTIFD_FLAG_NOCOMP

    def new_encoder(self, level: int | None = None) -> NoCompEncoder:
        self.resolve_level(level)
        return NoCompEncoder()

    def new_decoder(self) -> NoCompDecoder:
        return NoCompDecoder()

    def send_setup(self, level: int | None = None) -> NoCompSendMethods:
        self.resolve_level(level)
        return NoCompSendMethods()

    def recv_setup(self) -> NoCompRecvMethods:
        return NoCompRecvMethods()


NOCOMP = NoCompCodec()
