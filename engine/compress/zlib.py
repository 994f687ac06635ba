"""``multifd-compression=zlib``: one deflate stream per channel.

Framing, as QEMU's ``multifd-zlib.c`` produces it: a single zlib stream
(deflate with the 2-byte zlib header, 32 KiB window) lives for the whole
migration on each channel.  A packet's payload is whatever the stream emits
for that packet's normal pages, ending with a ``Z_SYNC_FLUSH`` so the
receiver can inflate the packet completely without seeing the next one.  The
stream is never finished.

Two deflate implementations produce that stream.  Levels 1..3, the band
users pick for speed, go through ISA-L (the ``isal`` package): on this
project's bench it deflates 5-8x faster than zlib at level 1 for a ratio
within a few percent of zlib's at the same level, which is what decides
whether compression pays at all on a fast link.  Level 0 (stored blocks) and
4..9 (the user asked for ratio over speed) use zlib itself, so those levels
mean exactly what they mean to QEMU.  Either way the wire is plain deflate:
QEMU inflates it with its own zlib, and we inflate QEMU's with ISA-L.

The receiver keeps one inflater per channel and requires each packet to
inflate to exactly ``normal_pages * page_size`` bytes.
"""
from __future__ import annotations

import zlib
from types import ModuleType

from engine.compress.base import (
    MULTIFD_FLAG_ZLIB, Buffer, StreamCodec, StreamPageDecoder, StreamPageEncoder,
)
from engine.errors import CodecError

try:
    from isal import isal_zlib as _isal
except ImportError:  # no wheel for this platform: zlib does all levels
    _isal = None  # type: ignore[assignment]  # the optional-import idiom; uses test for None

__all__ = ["ZlibCodec", "ZlibEncoder", "ZlibDecoder", "ZLIB", "ISAL_LEVELS"]

# deflateInit()/inflateInit() defaults: zlib wrapper, 2**15-byte window.
_WBITS = zlib.MAX_WBITS

#: The levels ISA-L deflates (its own levels 1..3; ISA-L's 0 is not stored).
ISAL_LEVELS = range(1, 4)


def _deflate_module(level: int, backend: str | None) -> ModuleType:
    if backend is None:
        backend = "isal" if _isal is not None and level in ISAL_LEVELS else "zlib"
    if backend == "zlib":
        return zlib
    if backend == "isal" and _isal is not None and level in ISAL_LEVELS:
        return _isal
    raise CodecError(f"zlib: no {backend!r} deflate for level {level}")


def _errors(module: ModuleType) -> tuple[type[Exception], ...]:
    return (zlib.error,) if module is zlib else (zlib.error, module.error)


class ZlibEncoder(StreamPageEncoder):
    """Deflates successive packets through one long-lived stream.

    ``backend`` ('isal' or 'zlib') overrides the choice by level; tests use
    it to reproduce QEMU's own bytes with zlib.
    """

    def __init__(self, level: int, backend: str | None = None) -> None:
        super().__init__()
        self.level = level
        module = _deflate_module(level, backend)
        self.backend = "zlib" if module is zlib else "isal"
        self._errors = _errors(module)
        self._sync_flush = module.Z_SYNC_FLUSH
        self._stream = module.compressobj(level, module.DEFLATED, _WBITS)

    def _compress(self, data: memoryview) -> list[Buffer]:
        try:
            head = self._stream.compress(data)
            tail = self._stream.flush(self._sync_flush)
        except self._errors as exc:
            raise CodecError(f"zlib: deflate failed: {exc}") from exc
        return [part for part in (head, tail) if part]


class ZlibDecoder(StreamPageDecoder):
    """Inflates successive packets through one long-lived stream."""

    _what = "zlib"

    def __init__(self, backend: str | None = None) -> None:
        module = _isal if backend != "zlib" and _isal is not None else zlib
        if backend == "isal" and module is zlib:
            raise CodecError("zlib: the isal package is not installed")
        self.backend = "zlib" if module is zlib else "isal"
        self._errors = _errors(module)
        self._stream = module.decompressobj(_WBITS)

    def _decompress(self, payload: Buffer, expected: int) -> bytes:
        try:
            # One byte of headroom: if it gets used, the packet overran (the
            # length check after us reports it; ISA-L keeps any further
            # output buffered rather than in unconsumed_tail).
            data = self._stream.decompress(payload, expected + 1)
        except self._errors as exc:
            raise CodecError(f"zlib: corrupt payload: {exc}") from exc
        if self._stream.eof:
            # QEMU's sender never ends the stream; its receiver rejects it too.
            raise CodecError("zlib: stream ended inside a multifd packet")
        if self._stream.unconsumed_tail:
            raise CodecError(
                f"zlib: packet decompresses to more than {expected} bytes")
        return data


class ZlibCodec(StreamCodec):
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
