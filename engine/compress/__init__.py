"""Multifd page codecs and zero-page detection, by QEMU's names.

``get_codec('zlib').new_encoder()`` on the sending channel and
``.new_decoder()`` on the receiving one; the codec's ``flag`` goes into every
packet header of the channel.  See :mod:`engine.compress.base` for the
interface and the stream rules.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from engine.compress.base import (
    MULTIFD_FLAG_COMPRESSION_MASK, MULTIFD_FLAG_NOCOMP, MULTIFD_FLAG_QATZIP,
    MULTIFD_FLAG_QPL, MULTIFD_FLAG_UADK, MULTIFD_FLAG_ZLIB, MULTIFD_FLAG_ZSTD,
    Codec, PageDecoder, PageEncoder, payload_nbytes,
)
from engine.compress.nocomp import NOCOMP
from engine.compress.zeropage import find_zero_pages, zero_page_mask_from_buffer
from engine.compress.zlib import ZLIB
from engine.compress.zstd import ZSTD
from engine.errors import InvalidParameterError, RemoteProtocolError

__all__ = [
    "MULTIFD_FLAG_NOCOMP", "MULTIFD_FLAG_ZLIB", "MULTIFD_FLAG_ZSTD",
    "MULTIFD_FLAG_QPL", "MULTIFD_FLAG_UADK", "MULTIFD_FLAG_QATZIP",
    "MULTIFD_FLAG_COMPRESSION_MASK",
    "Codec", "PageEncoder", "PageDecoder", "payload_nbytes",
    "CODECS", "get_codec", "codec_for_flags",
    "find_zero_pages", "zero_page_mask_from_buffer",
]

#: The codecs this engine speaks, keyed by QEMU's ``multifd-compression`` value.
CODECS: Mapping[str, Codec] = MappingProxyType(
    {codec.name: codec for codec in (NOCOMP, ZLIB, ZSTD)})


def get_codec(name: str) -> Codec:
    """The codec for a ``multifd-compression`` value ('none', 'zlib', 'zstd').

    Raises :class:`~engine.errors.InvalidParameterError` (a ConfigError) for
    any other name, including QEMU's hardware-only 'qpl', 'uadk', 'qatzip'.
    """
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise InvalidParameterError(
            "multifd-compression", name,
            f"expected one of {', '.join(CODECS)}") from None


def codec_for_flags(flags: int) -> Codec:
    """The codec named by a packet's compression bits (``flags & 0x3E``).

    Raises :class:`~engine.errors.RemoteProtocolError` for bits of a codec we
    do not implement or several bits at once.
    """
    bits = flags & MULTIFD_FLAG_COMPRESSION_MASK
    for codec in CODECS.values():
        if codec.flag == bits:
            return codec
    raise RemoteProtocolError(f"unsupported multifd compression flags {bits:#04x}")
