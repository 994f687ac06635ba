"""``multifd-compression=zlib``: one deflate stream per channel.

Framing, as QEMU's ``multifd-zlib.c`` produces it: a single zlib stream
(deflate with the 2-byte zlib header, 32 KiB window, default memLevel and
strategy) lives for the whole migration on each channel.  A packet's payload
is whatever the stream emits for that packet's normal pages, ending with a
``Z_SYNC_FLUSH`` so the receiver can inflate the packet completely without
seeing the next one.  The stream is never finished.

The receiver keeps one inflater per channel and requires each packet to
inflate to exactly ``normal_pages * page_size`` bytes.
"""
from __future__ import annotations

import zlib

from engine.compress.base import (
    MULTIFD_FLAG_ZLIB, Buffer, Codec, StreamPageDecoder, StreamPageEncoder,
)
from engine.errors import CodecError

__all__ = ["ZlibCodec", "ZlibEncoder", "ZlibDecoder", "ZLIB"]

# deflateInit()/inflateInit() defaults: zlib wrapper, 2**15-byte window.
_WBITS = zlib.MAX_WBITS


class ZlibEncoder(StreamPageEncoder):
    """Deflates successive packets through one long-lived stream."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level
        self._stream = zlib.compressobj(level, zlib.DEFLATED, _WBITS)

    def _compress(self, data: memoryview) -> list[Buffer]:
        try:
            head = self._stream.compress(data)
            tail = self._stream.flush(zlib.Z_SYNC_FLUSH)
        except zlib.error as exc:
            raise CodecError(f"zlib: deflate failed: {exc}") from exc
        return [part for part in (head, tail) if part]


class ZlibDecoder(StreamPageDecoder):
    """Inflates successive packets through one long-lived stream."""

    _what = "zlib"

    def __init__(self) -> None:
        self._stream = zlib.decompressobj(_WBITS)

    def _decompress(self, payload: Buffer, expected: int) -> bytes:
        try:
            # One byte of headroom: if it gets used, the packet overran.
            data = self._stream.decompress(payload, expected + 1)
        except zlib.error as exc:
            raise CodecError(f"zlib: corrupt payload: {exc}") from exc
        if self._stream.eof:
            # QEMU's sender never ends the stream; its receiver rejects it too.
            raise CodecError("zlib: stream ended inside a multifd packet")
        if self._stream.unconsumed_tail:
            raise CodecError(
                f"zlib: packet decompresses to more than {expected} bytes")
        return data


class ZlibCodec(Codec):
    """Deflate (QEMU's ``multifd-zlib.c``); level ``multifd-zlib-level`` 0..9."""

    name = "zlib"
    flag = MULTIFD_FLAG_ZLIB
    level_parameter = "multifd-zlib-level"
    level_range = range(0, 10)
    default_level = 1

    def new_encoder(self, level: int | None = None) -> ZlibEncoder:
        return ZlibEncoder(self.resolve_level(level))

    def new_decoder(self) -> ZlibDecoder:
        return ZlibDecoder()


ZLIB = ZlibCodec()
