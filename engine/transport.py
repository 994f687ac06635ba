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

import dataclasses
import errno
import fcntl
import ipaddress
import os
import re
import select
import signal
import socket
import stat
import subprocess
import threading
import weakref
from collections.abc import Sequence
from typing import Callable, Union

from engine.options import parse_size
from engine.errors import BadURIError, ChannelBrokenError, ChannelClosedError

__all__ = [
    "Address", "TcpAddress", "UnixAddress", "FileAddress", "ExecAddress", "FdAddress",
    "parse_uri", "parse_size", "Channel", "Listener", "ChannelTimeoutError",
    "connect", "listen", "IOV_MAX",
]

#: Most buffers one ``sendmsg``/``writev`` takes (Linux: 1024).
IOV_MAX: int = os.sysconf("SC_IOV_MAX")

#: Longest ``sun_path`` a Unix socket can bind to, in bytes (108 minus the NUL).
UNIX_PATH_MAX = 107
#: send buffer asked for on an outgoing unix-socket channel (see _connect_unix)
UNIX_SNDBUF = 4 << 20

#: The shell QEMU runs ``exec:`` commands with.
EXEC_SHELL = "/bin/sh"

#: Seconds a closed exec channel waits for its command to finish on its own before
#: it is sent SIGTERM (after an abort the command gets no such grace).
EXEC_EXIT_GRACE = 10.0

#: Seconds between SIGTERM and SIGKILL for a command that has to be stopped.
EXEC_KILL_GRACE = 1.0

_OFF_T_MAX = 2**63 - 1


class ChannelTimeoutError(ChannelBrokenError):
    """A channel operation or an accept did not complete within its timeout."""


# ---------------------------------------------------------------------------
# Addresses


