"""QEMU's yank for the multifd channels, whose sockets live in worker processes.

QEMU's yank of the ``migration`` instance calls ``qio_channel_shutdown`` on
every migration channel (migration/yank_functions.c): the sockets stay
open, and whoever uses one next gets an error, as on a dead network.  The
engine's multifd channels are sockets of its worker processes (the source's
connect them, the destination's get them passed after the accept), so the
monitor reaches them with ``pidfd_getfd(2)``: a duplicate of the worker's
descriptor names the same socket, and ``shutdown(2)`` on it is a shutdown of
the worker's socket.  The worker's next send or receive fails and it
reports that over its control socket, which is left alone, as any channel
error.

Which descriptor is the channel: a connected stream socket that is TCP, or
a Unix one whose own or peer name is the migration's socket path (a worker's
other sockets, its zmq control connection and the destination's descriptor
passing pair, have other names or none).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
from typing import Callable

__all__ = ["channel_matcher", "shutdown_process_sockets"]

#: pidfd_getfd's number; new system calls have one number on every
#: architecture since Linux 5.1
_SYS_PIDFD_GETFD = 438


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    got = libc.syscall(ctypes.c_long(_SYS_PIDFD_GETFD), ctypes.c_int(pidfd),
                       ctypes.c_int(fd), ctypes.c_uint(0))
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(got)


def channel_matcher(unix_path: str | None) -> Callable[[socket.socket], bool]:
    """A test for "this socket is a migration channel": TCP stream sockets,
    and Unix stream sockets named ``unix_path`` (ours or the peer's)."""
    wanted = os.path.abspath(unix_path) if unix_path else None

    def is_channel(sock: socket.socket) -> bool:
        if sock.type != socket.SOCK_STREAM:
            return False
        try:
            peer = sock.getpeername()
        except OSError:
            return False        # not connected: a listener, or nothing yet
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return True
        if sock.family != socket.AF_UNIX or wanted is None:
            return False
        return any(isinstance(n, str) and n and os.path.abspath(n) == wanted
                   for n in (sock.getsockname(), peer))

    return is_channel


def shutdown_process_sockets(pid: int, is_channel: Callable[[socket.socket], bool]) -> int:
    """Shut down (both directions) every socket of process ``pid`` that
    ``is_channel`` picks; how many.  Raises ``OSError`` when the process's
    descriptors cannot be reached at all (no pidfd_getfd, not permitted);
    a process that is gone has no socket left: 0."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0
    done = 0
    try:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            return 0
        for name in fds:
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
                dup = _pidfd_getfd(pidfd, int(name))
            except FileNotFoundError:
                continue        # closed meanwhile
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.ESRCH):
                    continue    # closed meanwhile, or the process ended
                raise
            try:
                sock = socket.socket(fileno=dup)
            except OSError:
                os.close(dup)
                continue
            with sock:      # closes our duplicate only
                if is_channel(sock):
                    with contextlib.suppress(OSError):      # ENOTCONN: ended already
                        sock.shutdown(socket.SHUT_RDWR)
                    done += 1
    finally:
        os.close(pidfd)
    return done
