"""Return-path messages, destination to source, on the main channel's reverse direction.

Each message is ``be16 type, be16 len, payload`` (spec 1.8).  One message,
RECV_BITMAP, is followed outside its frame by the received-bitmap stream of
spec 2.9: ``be64 size, size bytes of bitmap, be64 0x0123456789ABCDEF``; the
bitmap has one bit per target page, bit n in byte n >> 3 at position n & 7,
and ``size`` is rounded up to 8 bytes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from engine.errors import LocalProtocolError, RemoteProtocolError

from .constants import (
    MIG_RP_MSG_LEN, MIG_RP_MSG_MAX, MIG_RP_MSG_MAX_LEN, RAMBLOCK_RECV_BITMAP_ENDING, MigRpMsg,
)
from .events import NEED_DATA
from .vmstate import NeedData, need

_RP_HEADER = struct.Struct(">HH")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_REQ_PAGES = struct.Struct(">QI")


# -- events -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RpEvent:
    """Base of the return-path events."""


@dataclass(frozen=True, slots=True)
class Shut(RpEvent):
    """SHUT: the destination is done; ``status`` 0 means success."""
    status: int


@dataclass(frozen=True, slots=True)
class Pong(RpEvent):
    """PONG echoing a PING ``value``."""
    value: int


@dataclass(frozen=True, slots=True)
class ReqPages(RpEvent):
    """A postcopy page request: ``length`` bytes at byte ``start`` of ``block``.

    ``block`` is None for the short form (REQ_PAGES): the block of the
    previous REQ_PAGES_ID.
    """
    start: int
    length: int
    block: str | None


@dataclass(frozen=True, slots=True)
class RecvBitmapMsg(RpEvent):
    """RECV_BITMAP: the received bitmap of ``block`` follows (as :class:`ReceivedBitmap`)."""
    block: str


@dataclass(frozen=True, slots=True)
class ReceivedBitmap(RpEvent):
    """The bitmap stream after RECV_BITMAP; see :func:`bitmap_bits` to unpack it."""
    block: str
    bitmap: bytes


@dataclass(frozen=True, slots=True)
class ResumeAck(RpEvent):
    """RESUME_ACK (``value`` is 1): postcopy recovery may go on."""
    value: int


@dataclass(frozen=True, slots=True)
class SwitchoverAck(RpEvent):
    """SWITCHOVER_ACK: the destination allows switchover."""


# -- encoding ------------------------------------------------------------------------

def rp_message(msg_type: int, payload: bytes = b"") -> bytes:
    """One framed message."""
    if len(payload) > MIG_RP_MSG_MAX_LEN:
        raise LocalProtocolError(f"return-path payload of {len(payload)} bytes is too long")
    return _RP_HEADER.pack(msg_type, len(payload)) + payload


def _cstr8(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > 255:
        raise LocalProtocolError(f"block name {name!r} is longer than 255 bytes")
    return bytes((len(raw),)) + raw


def rp_shut(status: int) -> bytes:
    return rp_message(MigRpMsg.MIG_RP_MSG_SHUT, _BE32.pack(status))


def rp_pong(value: int) -> bytes:
    return rp_message(MigRpMsg.MIG_RP_MSG_PONG, _BE32.pack(value))


def rp_req_pages_id(start: int, length: int, block: str) -> bytes:
    """Request ``length`` bytes at byte ``start`` of ``block``, naming the block."""
    return rp_message(MigRpMsg.MIG_RP_MSG_REQ_PAGES_ID,
                      _REQ_PAGES.pack(start, length) + _cstr8(block))


def rp_req_pages(start: int, length: int) -> bytes:
    """Request pages of the block named by the previous REQ_PAGES_ID."""
    return rp_message(MigRpMsg.MIG_RP_MSG_REQ_PAGES, _REQ_PAGES.pack(start, length))


def rp_recv_bitmap(block: str) -> bytes:
    """The RECV_BITMAP message; send :func:`encode_recv_bitmap` right after it."""
    return rp_message(MigRpMsg.MIG_RP_MSG_RECV_BITMAP, _cstr8(block))


def rp_resume_ack(value: int = 1) -> bytes:
    return rp_message(MigRpMsg.MIG_RP_MSG_RESUME_ACK, _BE32.pack(value))


def rp_switchover_ack() -> bytes:
    return rp_message(MigRpMsg.MIG_RP_MSG_SWITCHOVER_ACK)


# -- the received bitmap (spec 2.9) ----------------------------------------------------

def recv_bitmap_size(nbits: int) -> int:
    """Bytes of a received bitmap of ``nbits`` pages on the wire (rounded up to 8)."""
    return ((nbits + 63) // 64) * 8


def encode_recv_bitmap(bits) -> bytes:
    """The bitmap stream for ``bits`` (one bool per target page, True = received)."""
    bits = np.asarray(bits, dtype=bool).ravel()
    packed = np.packbits(bits, bitorder="little").tobytes()
    size = recv_bitmap_size(bits.size)
    return (_BE64.pack(size) + packed.ljust(size, b"\0")
            + _BE64.pack(RAMBLOCK_RECV_BITMAP_ENDING))


def decode_recv_bitmap(buf, offset: int = 0) -> tuple[bytes, int]:
    """Parse a bitmap stream at ``buf[offset:]``: ``(bitmap bytes, end offset)``.

    Raises :class:`NeedData` if ``buf`` ends first and
    :class:`RemoteProtocolError` for a bad end marker.
    """
    need(buf, offset, 8, "received bitmap size")
    (size,) = _BE64.unpack_from(buf, offset)
    need(buf, offset + 8, size + 8, f"received bitmap ({size} bytes) and end marker")
    bitmap = bytes(buf[offset + 8:offset + 8 + size])
    (marker,) = _BE64.unpack_from(buf, offset + 8 + size)
    if marker != RAMBLOCK_RECV_BITMAP_ENDING:
        raise RemoteProtocolError(
            f"received bitmap end marker {marker:#018x}, expected "
            f"{RAMBLOCK_RECV_BITMAP_ENDING:#018x}", offset=offset + 8 + size)
    return bitmap, offset + 16 + size


def bitmap_bits(bitmap: bytes, nbits: int) -> np.ndarray:
    """The first ``nbits`` bits of a received bitmap as a bool array."""
    if len(bitmap) * 8 < nbits:
        raise RemoteProtocolError(f"received bitmap of {len(bitmap)} bytes has no {nbits} bits")
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
    return bits[:nbits].astype(bool)


# -- decoding ---------------------------------------------------------------------------

class ReturnPathDecoder:
    """Incremental decoder of the return path (``feed`` / ``feed_eof`` / ``next_event``).

    Messages are parsed atomically.  Refused as QEMU's source does: type 0
    or >= 8, a length other than a fixed-length type's, a length above 512,
    and REQ_PAGES before any REQ_PAGES_ID.  The input may end between
    messages, not inside one (that raises).
    """

    def __init__(self, channel: str = "return path"):
        self._channel = channel
        self._buf = bytearray()
        self._pos = 0
        self._base = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._bitmap_for: str | None = None      # a RECV_BITMAP's bitmap comes next
        self._named_block = False                # a REQ_PAGES_ID was seen

    @property
    def offset(self) -> int:
        """Bytes consumed so far."""
        return self._base + self._pos

    def feed(self, data) -> None:
        if self._eof:
            raise LocalProtocolError("feed() after feed_eof()", channel=self._channel)
        if self._pos:
            del self._buf[:self._pos]
            self._base += self._pos
            self._pos = 0
        self._buf += data

    def feed_eof(self) -> None:
        self._eof = True

    def next_event(self):
        """The next :class:`RpEvent`, or ``NEED_DATA`` (also at a clean end after EOF)."""
        if self._error is not None:
            raise self._error
        buf, pos = self._buf, self._pos
        if pos == len(buf):
            if not self._eof:
                return NEED_DATA
            if self._bitmap_for is None:
                return NEED_DATA            # a clean end: between messages
            raise self._fail(f"stream truncated: expected received bitmap of "
                             f"'{self._bitmap_for}'", pos)
        try:
            if self._bitmap_for is not None:
                bitmap, self._pos = decode_recv_bitmap(buf, pos)
                block, self._bitmap_for = self._bitmap_for, None
                return ReceivedBitmap(block, bitmap)
            return self._read_message(buf, pos)
        except NeedData as exc:
            if not self._eof:
                return NEED_DATA
            raise self._fail(f"stream truncated: expected {exc.what}", exc.offset) from None
        except RemoteProtocolError as exc:
            raise self._fail(exc.message, exc.offset if exc.offset is not None else pos) \
                from None

    def _fail(self, message: str, buf_offset: int) -> RemoteProtocolError:
        offset = self._base + buf_offset
        err = RemoteProtocolError(f"{message} at offset {offset}", channel=self._channel)
        err.offset = offset
        self._error = err
        return err

    def _read_message(self, buf, pos: int) -> RpEvent:
        need(buf, pos, 4, "return-path message header")
        msg_type, length = _RP_HEADER.unpack_from(buf, pos)
        if msg_type == 0 or msg_type >= MIG_RP_MSG_MAX:
            raise RemoteProtocolError(
                f"Received invalid message {msg_type:#06x} length {length:#06x}", offset=pos)
        kind = MigRpMsg(msg_type)
        fixed = MIG_RP_MSG_LEN[kind]
        if (fixed is not None and length != fixed) or length > MIG_RP_MSG_MAX_LEN:
            expect = fixed if fixed is not None else f"at most {MIG_RP_MSG_MAX_LEN}"
            raise RemoteProtocolError(
                f"Received '{kind.name}' message with incorrect length {length}, "
                f"expecting {expect}", offset=pos + 2)
        p = pos + 4
        need(buf, p, length, f"{kind.name} payload ({length} bytes)")
        payload = bytes(buf[p:p + length])
        event: RpEvent
        if kind == MigRpMsg.MIG_RP_MSG_SHUT:
            event = Shut(_BE32.unpack(payload)[0])
        elif kind == MigRpMsg.MIG_RP_MSG_PONG:
            event = Pong(_BE32.unpack(payload)[0])
        elif kind == MigRpMsg.MIG_RP_MSG_RESUME_ACK:
            event = ResumeAck(_BE32.unpack(payload)[0])
        elif kind == MigRpMsg.MIG_RP_MSG_SWITCHOVER_ACK:
            event = SwitchoverAck()
        elif kind == MigRpMsg.MIG_RP_MSG_REQ_PAGES:
            if not self._named_block:
                raise RemoteProtocolError("REQ_PAGES before any REQ_PAGES_ID", offset=pos)
            start, size = _REQ_PAGES.unpack(payload)
            event = ReqPages(start, size, None)
        elif kind == MigRpMsg.MIG_RP_MSG_REQ_PAGES_ID:
            if length < 13 or 13 + payload[12] != length:
                raise RemoteProtocolError(
                    f"Req_Page_id with length {length} does not match its block name",
                    offset=pos + 2)
            start, size = _REQ_PAGES.unpack_from(payload)
            event = ReqPages(start, size, payload[13:].decode("utf-8", "replace"))
            self._named_block = True
        else:  # RECV_BITMAP
            if length < 1 or 1 + payload[0] != length:
                raise RemoteProtocolError(
                    f"RECV_BITMAP with length {length} does not match its block name",
                    offset=pos + 2)
            event = RecvBitmapMsg(payload[1:].decode("utf-8", "replace"))
            self._bitmap_for = event.block
        self._pos = p + length
        return event


__all__ = [
    "RpEvent", "Shut", "Pong", "ReqPages", "RecvBitmapMsg", "ReceivedBitmap", "ResumeAck",
    "SwitchoverAck", "NEED_DATA", "rp_message", "rp_shut", "rp_pong",
    "rp_req_pages_id", "rp_req_pages", "rp_recv_bitmap", "rp_resume_ack",
    "rp_switchover_ack", "recv_bitmap_size", "encode_recv_bitmap", "decode_recv_bitmap",
    "bitmap_bits", "ReturnPathDecoder",
]
