"""The destination side: an address to a listener whose :meth:`Listener.accept`
yields channels (QEMU's socket_start_incoming_migration and its siblings)."""
from __future__ import annotations

import errno
import os
import socket
import stat
import weakref
from typing import Any, Callable

from engine.errors import ChannelBrokenError, ChannelClosedError
from engine.trace import trace
from engine.transport.addresses import (Address, ExecAddress, FdAddress, FileAddress,
                                        TcpAddress, UnixAddress, _as_address)
from engine.transport.channels import Channel, ChannelTimeoutError, _broken, _SocketChannel
from engine.transport.outgoing import _adopt_fd, _spawn, open_file_channel

# ---------------------------------------------------------------------------
# Destination side


class Listener:
    """The destination side of a transport: :meth:`accept` yields channels.

    Socket listeners accept any number of connections (multifd channels connect to
    the main channel's listener); file, exec and fd listeners have exactly one
    channel to give.  ``address`` is the bound address (for ``tcp`` port 0, with the
    port the kernel chose).
    """

    address: Address

    @property
    def uri(self) -> str:
        return self.address.uri

    def accept(self, timeout: float | None = None) -> Channel:
        """The next incoming channel; waits at most ``timeout`` seconds (``None``:
        forever), then raises :class:`ChannelTimeoutError`."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop listening; safe to call more than once, and from another thread to
        abort a blocked :meth:`accept`."""
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri!r}>"


def _remove_socket_file(path: str, identity: tuple[int, int]) -> None:
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass


class _SocketListener(Listener):
    def __init__(self, sock: socket.socket, address: Address,
                 unix_identity: tuple[int, int] | None = None):
        self._sock = sock
        self.address = address
        self._accepted = 0
        self._closed = False
        path = address.path if isinstance(address, UnixAddress) else None
        self._finalizer = weakref.finalize(
            self, _close_listening, sock, path, unix_identity)

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self, timeout: float | None = None) -> Channel:
        if self._closed:
            raise ChannelClosedError(f"{self.uri}: listener is closed")
        try:
            self._sock.settimeout(timeout)
            conn, peer = self._sock.accept()
        except TimeoutError as exc:
            raise ChannelTimeoutError(
                f"{self.uri}: no connection within {timeout} s") from exc
        except OSError as exc:
            if self._closed:
                raise ChannelClosedError(f"{self.uri}: listener is closed") from exc
            raise _broken(self.uri, exc, "accepting") from exc
        self._accepted += 1
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            host = f"[{peer[0]}]" if conn.family == socket.AF_INET6 else peer[0]
            name = f"{self.uri} <- {host}:{peer[1]}"
        else:
            name = f"{self.uri} #{self._accepted}"
        trace("migration_socket_incoming_accepted", channel=name)
        return _SocketChannel(conn, name)

    def close(self) -> None:
        self._closed = True
        self._finalizer()


def _close_listening(sock: socket.socket, path: str | None,
                     identity: tuple[int, int] | None) -> None:
    try:
        # shutdown() wakes a thread blocked in accept(); close() alone would not.
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    if path is not None and identity is not None:
        _remove_socket_file(path, identity)


class _OnceListener(Listener):
    """A transport with a single channel, produced on the first accept()."""

    def __init__(self, address: Address, make: Callable[[], Channel] | None,
                 pending: Channel | None = None):
        self.address = address
        self._make = make
        self._used = False
        self._pending = pending     # fd: owned from listen() until accepted
        self._closed = False

    def accept(self, timeout: float | None = None) -> Channel:
        if self._closed:
            raise ChannelClosedError(f"{self.uri}: listener is closed")
        if self._used:
            raise ChannelClosedError(
                f"{self.uri}: this transport has a single channel, already accepted")
        if self._pending is not None:
            channel, self._pending = self._pending, None
        else:
            assert self._make is not None
            channel = self._make()
        self._used = True
        return channel

    def close(self) -> None:
        self._closed = True
        if self._pending is not None:
            self._pending.close()
            self._pending = None


def listen(addr: Address | str, backlog: int = 16) -> Listener:
    """Open the destination side of a migration transport.

    tcp binds with SO_REUSEADDR (first address the host resolves to; an empty host
    means every IPv6 and IPv4 address); unix removes a stale socket file first and its
    own file on close; file, exec and fd produce their one channel on ``accept()``:
    the file opened for reading at its offset, the command's stdout, the descriptor.
    """
    address = _as_address(addr)
    return _LISTENERS[type(address)](address, backlog)


def _listen_tcp(addr: TcpAddress, backlog: int) -> Listener:
    sockaddr: tuple[Any, ...]      # (host, port) or IPv6's four-tuple
    try:
        if not addr.host and socket.has_dualstack_ipv6():
            family, sockaddr = socket.AF_INET6, ("::", addr.port)
        else:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                addr.host or None, addr.port, type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE)[0]
    except OSError as exc:
        raise _broken(addr.uri, exc, "resolving") from exc
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and not addr.host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(backlog)
        port = sock.getsockname()[1]
    except OSError as exc:
        sock.close()
        raise _broken(addr.uri, exc, "listening") from exc
    return _SocketListener(sock, TcpAddress(addr.host, port))


def _listen_unix(addr: UnixAddress, backlog: int) -> Listener:
    try:
        st = os.lstat(addr.path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _broken(addr.uri, exc, "checking the socket path") from exc
    else:
        if not stat.S_ISSOCK(st.st_mode):
            err = ChannelBrokenError(f"{addr.uri}: {addr.path} exists and is not a socket")
            raise err from FileExistsError(errno.EEXIST, "not a socket", addr.path)
        try:
            os.unlink(addr.path)      # stale: left behind by an earlier listener
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _broken(addr.uri, exc, "removing a stale socket") from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(addr.path)
        st = os.stat(addr.path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _broken(addr.uri, exc, "listening") from exc
    return _SocketListener(sock, addr, (st.st_dev, st.st_ino))


def _listen_file(addr: FileAddress, backlog: int) -> Listener:
    return _OnceListener(addr, lambda: open_file_channel(addr, os.O_RDONLY))


def _listen_exec(addr: ExecAddress, backlog: int) -> Listener:
    return _OnceListener(addr, lambda: _spawn(addr, write=False))


def _listen_fd(addr: FdAddress, backlog: int) -> Listener:
    channel = _adopt_fd(addr.fd, addr.uri)
    return _OnceListener(addr, None, pending=channel)


#: each takes the address of its key's type (Any: a dict cannot say which)
_LISTENERS: dict[type, Callable[[Any, int], Listener]] = {
    TcpAddress: _listen_tcp,
    UnixAddress: _listen_unix,
    FileAddress: _listen_file,
    ExecAddress: _listen_exec,
    FdAddress: _listen_fd,
}