@dataclasses.dataclass(frozen=True, slots=True)
class TcpAddress:
    """``tcp:HOST:PORT``.  ``host`` is a name or an IP literal without brackets; ``""``
    means every address when listening and the loopback when connecting.  ``port`` 0
    asks the kernel for a free port (listening only)."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise BadURIError(self.uri, f"port {self.port!r} is not in 0..65535")
        if any(c in self.host for c in " \t\n/,[]\0") or (
                ":" in self.host and not _is_ipv6(self.host)):
            raise BadURIError(self.uri, f"invalid host {self.host!r}")

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class UnixAddress:
    """``unix:PATH``, a Unix stream socket in the file system."""

    path: str

    def __post_init__(self) -> None:
        if not self.path:
            raise BadURIError(self.uri, "missing socket path")
        if "\0" in self.path:
            raise BadURIError(self.uri, "socket path contains a NUL byte")
        size = len(os.fsencode(self.path))
        if size > UNIX_PATH_MAX:
            raise BadURIError(self.uri, f"socket path is {size} bytes long, "
                                        f"a Unix socket takes at most {UNIX_PATH_MAX}")

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"


@dataclasses.dataclass(frozen=True, slots=True)
class FileAddress:
    """``file:PATH[,offset=N]``: the stream occupies the file from byte ``offset`` on;
    the bytes before it belong to someone else and are left alone."""

    path: str
    offset: int = 0

    def __post_init__(self) -> None:
        if not self.path:
            raise BadURIError(self.uri, "missing file path")
        if "\0" in self.path:
            raise BadURIError(self.uri, "file path contains a NUL byte")
        if not isinstance(self.offset, int) or not 0 <= self.offset <= _OFF_T_MAX:
            raise BadURIError(self.uri, f"offset {self.offset!r} is not a file offset")

    @property
    def uri(self) -> str:
        return f"file:{self.path},offset={self.offset}" if self.offset else f"file:{self.path}"


@dataclasses.dataclass(frozen=True, slots=True)
class ExecAddress:
    """``exec:CMD``, run as ``/bin/sh -c CMD``."""

    command: str

    def __post_init__(self) -> None:
        if not self.command.strip():
            raise BadURIError(self.uri, "missing command")
        if "\0" in self.command:
            raise BadURIError(self.uri, "command contains a NUL byte")

    @property
    def uri(self) -> str:
        return f"exec:{self.command}"


@dataclasses.dataclass(frozen=True, slots=True)
class FdAddress:
    """``fd:N``, a descriptor this process already holds; the channel made from it
    takes ownership and closes it."""

    fd: int

    def __post_init__(self) -> None:
        if not isinstance(self.fd, int) or self.fd < 0:
            raise BadURIError(self.uri, f"{self.fd!r} is not a file descriptor number")

    @property
    def uri(self) -> str:
        return f"fd:{self.fd}"


Address = Union[TcpAddress, UnixAddress, FileAddress, ExecAddress, FdAddress]


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


# Transports QEMU knows and we deliberately do not speak, with the reason given back.
_UNSUPPORTED_SCHEMES = {
    "rdma": "the rdma transport is not supported",
    "vsock": "the vsock transport is not supported",
}

def parse_uri(uri: str) -> Address:
    """Parse a migration URI into its address, with QEMU's syntax (see the module doc).

    Raises :class:`~engine.errors.BadURIError` naming the URI and what is wrong.
    """
    if not isinstance(uri, str):
        raise BadURIError(repr(uri), "a URI must be a string")
    scheme, colon, rest = uri.partition(":")
    if not colon:
        if uri == "defer":
            raise BadURIError(uri, "'defer' is not a transport: it means waiting for "
                                   "migrate-incoming to name one")
        raise BadURIError(uri, "missing transport (expected tcp:, unix:, file:, exec: or fd:)")
    parser = _URI_PARSERS.get(scheme)
    if parser is None:
        reason = _UNSUPPORTED_SCHEMES.get(scheme, f"unknown transport {scheme!r}")
        raise BadURIError(uri, reason)
    try:
        return parser(rest)
    except BadURIError as exc:
        # Re-raise against the URI as written, not as re-rendered by the dataclass.
        raise BadURIError(uri, exc.reason) from None
    except ValueError as exc:
        raise BadURIError(uri, str(exc)) from None


def _parse_tcp(rest: str) -> TcpAddress:
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket:
            raise ValueError("missing ']' after the IPv6 address")
        if not _is_ipv6(host):
            raise ValueError(f"{host!r} is not an IPv6 address")
        if not tail.startswith(":"):
            raise ValueError("missing port")
        port_text = tail[1:]
    else:
        host, colon, port_text = rest.partition(":")
        if not colon:
            raise ValueError("missing port")
        if ":" in port_text:
            raise ValueError("an IPv6 address must be written in brackets: tcp:[ADDR]:PORT")
    if "," in port_text:
        raise ValueError(f"socket options ({port_text[port_text.index(','):]!r}) "
                         "are not supported")
    if not port_text:
        raise ValueError("missing port")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is not in 0..65535")
    return TcpAddress(host, port)


def _parse_file(rest: str) -> FileAddress:
    # Like QEMU, the first ",offset=" ends the path; any other comma is part of it.
    path, marker, offset_text = rest.partition(",offset=")
    if not marker:
        return FileAddress(path)
    try:
        offset = parse_size(offset_text)
    except ValueError as exc:
        raise ValueError(f"bad offset: {exc}") from None
    if offset > _OFF_T_MAX:
        raise ValueError(f"offset {offset_text!r} is beyond the largest file offset")
    return FileAddress(path, offset)


def _parse_fd(rest: str) -> FdAddress:
    if not rest:
        raise ValueError("missing file descriptor number")
    if rest.isascii() and rest.isdigit():
        return FdAddress(int(rest))
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", rest):
        raise ValueError(f"{rest!r} looks like a descriptor name from getfd; only "
                         "descriptor numbers are supported")
    raise ValueError(f"{rest!r} is not a file descriptor number")


_URI_PARSERS: dict[str, Callable[[str], Address]] = {
    "tcp": _parse_tcp,
    "unix": UnixAddress,
    "file": _parse_file,
    "exec": ExecAddress,
    "fd": _parse_fd,
}


def _as_address(addr: Address | str) -> Address:
    if isinstance(addr, str):
        return parse_uri(addr)
    if isinstance(addr, (TcpAddress, UnixAddress, FileAddress, ExecAddress, FdAddress)):
        return addr
    raise TypeError(f"expected a migration URI or address, got {type(addr).__name__}")


# ---------------------------------------------------------------------------
# Errors


def _reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror}"
    if isinstance(exc, TimeoutError) and exc.errno in (None, errno.ETIMEDOUT):
        return "timed out"
    if exc.errno in (errno.EPIPE, errno.ECONNRESET):
        return "peer closed the connection"
    if exc.errno == errno.ECONNREFUSED:
        return "connection refused"
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def _broken(name: str, exc: OSError, doing: str = "") -> ChannelBrokenError:
    """The ChannelBrokenError for ``exc``; the caller raises it ``from exc``."""
    cls = ChannelTimeoutError if isinstance(exc, TimeoutError) else ChannelBrokenError
    where = f" while {doing}" if doing else ""
    return cls(f"{name}: {_reason(exc)}{where}")


def _unusable(name: str, why: str) -> ChannelBrokenError:
    err = ChannelBrokenError(f"{name}: {why}")
    err.__cause__ = OSError(errno.EBADF, why)
    return err


# ---------------------------------------------------------------------------
# Channels


def _byte_view(buf) -> memoryview:
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")          # needs a C-contiguous buffer, as sendmsg does
    return view


class Channel:
    """A connected, blocking byte channel.

    ``name`` is the URI (plus the peer for accepted sockets) and starts every error
    message.  ``bidirectional`` is true for sockets only.  ``bytes_sent`` and
    ``bytes_received`` count payload bytes moved so far.

    Reads and writes block until done or until the timeout set with
    :meth:`settimeout` (seconds, per blocking wait) expires, which raises
    :class:`ChannelTimeoutError`.  :meth:`shutdown` may be called from another thread
    to abort a blocked operation: readers then see end of file, writers an error.
    Do not :meth:`close` a channel another thread is still using; shut it down first.
    """

    name: str
    bidirectional: bool
    bytes_sent: int
    bytes_received: int

    def __init__(self, name: str, bidirectional: bool):
        self.name = name
        self.bidirectional = bidirectional
        self.bytes_sent = 0
        self.bytes_received = 0
        self._timeout: float | None = None

    # Primitives each kind provides; every one may move fewer bytes than offered.
    def _send_some(self, views: Sequence[memoryview]) -> int:
        raise NotImplementedError

    def _recv_some(self, view: memoryview, want_all: bool = False) -> int:
        """Read into ``view``; ``want_all`` hints that the caller will loop until
        it is full anyway."""
        raise NotImplementedError

    def fileno(self) -> int:
        """The underlying descriptor, or -1 once closed."""
        raise NotImplementedError

    def shutdown_write(self) -> None:
        """Tell the peer no more data follows (it reads end of file)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Abort both directions; blocked readers see end of file, writers an error."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the channel; safe to call more than once."""
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self.fileno() < 0

    def settimeout(self, seconds: float | None) -> None:
        """Limit each blocking wait to ``seconds`` (``None``: wait forever)."""
        if seconds is not None and seconds < 0:
            raise ValueError("timeout must be non-negative or None")
        self._timeout = seconds

    def gettimeout(self) -> float | None:
        return self._timeout

    def peek(self, n: int) -> bytes:
        """The next ``n`` bytes without consuming them (sockets only)."""
        raise NotImplementedError(f"{self.name}: only socket channels can peek")

    # Shared algorithms over the primitives.

    def sendall(self, data) -> None:
        """Send every byte of ``data`` (any C-contiguous bytes-like object)."""
        self.sendmsg_all((data,))

    def sendmsg_all(self, buffers: Sequence) -> int:
        """Send the concatenation of ``buffers`` without joining them; returns the byte
        count.  At most :data:`IOV_MAX` buffers go to one system call, and a short write
        resumes inside the buffer where it stopped."""
        return self.send_views([v for v in map(_byte_view, buffers) if v.nbytes])

    def send_views(self, views: list) -> int:
        """:meth:`sendmsg_all` of buffers that already are flat byte buffers
        (``bytes``, ``bytearray``, 1-D memoryviews of format ``B``), taken as
        they are: a batch of page records is two buffers per page, and
        converting each cost as much as sending it.  ``views`` may be changed."""
        total = 0
        i = 0
        while i < len(views):
            chunk = views[i:i + IOV_MAX]
            sent = self._send_some(chunk)
            total += sent
            self.bytes_sent += sent
            if sent == sum(map(len, chunk)):
                i += len(chunk)
                continue
            while sent:                 # a short write: resume where it stopped
                head = views[i]
                if sent >= len(head):
                    sent -= len(head)
                    i += 1
                else:
                    views[i] = memoryview(head)[sent:]
                    sent = 0
        return total

    def recv_into(self, buf) -> int:
        """Read at most ``len(buf)`` bytes into ``buf``; 0 means end of file."""
        view = _byte_view(buf)
        if not view.nbytes:
            return 0
        n = self._recv_some(view)
        self.bytes_received += n
        return n

    def readinto_exactly(self, buf) -> None:
        """Fill ``buf`` completely or raise :class:`~engine.errors.ChannelClosedError`."""
        view = _byte_view(buf)
        got = 0
        while got < view.nbytes:
            n = self._recv_some(view[got:], True)
            if n == 0:
                raise ChannelClosedError(
                    f"{self.name}: end of stream with {view.nbytes - got} of "
                    f"{view.nbytes} expected bytes missing")
            got += n
            self.bytes_received += n

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes; ``b''`` at end of file."""
        buf = bytearray(n)
        got = self.recv_into(buf)
        return bytes(buf[:got])

    def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes or :class:`~engine.errors.ChannelClosedError`."""
        buf = bytearray(n)
        self.readinto_exactly(buf)
        return bytes(buf)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.name!r} {state}>"


