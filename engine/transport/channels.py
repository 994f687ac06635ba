"""Connected byte channels (QEMU's QIOChannel kinds): a socket, a pipe or file,
an exec'd command's pipe, each with an abort (:meth:`Channel.shutdown`, QEMU's
qemu_file_shutdown) that another thread may call.  Every ``OSError`` leaves as a
:class:`~engine.errors.ChannelBrokenError` naming the channel."""
from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import stat
import subprocess
import threading
import weakref
from collections.abc import Sequence
from typing import Callable

from engine.errors import ChannelBrokenError, ChannelClosedError, ChannelTimeoutError
from engine.trace import trace

#: Most buffers one ``sendmsg``/``writev`` takes (Linux: 1024).
IOV_MAX: int = os.sysconf("SC_IOV_MAX")

#: The shell QEMU runs ``exec:`` commands with.
EXEC_SHELL = "/bin/sh"

#: Seconds a closed exec channel waits for its command to finish on its own before
#: it is sent SIGTERM (after an abort the command gets no such grace).
EXEC_EXIT_GRACE = 10.0

#: Seconds between SIGTERM and SIGKILL for a command that has to be stopped.
EXEC_KILL_GRACE = 1.0


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
        trace("qio_channel_shutdown", channel=self.name, how=how)
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
        trace("qio_channel_shutdown", channel=self.name)
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


