"""The control protocol between a coordinator and its multifd workers (sans-I/O).

Page data never travels here: only which pages to send, acknowledgements and
the synchronisation that QEMU's multifd threads do with semaphores.  Every
message is a zmq multipart message whose first frame is the kind; the
others are fixed binary layouts (or a page-index array).  The coordinator
binds a ROUTER, each worker connects a DEALER whose routing id is
``b"w<N>"`` (set before connect, so the coordinator can address it).

Both sides: a worker starts, maps guest memory and says HELLO(index); it is
then idle until the migration starts, so starting processes never counts
against a migration's setup time.

Source side::

    coordinator -> worker   CONNECT(uuid, channel_id, uri)  open the channel, send MultiFDInit
                            BATCH(seq, first_packet_num, block_index) + page indexes
                            SYNC(round, packet_num)   write a SYNC packet, then answer
                            BYE                       finish the channel and exit
    worker -> coordinator   READY(channel_id)         channel connected, MultiFDInit sent
                            ACK(seq, normal, zero, wire_bytes)
                            SYNCED(round)
                            DONE(wire_bytes)          answer to BYE
                            ERROR(text, kind, message, channel, offset)
                                                      the failure's text and class
                                                      name; a protocol error's
                                                      location apart (Error.of,
                                                      Error.exception)

Destination side::

    worker -> coordinator   READY(channel_id)         channel received, reading
                            SYNCED(round, normal, zero, wire_bytes)
                                                      read a SYNC packet; waits now
                            DONE(wire_bytes)          channel reached EOF cleanly
                            ERROR(text, kind, message, channel, offset)
    coordinator -> worker   RELEASE(round)            every channel has synced
                            BYE                       stop (migration over or failed)

SYNC is QEMU's guarantee: a destination worker that has read a SYNC packet
applies nothing more until RELEASE, and the coordinator releases only when
every channel has synced *and* the main channel reached the matching point
(EOS in 7.2's per-section mode, MULTIFD_FLUSH in the modern one).  A page
re-sent in a later round on another channel therefore cannot be overwritten
by its older copy still in flight on this one.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from engine.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

BATCH, SYNC, BYE, HELLO, CONNECT = b"BATCH", b"SYNC", b"BYE", b"HELLO", b"CONNECT"
READY, ACK, SYNCED, DONE, ERROR, RELEASE = (b"READY", b"ACK", b"SYNCED", b"DONE",
                                            b"ERROR", b"RELEASE")

_BATCH = struct.Struct("<QQI")
_SYNC = struct.Struct("<QQ")
_ACK = struct.Struct("<QIIQ")
_SYNCED = struct.Struct("<QIIQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_DONE = struct.Struct("<QQQ")


def worker_identity(index: int) -> bytes:
    return b"w%d" % index


def worker_index(identity: bytes) -> int:
    if not identity.startswith(b"w") or not identity[1:].isdigit():
        raise RemoteProtocolError(f"unknown multifd worker identity {identity!r}")
    return int(identity[1:])


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    first_packet_num: int
    block_index: int
    pages: np.ndarray            # uint64 page indexes, ascending

    def frames(self) -> list:
        return [BATCH, _BATCH.pack(self.seq, self.first_packet_num, self.block_index),
                np.ascontiguousarray(self.pages, dtype=np.uint64)]


@dataclass(frozen=True, slots=True)
class Sync:
    round: int
    packet_num: int

    def frames(self) -> list:
        return [SYNC, _SYNC.pack(self.round, self.packet_num)]


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    normal: int
    zero: int
    wire_bytes: int

    def frames(self) -> list:
        return [ACK, _ACK.pack(self.seq, self.normal, self.zero, self.wire_bytes)]


@dataclass(frozen=True, slots=True)
class Synced:
    round: int
    normal: int = 0
    zero: int = 0
    wire_bytes: int = 0

    def frames(self) -> list:
        return [SYNCED, _SYNCED.pack(self.round, self.normal, self.zero, self.wire_bytes)]


@dataclass(frozen=True, slots=True)
class Ready:
    channel_id: int

    def frames(self) -> list:
        return [READY, _U32.pack(self.channel_id)]


@dataclass(frozen=True, slots=True)
class Hello:
    index: int

    def frames(self) -> list:
        return [HELLO, _U32.pack(self.index)]


@dataclass(frozen=True, slots=True)
class Connect:
    uuid: bytes
    channel_id: int
    uri: str

    def frames(self) -> list:
        return [CONNECT, bytes(self.uuid) + _U32.pack(self.channel_id), self.uri.encode()]


@dataclass(frozen=True, slots=True)
class Done:
    wire_bytes: int
    normal: int = 0
    zero: int = 0

    def frames(self) -> list:
        return [DONE, _DONE.pack(self.wire_bytes, self.normal, self.zero)]


@dataclass(frozen=True, slots=True)
class Error:
    text: str
    #: the failure's exception class, for the coordinator to raise the same
    #: kind (a channel error stays a channel error across the process line)
    kind: str = ""
    #: for a protocol error: the message without its location, the channel
    #: and the byte offset it names ("" and -1 when it names none)
    message: str = ""
    channel: str = ""
    offset: int = -1

    @classmethod
    def of(cls, exc: BaseException) -> Error:
        """The ERROR that carries ``exc`` to the coordinator."""
        if isinstance(exc, ProtocolError):
            return cls(str(exc), type(exc).__name__, exc.message, exc.channel or "",
                       -1 if exc.offset is None else exc.offset)
        return cls(str(exc), type(exc).__name__)

    def exception(self, prefix: str, kinds: Mapping[str, type[Exception]],
                  default: type[Exception]) -> Exception:
        """The failure as the coordinator raises it: the class named in ``kinds``
        (by :attr:`kind`, else ``default``), its text after ``prefix``; a
        protocol error keeps its channel and offset as attributes."""
        cls = kinds.get(self.kind, default)
        if issubclass(cls, ProtocolError) and self.message:
            return cls(f"{prefix}: {self.message}",
                       None if self.offset < 0 else self.offset, self.channel or None)
        return cls(f"{prefix}: {self.text}")

    def frames(self) -> list:
        return [ERROR, self.text.encode(), self.kind.encode(), self.message.encode(),
                self.channel.encode(), _I64.pack(self.offset)]


@dataclass(frozen=True, slots=True)
class Release:
    round: int

    def frames(self) -> list:
        return [RELEASE, _U64.pack(self.round)]


@dataclass(frozen=True, slots=True)
class Bye:
    def frames(self) -> list:
        return [BYE]


def decode(frames: list) -> object:
    """Frames (bytes or zmq.Frame) of one message -> a message object."""
    try:
        kind = bytes(frames[0])
        body = frames[1:]
        if kind == BATCH:
            seq, first, block = _BATCH.unpack(bytes(body[0]))
            pages = np.frombuffer(body[1], dtype=np.uint64)
            return Batch(seq, first, block, pages)
        if kind == SYNC:
            return Sync(*_SYNC.unpack(bytes(body[0])))
        if kind == ACK:
            return Ack(*_ACK.unpack(bytes(body[0])))
        if kind == SYNCED:
            return Synced(*_SYNCED.unpack(bytes(body[0])))
        if kind == HELLO:
            return Hello(*_U32.unpack(bytes(body[0])))
        if kind == CONNECT:
            head = bytes(body[0])
            return Connect(head[:16], _U32.unpack(head[16:20])[0], bytes(body[1]).decode())
        if kind == READY:
            return Ready(*_U32.unpack(bytes(body[0])))
        if kind == DONE:
            return Done(*_DONE.unpack(bytes(body[0])))
        if kind == ERROR:
            texts = [bytes(b).decode(errors="replace") for b in body[:4]]
            offset = _I64.unpack(bytes(body[4]))[0] if len(body) > 4 else -1
            # At most four texts: text, kind, message, channel (never offset),
            # which mypy cannot tell from a list
            return Error(*texts, offset=offset)  # type: ignore[misc, arg-type]
        if kind == RELEASE:
            return Release(*_U64.unpack(bytes(body[0])))
        if kind == BYE:
            return Bye()
    except (IndexError, struct.error, ValueError) as exc:
        raise RemoteProtocolError(f"malformed multifd control message {frames[:1]!r}: {exc}",
                                  channel="multifd control") from None
    raise RemoteProtocolError(f"unknown multifd control message {kind!r}",
                              channel="multifd control")


def encode(message) -> list:
    try:
        return message.frames()
    except AttributeError:
        raise LocalProtocolError(f"not a multifd control message: {message!r}") from None
