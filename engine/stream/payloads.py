"""Payloads the decoder has framed already, parsed into values: a
POSTCOPY_RAM_DISCARD command's ranges and the configuration section's
capability list."""
from __future__ import annotations

import struct

from engine.errors import RemoteProtocolError

from .constants import MAX_DISCARDS_PER_COMMAND, POSTCOPY_RAM_DISCARD_VERSION
from .events import PostcopyRamDiscard

_BE32 = struct.Struct(">I")

__all__ = ["parse_config_capabilities", "parse_discard"]


def parse_discard(payload: bytes, pos: int) -> PostcopyRamDiscard:
    """A POSTCOPY_RAM_DISCARD payload; ``pos`` is where its command began."""
    # version, name length, name, a zero byte, then (be64 start, be64 length)s.
    if len(payload) < 1 + 1 + 1 + 1 + 16:
        raise RemoteProtocolError(
            f"POSTCOPY_RAM_DISCARD too short ({len(payload)} bytes)", offset=pos + 3)
    if payload[0] != POSTCOPY_RAM_DISCARD_VERSION:
        raise RemoteProtocolError(
            f"POSTCOPY_RAM_DISCARD invalid version {payload[0]}", offset=pos + 5)
    n = payload[1]
    rest = len(payload) - 3 - n
    if rest < 16 or rest % 16 or rest // 16 > MAX_DISCARDS_PER_COMMAND \
            or payload[2 + n] != 0:
        raise RemoteProtocolError(
            f"POSTCOPY_RAM_DISCARD with bad length {len(payload)} for a block name of "
            f"{n} bytes", offset=pos + 3)
    block = payload[2:2 + n].decode("utf-8", "replace")
    words = struct.unpack(f">{rest // 8}Q", payload[3 + n:])
    return PostcopyRamDiscard(block, tuple(zip(words[0::2], words[1::2])))


def parse_config_capabilities(body: bytes) -> tuple[str, ...]:
    """The capability names in a ``configuration/capabilities`` body."""
    (count,) = _BE32.unpack_from(body, 0)
    names, p = [], 4
    for _ in range(count):
        n = body[p]
        names.append(body[p + 1:p + 1 + n].decode("utf-8", "replace"))
        p += 1 + n
    return tuple(names)
