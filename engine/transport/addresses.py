"""Migration URIs and the frozen addresses they parse to (QEMU's socket.c,
fd.c, exec.c and file.c each parse their own; here :func:`parse_uri` does)."""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from typing import Callable, Union

from engine.errors import BadURIError
from engine.options import parse_size

#: Longest ``sun_path`` a Unix socket can bind to, in bytes (108 minus the NUL).
UNIX_PATH_MAX = 107

_OFF_T_MAX = 2**63 - 1



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