class _SocketChannel(Channel):
    """A connected stream socket (tcp, unix, or an inherited socket fd)."""

    def __init__(self, sock: socket.socket, name: str):
        super().__init__(name, bidirectional=True)
        sock.settimeout(None)
        self._sock = sock
        self._finalizer = weakref.finalize(self, sock.close)

    def _send_some(self, views):
        try:
            # MSG_NOSIGNAL: a vanished peer is an error, not SIGPIPE, whatever the
            # embedding program did with signal handlers.
            return self._sock.sendmsg(views, (), socket.MSG_NOSIGNAL)
        except OSError as exc:
            raise self._error(exc, "sending") from exc

    def _recv_some(self, view, want_all=False):
        try:
            # MSG_WAITALL: one system call per exact read unless the peer is slow.
            return self._sock.recv_into(view, 0, socket.MSG_WAITALL if want_all else 0)
        except OSError as exc:
            raise self._error(exc, "receiving") from exc

    def _error(self, exc: OSError, doing: str) -> ChannelBrokenError:
        if self._sock.fileno() < 0:
            return _unusable(self.name, "channel is closed")
        return _broken(self.name, exc, doing)

    def peek(self, n: int) -> bytes:
        """The next ``n`` bytes without consuming them; blocks until ``n`` bytes are
        queued or the peer has finished (then fewer, possibly ``b''``).  The bytes stay
        in the kernel, so the socket can still be handed to another process."""
        try:
            if self._sock.family == socket.AF_UNIX:
                return self._peek_unix(n)
            return self._peek_waitall(n)
        except OSError as exc:
            raise self._error(exc, "peeking") from exc

    def _peek_waitall(self, n: int) -> bytes:
        # TCP honours MSG_WAITALL with MSG_PEEK; a short answer means end of stream
        # (or a signal, hence one more try when it grew).
        previous = -1
        while True:
            data = self._sock.recv(n, socket.MSG_PEEK | socket.MSG_WAITALL)
            if len(data) in (n, previous):
                return data
            previous = len(data)

    def _peek_unix(self, n: int) -> bytes:
        # Unix sockets ignore MSG_WAITALL when peeking; with SO_PEEK_OFF each peek
        # continues where the last stopped and blocks for new data instead.
        so_peek_off = getattr(socket, "SO_PEEK_OFF", 42)     # 42: Linux's value
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, so_peek_off, 0)
        except OSError:
            return self._peek_waitall(n)
        try:
            parts = []
            got = 0
            while got < n:
                chunk = self._sock.recv(n - got, socket.MSG_PEEK)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            return b"".join(parts)
        finally:
            self._sock.setsockopt(socket.SOL_SOCKET, so_peek_off, -1)

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def sock(self) -> socket.socket:
        """The underlying socket (still owned by the channel)."""
        return self._sock

    def settimeout(self, seconds: float | None) -> None:
        super().settimeout(seconds)
        self._sock.settimeout(seconds)

    def shutdown_write(self) -> None:
        self._shutdown(socket.SHUT_WR)

    def shutdown(self) -> None:
        self._shutdown(socket.SHUT_RDWR)

    def _shutdown(self, how: int) -> None:
        if self._sock.fileno() < 0:
            return
        try:
            self._sock.shutdown(how)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:     # the peer went first: nothing to do
                raise _broken(self.name, exc, "shutting down") from exc

    def close(self) -> None:
        self._finalizer()


