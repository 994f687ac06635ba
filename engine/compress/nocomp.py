"""``multifd-compression=none``: the payload is the normal pages' raw bytes.

The encoder copies nothing: it hands back views of the pages themselves so a
worker can ``sendmsg`` straight out of guest shared memory.  A page the guest
rewrites while it is being sent goes out "newer" than the dirty bitmap
thinks, which is harmless because the write also re-dirtied it (QEMU's
zero-copy send relies on the same argument).
"""
from __future__ import annotations

import numpy as np

from engine.compress.base import (
    MULTIFD_FLAG_NOCOMP, Buffer, Codec, PageDecoder, PageEncoder, Pages,
    Payload, _check_indexes, _check_rows, _flat_bytes, _joined, _out_geometry,
    _scatter,
)
from engine.errors import CodecError

__all__ = ["NoCompCodec", "NoCompEncoder", "NoCompDecoder", "NOCOMP"]


def contiguous_runs(indexes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the runs of consecutive values in ``indexes``."""
    if indexes.size == 0:
        empty = np.empty(0, dtype=np.intp)
        return empty, empty
    breaks = np.flatnonzero(np.diff(indexes) != 1) + 1
    first = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((first, [indexes.size])))
    return indexes[first], lengths


class NoCompEncoder(PageEncoder):
    """Zero-copy encoder: the payload buffers are the pages themselves."""

    def encode(self, pages: Pages) -> list[Buffer]:
        if isinstance(pages, np.ndarray):
            _check_rows(pages)
            if pages.shape[0] == 0:
                return []
            if pages.flags.c_contiguous:
                return [memoryview(pages.reshape(-1))]
            return [_flat_bytes(row) for row in pages]
        return [_flat_bytes(page) for page in pages]

    def encode_gather(self, ram: np.ndarray, indexes: np.ndarray) -> list[Buffer]:
        """One buffer per run of consecutive pages (few iovecs for ``sendmsg``)."""
        idx = _check_indexes(ram, indexes)
        starts, lengths = contiguous_runs(idx)
        return [memoryview(ram[s:s + n].reshape(-1))
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


class NoCompCodec(Codec):
    """No compression (QEMU's ``multifd-nocomp.c``)."""

    name = "none"
    flag = MULTIFD_FLAG_NOCOMP

    def new_encoder(self, level: int | None = None) -> NoCompEncoder:
        self.resolve_level(level)
        return NoCompEncoder()

    def new_decoder(self) -> NoCompDecoder:
        return NoCompDecoder()


NOCOMP = NoCompCodec()
