"""The byte channel as the migration drivers use it (a typing Protocol).

:class:`~engine.transport.channels.Channel` is the implementation; wrappers
that interpose on a channel (``engine.stress.faults.ChannelTap``, the
benchmark's in-memory channel) only need to look like it.  The drivers
(``migration/``, ``multifd/``, ``postcopy/``) annotate their channel
parameters with :class:`ByteChannel`, so mypy checks every object passed
there against this list.
"""
from __future__ import annotations

import socket
from typing import Any, Protocol, Sequence, cast

__all__ = ["ByteChannel", "SocketChannel", "BytesLike", "socket_of"]

#: A C-contiguous bytes-like object: bytes, bytearray, memoryview, mmap or a
#: numpy array.  Any, not typing's Buffer: before Python 3.12 numpy's stubs
#: give ndarray no ``__buffer__``, so Buffer would turn arrays away.
BytesLike = Any


class ByteChannel(Protocol):
    """A connected, blocking byte channel (QEMU's QIOChannel as QEMUFile uses it).

    ``name`` starts every error message about the channel; ``bidirectional``
    is true when it can also carry the return path (sockets).
    """

    @property
    def name(self) -> str: ...

    @property
    def bidirectional(self) -> bool: ...

    def fileno(self) -> int:
        """The descriptor, or -1 once closed."""
        ...

    def settimeout(self, seconds: float | None) -> None: ...

    def sendall(self, data: BytesLike) -> None: ...

    def sendmsg_all(self, buffers: Sequence[BytesLike]) -> int: ...

    def send_views(self, views: list[Any]) -> int:
        """Send flat byte buffers as they are (``views`` may be changed)."""
        ...

    def recv_into(self, buf: BytesLike) -> int:
        """At most ``len(buf)`` bytes into ``buf``; 0 at end of file."""
        ...

    def readinto_exactly(self, buf: BytesLike) -> None: ...

    def shutdown(self) -> None:
        """Abort both directions; may be called from another thread."""
        ...

    def close(self) -> None: ...


class SocketChannel(ByteChannel, Protocol):
    """A byte channel over a stream socket: the only kind that carries a return
    path, multifd pages or a postcopy preempt channel, whose socket goes to
    a worker or the fault handler."""

    @property
    def sock(self) -> socket.socket:
        """The underlying socket (still owned by the channel)."""
        ...


def socket_of(channel: ByteChannel) -> socket.socket:
    """The socket under ``channel``, which must be a :class:`SocketChannel`
    (a return path, a postcopy preempt channel and a multifd channel are)."""
    return cast(SocketChannel, channel).sock