class _FdState:
    """What an fd channel must release, kept apart from the channel so that
    ``weakref.finalize`` can release it without keeping the channel alive."""

    def __init__(self, fd: int, wake: int | None, proc: subprocess.Popen | None):
        self.fd = fd
        self.wake = wake        # eventfd made readable by shutdown(); None for files
        self.proc = proc
        self.aborted = False    # shutdown() was called: do not wait politely
        self.lock = threading.Lock()

    def close_fd(self) -> None:
        with self.lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def release(self) -> None:
        self.close_fd()
        if self.proc is not None:
            _reap(self.proc, EXEC_EXIT_GRACE if not self.aborted else 0.0)
        with self.lock:
            wake, self.wake = self.wake, None
        if wake is not None:
            os.close(wake)


def _reap(proc: subprocess.Popen, grace: float) -> None:
    """Wait for ``proc``: ``grace`` seconds on its own, then SIGTERM, then SIGKILL.

    The signals go to the command's whole process group: the shell may have forked
    the actual command, which would outlive a shell killed on its own.
    """
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=EXEC_KILL_GRACE)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    # The leader is not reaped yet, so its pid is still its group's id.
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


class _FdChannel(Channel):
    """A pipe, FIFO, character device or regular file (one direction only).

    Pipes are switched to non-blocking mode and waited on with poll() together with
    an eventfd, which is what lets :meth:`shutdown` wake a blocked reader or writer
    and :meth:`settimeout` bound a wait.  Regular files never block.
    """

    def __init__(self, fd: int, name: str, proc: subprocess.Popen | None = None):
        super().__init__(name, bidirectional=False)
        try:
            mode = os.fstat(fd).st_mode
            access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
            wake = None
            if not stat.S_ISREG(mode):
                os.set_blocking(fd, False)
                wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError as exc:
            raise _broken(name, exc, "opening") from exc
        self.readable = access in (os.O_RDONLY, os.O_RDWR)
        self.writable = access in (os.O_WRONLY, os.O_RDWR)
        self._state = _FdState(fd, wake, proc)
        self._shut = False
        self._finalizer = weakref.finalize(self, self._state.release)

    def _do(self, op: Callable[[int], int], events: int, doing: str) -> int:
        """Run ``op(fd)`` until it stops reporting EAGAIN, waiting in between."""
        while True:
            fd = self._state.fd
            if fd < 0:
                raise _unusable(self.name, "channel is closed")
            try:
                return op(fd)
            except BlockingIOError:
                self._wait(fd, events, doing)
            except OSError as exc:
                raise self._error(exc, doing) from exc
            if self._shut:
                return -1

    def _wait(self, fd: int, events: int, doing: str) -> None:
        poller = select.poll()
        poller.register(fd, events)
        wake = self._state.wake
        if wake is not None:
            poller.register(wake, select.POLLIN)
        ms = None if self._timeout is None else max(0, round(self._timeout * 1000))
        if not poller.poll(ms):
            exc = TimeoutError(errno.ETIMEDOUT, f"no progress in {self._timeout} s")
            raise ChannelTimeoutError(
                f"{self.name}: timed out after {self._timeout} s while {doing}") from exc

    def _error(self, exc: OSError, doing: str) -> ChannelBrokenError:
        return _broken(self.name, exc, doing)

    def _send_some(self, views):
        if not self.writable:
            raise _unusable(self.name, "channel is open for reading only")
        if self._shut:
            raise _unusable(self.name, "channel was shut down")
        n = self._do(lambda fd: os.writev(fd, views), select.POLLOUT, "sending")
        if n < 0:
            raise _unusable(self.name, "channel was shut down")
        return n

    def _recv_some(self, view, want_all=False):
        if not self.readable:
            raise _unusable(self.name, "channel is open for writing only")
        if self._shut:
            return 0
        return max(0, self._do(lambda fd: os.readv(fd, (view,)), select.POLLIN,
                               "receiving"))

    def fileno(self) -> int:
        return self._state.fd

    def shutdown_write(self) -> None:
        """Close a write-only channel's descriptor so the reader sees end of file.
        A channel that can read keeps its descriptor (nothing to do)."""
        if self.writable and not self.readable:
            self._state.close_fd()

    def shutdown(self) -> None:
        self._shut = True
        self._state.aborted = True
        with self._state.lock:
            if self._state.wake is not None:
                os.eventfd_write(self._state.wake, 1)

    def close(self) -> None:
        self._finalizer()


