"""The control protocol between the destination coordinator and its fault handler (sans-I/O).

The two talk over a ``SOCK_SEQPACKET`` socketpair, one message a packet, so
there is no framing.  The first byte is the message type, the rest a fixed
binary layout (a JSON document for the statistics and an error).
Descriptors ride along with SCM_RIGHTS; each message says how many it
carries (:meth:`fds`), and :func:`unpack` refuses a packet whose descriptor
count does not match, so a receiver never holds on to one by mistake.

Coordinator -> fault handler::

    RETURN_PATH   + fd   (a duplicate of) the return path, for REQ_PAGES(_ID)
    PREEMPT       + fd   the preempt channel: page records to place
    PLACED(block, page)  the coordinator placed a page that had a waiter
    PAUSE                the channels broke: drop them, keep the requests
    RESEND               POSTCOPY_RESUME: send every pending request again
    QUERY_STATS          answer with STATS
    STOP                 leave the loop and exit

Fault handler -> coordinator::

    READY                up, listening for vCPUs
    VCPUS(count, bases)  how many vCPUs are registered; once all are, the
                  + fd   bases and userfaultfd of one of them (for the
                         coordinator's placer; none in software mode)
    STATS(figures)       the blocktime statistics (a dict)
    ERROR(exc)           the loop failed with *exc*; the process exits

ERROR carries the exception whole (:mod:`engine.ctlerrors`): the
coordinator raises the same class with the same channel and offset.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from engine.ctlerrors import pack_error, unpack_error
from engine.errors import LocalProtocolError, PostcopyError, RemoteProtocolError

__all__ = ["ReturnPath", "Preempt", "Placed", "Pause", "Resend", "QueryStats", "Stop",
           "Ready", "Vcpus", "Stats", "Error", "pack", "unpack", "TO_HANDLER",
           "TO_COORDINATOR", "CHANNEL"]

#: the channel name errors about this socket carry
CHANNEL = "fault handler control"

(MSG_RETURN_PATH, MSG_PREEMPT, MSG_PLACED, MSG_PAUSE, MSG_RESEND, MSG_QUERY_STATS,
 MSG_STOP, MSG_READY, MSG_VCPUS, MSG_STATS, MSG_ERROR) = range(1, 12)

_PLACED = struct.Struct(">BIQ")         # type, block, page
_VCPUS = struct.Struct(">BIBH")         # type, count, with a userfaultfd, nbases


@dataclass(frozen=True, slots=True)
class ReturnPath:
    def fds(self) -> int:
        return 1

    def pack(self) -> bytes:
        return bytes([MSG_RETURN_PATH])


@dataclass(frozen=True, slots=True)
class Preempt:
    def fds(self) -> int:
        return 1

    def pack(self) -> bytes:
        return bytes([MSG_PREEMPT])


@dataclass(frozen=True, slots=True)
class Placed:
    block: int
    page: int

    def fds(self) -> int:
        return 0

    def pack(self) -> bytes:
        return _PLACED.pack(MSG_PLACED, self.block, self.page)


@dataclass(frozen=True, slots=True)
class Pause:
    def fds(self) -> int:
        return 0

    def pack(self) -> bytes:
        return bytes([MSG_PAUSE])


@dataclass(frozen=True, slots=True)
class Resend:
    def fds(self) -> int:
        return 0

    def pack(self) -> bytes:
        return bytes([MSG_RESEND])


@dataclass(frozen=True, slots=True)
class QueryStats:
    def fds(self) -> int:
        return 0

    def pack(self) -> bytes:
        return bytes([MSG_QUERY_STATS])


@dataclass(frozen=True, slots=True)
class Stop:
    def fds(self) -> int:
        return 0

    def pack(self) -> bytes:
        return bytes([MSG_STOP])


@dataclass(frozen=True, slots=True)
class Ready:
    def fds(self) -> int:
        return 0

    def pack(self) -> bytes:
        return bytes([MSG_READY])


@dataclass(frozen=True, slots=True)
class Vcpus:
    count: int
    #: one vCPU's block bases, with its userfaultfd attached; None until all
    #: vCPUs are in, or when no vCPU has a userfaultfd
    bases: tuple[int, ...] | None = None

    def fds(self) -> int:
        return 0 if self.bases is None else 1

    def pack(self) -> bytes:
        if self.bases is None:
            return _VCPUS.pack(MSG_VCPUS, self.count, 0, 0)
        return (_VCPUS.pack(MSG_VCPUS, self.count, 1, len(self.bases))
                + struct.pack(f">{len(self.bases)}Q", *self.bases))


@dataclass(frozen=True, slots=True)
class Stats:
    figures: dict

    def fds(self) -> int:
        return 0

    def pack(self) -> bytes:
        return bytes([MSG_STATS]) + json.dumps(self.figures).encode()


@dataclass(frozen=True, slots=True)
class Error:
    exc: BaseException

    def fds(self) -> int:
        return 0

    def pack(self) -> bytes:
        return bytes([MSG_ERROR]) + pack_error(self.exc)


Message = (ReturnPath | Preempt | Placed | Pause | Resend | QueryStats | Stop | Ready | Vcpus
           | Stats | Error)

#: what each side may receive
TO_HANDLER = (ReturnPath, Preempt, Placed, Pause, Resend, QueryStats, Stop)
TO_COORDINATOR = (Ready, Vcpus, Stats, Error)

_SIMPLE: dict[int, Message] = {MSG_RETURN_PATH: ReturnPath(), MSG_PREEMPT: Preempt(), MSG_PAUSE: Pause(),
           MSG_RESEND: Resend(), MSG_QUERY_STATS: QueryStats(), MSG_STOP: Stop(),
           MSG_READY: Ready()}


def pack(msg: Message) -> bytes:
    """The packet for *msg* (its descriptors, :meth:`fds` of them, are the caller's)."""
    try:
        return msg.pack()
    except AttributeError:
        raise LocalProtocolError(f"not a fault handler control message: {msg!r}") from None
    except (struct.error, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"{type(msg).__name__}: {exc}") from None


def unpack(data: bytes, nfds: int = 0, channel: str = CHANNEL) -> Message:
    """Parse one packet that came with *nfds* descriptors.

    A malformed packet, or one with the wrong number of descriptors, raises
    :class:`RemoteProtocolError`.
    """
    if not data:
        raise RemoteProtocolError("empty control packet", 0, channel)
    kind = data[0]
    try:
        msg: Message
        simple = _SIMPLE.get(kind)
        if simple is not None:
            if len(data) != 1:
                raise RemoteProtocolError(f"{type(simple).__name__} of {len(data)} bytes",
                                          0, channel)
            msg = simple
        elif kind == MSG_PLACED:
            _, block, page = _PLACED.unpack(data)
            msg = Placed(block, page)
        elif kind == MSG_VCPUS:
            _, count, with_uffd, n = _VCPUS.unpack_from(data)
            if len(data) != _VCPUS.size + 8 * n or with_uffd not in (0, 1) \
                    or (n and not with_uffd):
                raise RemoteProtocolError(f"VCPUS of {len(data)} bytes for {n} bases",
                                          0, channel)
            msg = Vcpus(count, struct.unpack_from(f">{n}Q", data, _VCPUS.size)
                        if with_uffd else None)
        elif kind == MSG_STATS:
            figures = json.loads(bytes(data[1:]))
            if not isinstance(figures, dict):
                raise RemoteProtocolError("STATS that is not an object", 1, channel)
            msg = Stats(figures)
        elif kind == MSG_ERROR:
            msg = Error(unpack_error(data[1:], fallback=PostcopyError,
                                     where="postcopy fault handler", channel=channel))
        else:
            raise RemoteProtocolError(f"unknown control message type {kind}", 0, channel)
    except (struct.error, ValueError) as exc:
        raise RemoteProtocolError(f"malformed control message type {kind}: {exc}",
                                  0, channel) from None
    if msg.fds() != nfds:
        raise RemoteProtocolError(f"{type(msg).__name__} with {nfds} descriptors, not "
                                  f"{msg.fds()}", 0, channel)
    return msg
