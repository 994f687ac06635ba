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
                            ERROR(packed exception)   the failure itself, packed by
                                                      engine.ctlerrors (Error.of,
                                                      Error.exception)

Destination side::

    worker -> coordinator   READY(channel_id)         channel received, reading
                            SYNCED(round, normal, zero, wire_bytes)
                                                      read a SYNC packet; waits now
                            DONE(wire_bytes)          channel reached EOF cleanly
                            ERROR(packed exception)
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
from dataclasses import dataclass

import numpy as np

from engine.ctlerrors import pack_error, unpack_error
from engine.errors import (EngineError, LocalProtocolError, MigrationError,
                           RemoteProtocolError)

BATCH, SYNC, BYE, HELLO, CONNECT = b"BATCH", b"SYNC", b"BYE", b"HELLO", b"CONNECT"
READY, ACK, SYNCED, DONE, ERROR, RELEASE = (b"READY", b"ACK", b"SYNCED", b"DONE",
                                            b"ERROR", b"RELEASE")

_BATCH = struct.Struct("<QQI")
_SYNC = struct.Struct("<QQ")
_ACK = struct.Struct("<QIIQ")
_SYNCED = struct.Struct("<QIIQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
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
    """A worker's failure, the exception itself packed by :mod:`engine.ctlerrors`
    (the one way errors cross a process boundary in the engine)."""

    packed: bytes

    @classmethod
    def of(cls, exc: BaseException) -> Error:
        """The ERROR that carries ``exc`` to the coordinator."""
        return cls(pack_error(exc))

    def exception(self, prefix: str) -> Exception:
        """The failure as the coordinator raises it: the worker's engine error as
        itself (class, channel, offset and other attributes), its text after
        ``prefix``; anything else (an OSError, a bug) as a MigrationError
        caused by it."""
        exc = unpack_error(self.packed, fallback=MigrationError, where=prefix,
                           channel="multifd control")
        if isinstance(exc, EngineError) and exc.args:
            exc.args = (f"{prefix}: {exc.args[0]}", *exc.args[1:])
            return exc
        wrapped = MigrationError(f"{prefix}: {exc}")
        wrapped.__cause__ = exc
        return wrapped

    def frames(self) -> list:
        return [ERROR, self.packed]


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
            return Error(bytes(body[0]))
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