class _ExecChannel(_FdChannel):
    """One end of a pipe to ``/bin/sh -c CMD``.  Closing waits for the command
    (:data:`EXEC_EXIT_GRACE`, none after :meth:`shutdown` or when the reader
    stops early) and then stops it; its exit status is :attr:`returncode`."""

    def __init__(self, fd: int, name: str, proc: subprocess.Popen):
        super().__init__(fd, name, proc)
        self._proc = proc
        self._eof = False

    @property
    def returncode(self) -> int | None:
        """The command's exit status once reaped (negative: killed by that signal)."""
        return self._proc.returncode

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _recv_some(self, view, want_all=False):
        n = super()._recv_some(view)
        if n == 0:
            self._eof = True
        return n

    def _error(self, exc: OSError, doing: str) -> ChannelBrokenError:
        if exc.errno == errno.EPIPE:
            try:
                status = self._proc.wait(timeout=EXEC_KILL_GRACE)
                how = f"exit status {status}"
            except subprocess.TimeoutExpired:
                how = "still running"
            return ChannelBrokenError(
                f"{self.name}: peer closed the connection (the command stopped "
                f"reading; {how})")
        return super()._error(exc, doing)

    def close(self) -> None:
        if self.readable and not self._eof:
            # We stop reading before the command finished writing: do not wait for it.
            self._state.aborted = True
        super().close()


