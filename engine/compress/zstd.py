"""``multifd-compression=zstd``: one zstd stream per channel.

Framing, as QEMU's ``multifd-zstd.c`` produces it: each channel opens a single
zstd frame (unknown content size, no checksum) that is never ended.  A
packet's payload is what the stream emits for that packet's normal pages,
ending with a block flush (``ZSTD_e_flush``) so the receiver can decode the
packet completely without seeing the next one.

The receiver keeps one decompression stream per channel and requires each
packet to decode to exactly ``normal_pages * page_size`` bytes.  Like QEMU's
``ZSTD_decompressStream`` loop it tolerates a peer that ends a frame and
starts another one.
"""
from __future__ import annotations

import zstandard

from engine.compress.base import (
    MULTIFD_FLAG_ZSTD, Buffer, StreamCodec, StreamPageDecoder, StreamPageEncoder,
)
from engine.errors import CodecError

__all__ = ["ZstdCodec", "ZstdEncoder", "ZstdDecoder", "ZSTD"]

# Decompressed bytes per output chunk.  One 512 KiB packet (128 x 4 KiB)
# then comes out in a single chunk, which spares a join.
_WRITE_SIZE = 1 << 20


class ZstdEncoder(StreamPageEncoder):
    """Compresses successive packets through one never-ending zstd frame."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level
        self._stream = zstandard.ZstdCompressor(level=level).compressobj()

    def _compress(self, data: memoryview) -> list[Buffer]:
        try:
            head = self._stream.compress(data)
            tail = self._stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: compression failed: {exc}") from exc
        return [part for part in (head, tail) if part]


class ZstdDecoder(StreamPageDecoder):
    """Decompresses successive packets through one long-lived zstd stream."""

    _what = "zstd"

    def __init__(self) -> None:
        self._stream = zstandard.ZstdDecompressor().decompressobj(
            write_size=_WRITE_SIZE, read_across_frames=True)

    def _decompress(self, payload: Buffer, expected: int) -> bytes:
        try:
            return self._stream.decompress(payload)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: corrupt payload: {exc}") from exc


class ZstdCodec(StreamCodec):
    """Zstandard (QEMU's ``multifd-zstd.c``); level ``multifd-zstd-level`` 0..20."""

    name = "zstd"
    flag = MULTIFD_FLAG_ZSTD
    level_parameter = "multifd-zstd-level"
    level_range = range(0, 21)
    default_level = 1

    def new_encoder(self, level: int | None = None) -> ZstdEncoder:
        return ZstdEncoder(self.resolve_level(level))

    def new_decoder(self) -> ZstdDecoder:
        return ZstdDecoder()


ZSTD = ZstdCodec()
