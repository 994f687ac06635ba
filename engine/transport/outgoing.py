"""The source side: an address to a connected channel (QEMU's
socket_start_outgoing_migration and its fd/exec/file siblings)."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
from typing import Any, Callable

from engine.errors import ChannelBrokenError
from engine.trace import trace
from engine.transport.addresses import (Address, ExecAddress, FdAddress, FileAddress,
                                        TcpAddress, UnixAddress, _as_address)
from engine.transport.channels import (EXEC_SHELL, Channel, _broken, _ExecChannel,
                                       _FdChannel, _reap, _SocketChannel, _unusable)

#: send buffer asked for on an outgoing unix-socket channel (see _connect_unix)
UNIX_SNDBUF = 4 << 20

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
    channel = _CONNECTORS[type(address)](address, timeout)
    trace("migration_channel_connect", channel=channel.name)
    return channel


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
    return open_file_channel(addr, os.O_WRONLY | os.O_CREAT)


def open_file_channel(addr: FileAddress, flags: int) -> Channel:
    """``file:PATH[,offset=N]`` opened with *flags* and positioned at its offset
    (the outgoing side writes there, the incoming side reads from there)."""
    try:
        fd = os.open(addr.path, flags | os.O_CLOEXEC, 0o600)
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


#: each takes the address of its key's type (Any: a dict cannot say which)
_CONNECTORS: dict[type, Callable[[Any, float | None], Channel]] = {
    TcpAddress: _connect_tcp,
    UnixAddress: _connect_unix,
    FileAddress: _connect_file,
    ExecAddress: _connect_exec,
    FdAddress: _connect_fd,
}


