"""Messages between destination vCPUs and the postcopy fault handler.

They travel on an ``AF_UNIX`` ``SOCK_SEQPACKET`` connection, one message per
packet, so no framing is needed.  Sans-I/O: :func:`pack` and :func:`unpack`
only turn records into bytes and back; the socket, and the descriptor that
rides with a REGISTER (SCM_RIGHTS), are the caller's business.

=============  ==========  ====================================================
message        direction   meaning
=============  ==========  ====================================================
REGISTER       vCPU ->     "I am vCPU *vcpu* (pid *pid*), fault mode *mode*; my
                           mapping of block *i* starts at ``bases[i]``".  With
                           mode USERFAULTFD the vCPU's userfaultfd, registered
                           over every block, is attached (SCM_RIGHTS).
REGISTERED     -> vCPU     accepted; names the shared "received" bitmaps (one
                           byte per page and block), which a software-mode vCPU
                           maps and checks before touching memory.
FAULT          vCPU ->     software mode: pages [page, page+count) of *block*
                           are missing and this vCPU waits for them.
WAKE           -> vCPU     software mode: something this vCPU waits for has
                           been placed; look at the bitmap again.
=============  ==========  ====================================================

It lives with the vCPUs in :mod:`engine.ram` (the lower layer): the vCPU
side (:mod:`engine.ram.faults`) and the handler (:mod:`engine.postcopy`)
both speak it, and postcopy builds on ram, never the other way round.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from engine.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["MODE_USERFAULTFD", "MODE_SOFTWARE", "MODE_NAMES", "Register", "Registered",
           "Fault", "Wake", "pack", "unpack", "MAX_MESSAGE"]

MSG_REGISTER, MSG_REGISTERED, MSG_FAULT, MSG_WAKE = 1, 2, 3, 4

MODE_USERFAULTFD = 1
MODE_SOFTWARE = 2
#: the names the command line and the stats use (``--postcopy-faults``)
MODE_NAMES = {MODE_USERFAULTFD: "userfaultfd", MODE_SOFTWARE: "software"}

#: receive buffer that fits any message (a REGISTERED names every block)
MAX_MESSAGE = 64 * 1024

_REGISTER = struct.Struct(">BIIBH")     # type, vcpu, pid, mode, nblocks
_FAULT = struct.Struct(">BIQI")         # type, block, page, count


@dataclass(frozen=True)
class Register:
    vcpu: int
    pid: int
    mode: int
    bases: tuple[int, ...]


@dataclass(frozen=True)
class Registered:
    #: per block: (shared-memory name of its received bitmap, pages)
    received: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Fault:
    block: int
    page: int
    count: int = 1


@dataclass(frozen=True)
class Wake:
    pass


Message = Register | Registered | Fault | Wake


def pack(msg: Message) -> bytes:
    """The packet for ``msg``."""
    if isinstance(msg, Register):
        if msg.mode not in MODE_NAMES:
            raise LocalProtocolError(f"REGISTER: unknown fault mode {msg.mode}")
        return (_REGISTER.pack(MSG_REGISTER, msg.vcpu, msg.pid, msg.mode, len(msg.bases))
                + struct.pack(f">{len(msg.bases)}Q", *msg.bases))
    if isinstance(msg, Registered):
        return bytes([MSG_REGISTERED]) + json.dumps(
            {"received": [list(r) for r in msg.received]}).encode()
    if isinstance(msg, Fault):
        if msg.count < 1:
            raise LocalProtocolError(f"FAULT: count must be >= 1, not {msg.count}")
        return _FAULT.pack(MSG_FAULT, msg.block, msg.page, msg.count)
    if isinstance(msg, Wake):
        return bytes([MSG_WAKE])
    raise TypeError(f"not a fault-protocol message: {msg!r}")


def unpack(data: bytes, channel: str = "fault socket") -> Message:
    """Parse one packet; a malformed one raises :class:`RemoteProtocolError`."""
    if not data:
        raise RemoteProtocolError("empty fault-protocol packet", 0, channel)
    kind = data[0]
    try:
        if kind == MSG_REGISTER:
            _, vcpu, pid, mode, n = _REGISTER.unpack_from(data)
            if len(data) != _REGISTER.size + 8 * n:
                raise RemoteProtocolError(
                    f"REGISTER of {len(data)} bytes for {n} blocks", 0, channel)
            if mode not in MODE_NAMES:
                raise RemoteProtocolError(f"REGISTER: unknown fault mode {mode}", 7, channel)
            bases = struct.unpack_from(f">{n}Q", data, _REGISTER.size)
            return Register(vcpu, pid, mode, tuple(bases))
        if kind == MSG_REGISTERED:
            doc = json.loads(bytes(data[1:]))
            return Registered(tuple((str(name), int(n)) for name, n in doc["received"]))
        if kind == MSG_FAULT:
            if len(data) != _FAULT.size:
                raise RemoteProtocolError(f"FAULT of {len(data)} bytes", 0, channel)
            _, block, page, count = _FAULT.unpack(data)
            if count < 1:
                raise RemoteProtocolError("FAULT with count 0", 13, channel)
            return Fault(block, page, count)
        if kind == MSG_WAKE:
            if len(data) != 1:
                raise RemoteProtocolError(f"WAKE of {len(data)} bytes", 0, channel)
            return Wake()
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise RemoteProtocolError(f"malformed fault-protocol packet type {kind}: {exc}",
                                  0, channel) from None
    raise RemoteProtocolError(f"unknown fault-protocol message type {kind}", 0, channel)