# ---------------------------------------------------------------------------
# Source side


def connect(addr: Address | str, timeout: float | None = 30) -> Channel:
    """Open the source side of a migration channel.

    ``timeout`` (seconds) bounds establishing a socket connection only; the returned
    channel blocks without limit until :meth:`Channel.settimeout` says otherwise.
    ``file:`` opens (creating, mode 0600) for writing at the offset and truncates
    nothing, as QEMU does: bytes before the offset stay, and so do the bytes of an
    older, longer stream past the end of ours (QEMU's loader stops at the EOF
    section; remove the file first if that matters); ``exec:`` starts the command with its stdin
    as the channel; ``fd:`` takes ownership of the descriptor.
    """
    address = _as_address(addr)
    return _CONNECTORS[type(address)](address, timeout)


def _connect_tcp(addr: TcpAddress, timeout: float | None) -> Channel:
    host = addr.host or "localhost"
    try:
        sock = socket.create_connection((host, addr.port), timeout=timeout)
    except OSError as exc:
        raise _broken(addr.uri, exc) from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        sock.close()
        raise _broken(addr.uri, exc) from exc
    return _SocketChannel(sock, addr.uri)


def _connect_unix(addr: UnixAddress, timeout: float | None) -> Channel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        # Who connects is who sends the pages (main, multifd and preempt
        # channels alike).  With the default buffer (~200 KiB) every 1 MiB
        # batch blocks the sender and wakes the receiver several times; on
        # 2 cores that ping-pong left both processes a third idle, and a
        # wider buffer took a 1 GiB single-channel migration from 430-660 to
        # 300-330 ms.  TCP keeps its autotuning (setting SO_SNDBUF would turn
        # it off); the kernel caps the value at net.core.wmem_max.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        sock.connect(addr.path)
    except OSError as exc:
        sock.close()
        raise _broken(addr.uri, exc) from exc
    return _SocketChannel(sock, addr.uri)


