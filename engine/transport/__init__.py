"""Migration URIs to connected byte channels (QEMU's socket.c, fd.c, exec.c, file.c).

A migration URI names a transport the way QEMU's ``migrate`` and ``-incoming`` take it:

==========================  =================================================
``tcp:HOST:PORT``           TCP; ``tcp:[::1]:PORT`` for IPv6, ``tcp::PORT``
                            (empty host) for every address when listening
``unix:PATH``               a Unix stream socket
``file:PATH[,offset=N]``    a file; the stream starts ``N`` bytes in
``exec:CMD``                ``/bin/sh -c CMD``: we write into its stdin (source)
                            or read its stdout (destination)
``fd:N``                    an already-open descriptor (socket, pipe or file)
==========================  =================================================

:func:`parse_uri` turns a URI into a frozen address; :func:`connect` (source side)
and :func:`listen` + :meth:`Listener.accept` (destination side) turn an address into
a :class:`Channel`, a blocking byte pipe with scatter-gather send, exact reads and
an abort (:meth:`Channel.shutdown`) that another thread may call.

Only sockets are *bidirectional*: QEMU's return path rides on the migration socket
itself, so the other transports cannot carry it.  Every ``OSError`` leaves this module
as :class:`~engine.errors.ChannelBrokenError` whose message starts with the channel's
name and whose ``__cause__`` is the ``OSError``.
"""
from __future__ import annotations

from engine.options import parse_size
from engine.transport.addresses import (UNIX_PATH_MAX, Address, ExecAddress, FdAddress,
                                        FileAddress, TcpAddress, UnixAddress, parse_uri)
from engine.transport.channels import (EXEC_EXIT_GRACE, EXEC_KILL_GRACE, EXEC_SHELL, IOV_MAX,
                                       Channel, ChannelTimeoutError)
from engine.transport.outgoing import UNIX_SNDBUF, connect
from engine.transport.listeners import Listener, listen
from engine.transport.seams import ByteChannel, SocketChannel, socket_of

__all__ = [
    "Address", "TcpAddress", "UnixAddress", "FileAddress", "ExecAddress", "FdAddress",
    "parse_uri", "parse_size", "Channel", "Listener", "ChannelTimeoutError",
    "connect", "listen", "IOV_MAX", "UNIX_PATH_MAX", "UNIX_SNDBUF", "EXEC_SHELL",
    "EXEC_EXIT_GRACE", "EXEC_KILL_GRACE", "ByteChannel", "SocketChannel", "socket_of",
]