def _connect_file(addr: FileAddress, timeout: float | None) -> Channel:
    try:
        fd = os.open(addr.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _broken(addr.uri, exc, "opening") from exc
    try:
        os.lseek(fd, addr.offset, os.SEEK_SET)
    except OSError as exc:
        os.close(fd)
        raise _broken(addr.uri, exc, "seeking") from exc
    return _adopt_fd(fd, addr.uri)


def _connect_exec(addr: ExecAddress, timeout: float | None) -> Channel:
    return _spawn(addr, write=True)


def _connect_fd(addr: FdAddress, timeout: float | None) -> Channel:
    return _adopt_fd(addr.fd, addr.uri)


def _adopt_fd(fd: int, name: str) -> Channel:
    """Wrap (and own) ``fd``: a socket becomes a socket channel, anything else an
    fd channel."""
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError as exc:
        raise _broken(name, exc, "opening") from exc
    if is_socket:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise _broken(name, exc, "opening") from exc
        if sock.type != socket.SOCK_STREAM:
            sock.close()
            raise _unusable(name, "not a stream socket")
        return _SocketChannel(sock, name)
    try:
        return _FdChannel(fd, name)
    except ChannelBrokenError:
        os.close(fd)
        raise


def _spawn(addr: ExecAddress, write: bool) -> Channel:
    """Start ``/bin/sh -c CMD`` with a pipe on its stdin (``write``) or stdout.  The
    other standard stream is /dev/null and stderr is ours, as in QEMU.

    The command gets a process group of its own, so that stopping it reaches what
    the shell started, and a Ctrl-C meant for us does not cut the stream under us:
    we end the command ourselves when the channel closes."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    ours, theirs = (write_end, read_end) if write else (read_end, write_end)
    try:
        proc = subprocess.Popen(
            [EXEC_SHELL, "-c", addr.command],
            stdin=theirs if write else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if write else theirs,
            close_fds=True, process_group=0)
    except OSError as exc:
        os.close(ours)
        raise _broken(addr.uri, exc, "starting the command") from exc
    finally:
        os.close(theirs)
    try:
        return _ExecChannel(ours, addr.uri, proc)
    except ChannelBrokenError:
        os.close(ours)
        _reap(proc, 0.0)
        raise


_CONNECTORS: dict[type, Callable[[Address, float | None], Channel]] = {
    TcpAddress: _connect_tcp,
    UnixAddress: _connect_unix,
    FileAddress: _connect_file,
    ExecAddress: _connect_exec,
    FdAddress: _connect_fd,
}


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
    def open_for_reading() -> Channel:
        try:
            fd = os.open(addr.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _broken(addr.uri, exc, "opening") from exc
        try:
            os.lseek(fd, addr.offset, os.SEEK_SET)
        except OSError as exc:
            os.close(fd)
            raise _broken(addr.uri, exc, "seeking") from exc
        return _adopt_fd(fd, addr.uri)
    return _OnceListener(addr, open_for_reading)


def _listen_exec(addr: ExecAddress, backlog: int) -> Listener:
    return _OnceListener(addr, lambda: _spawn(addr, write=False))


def _listen_fd(addr: FdAddress, backlog: int) -> Listener:
    channel = _adopt_fd(addr.fd, addr.uri)
    return _OnceListener(addr, None, pending=channel)


_LISTENERS: dict[type, Callable[[Address, int], Listener]] = {
    TcpAddress: _listen_tcp,
    UnixAddress: _listen_unix,
    FileAddress: _listen_file,
    ExecAddress: _listen_exec,
    FdAddress: _listen_fd,
}
