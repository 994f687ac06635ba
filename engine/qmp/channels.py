"""QEMU's ``channels`` argument of ``migrate`` and ``migrate-incoming``.

Since QEMU 8.2 both commands take, instead of ``uri``, a list of
MigrationChannel (qapi/migration.json)::

    {"channel-type": "main",
     "addr": {"transport": "socket", "type": "inet", "host": "10.0.0.1", "port": "4446"}}

``addr`` is a MigrationAddress, a flat union on ``transport``: ``socket``
(QEMU's SocketAddress, itself a flat union on ``type``: ``inet``, ``unix``,
``vsock``, ``fd``), ``exec`` (``args``, an argv), ``rdma`` (``host``,
``port``) or ``file`` (``filename``, ``offset``).  :data:`MIGRATION_CHANNEL`
checks one with QEMU's schema texts; :func:`migration_uri` applies QEMU's
rules on ``uri`` versus ``channels`` (migration/migration.c, QEMU 10.2) and
turns the main channel's address into the URI the engine's transports take
(:func:`engine.transport.parse_uri`), so everything after the command sees
a URI whichever way it was given.
"""
from __future__ import annotations

import shlex
from typing import Any, Mapping, Sequence

from engine.errors import BadURIError
from engine.qmp.errors import ERROR_CLASS_GENERIC, QMPError
from engine.qmp.schema import BOOL, INT, STR, Arg, Enum, ListOf, Struct, Union
from engine.transport import EXEC_SHELL, parse_uri

__all__ = ["MIGRATION_CHANNEL", "NEED_URI_OR_CHANNELS", "migration_uri", "address_uri"]

#: QEMU's text when both or neither of ``uri`` and ``channels`` are given
NEED_URI_OR_CHANNELS = "need either 'uri' or 'channels' argument"

# InetSocketAddress as QEMU 10.1 has it (keep-alive-* are 10.1's); the
# engine's TCP transport honours host and port only.
_INET_OPTIONS = (
    Arg("numeric", BOOL, True), Arg("to", INT, True), Arg("ipv4", BOOL, True),
    Arg("ipv6", BOOL, True), Arg("keep-alive", BOOL, True),
    Arg("keep-alive-count", INT, True), Arg("keep-alive-idle", INT, True),
    Arg("keep-alive-interval", INT, True), Arg("mptcp", BOOL, True),
)
_INET = Struct((Arg("host", STR), Arg("port", STR), *_INET_OPTIONS))
_UNIX = Struct((Arg("path", STR), Arg("abstract", BOOL, True), Arg("tight", BOOL, True)))
_VSOCK = Struct((Arg("cid", STR), Arg("port", STR)))
_FD = Struct((Arg("str", STR),))

SOCKET_ADDRESS = Union((Arg("type", Enum(("inet", "unix", "vsock", "fd"))),), "type",
                       {"inet": _INET, "unix": _UNIX, "vsock": _VSOCK, "fd": _FD})
MIGRATION_ADDRESS = Union(
    (Arg("transport", Enum(("socket", "exec", "rdma", "file"))),), "transport",
    {"socket": SOCKET_ADDRESS,
     "exec": Struct((Arg("args", ListOf(STR)),)),
     "rdma": _INET,
     "file": Struct((Arg("filename", STR), Arg("offset", INT)))})
MIGRATION_CHANNEL = Struct((Arg("channel-type", Enum(("main", "cpr"))),
                            Arg("addr", MIGRATION_ADDRESS)))
"""QEMU's MigrationChannel; ``channel-type`` knows ``cpr`` since QEMU 10.0."""


def _error(desc: str) -> QMPError:
    return QMPError(ERROR_CLASS_GENERIC, desc)


def _host_port(addr: Mapping[str, Any]) -> str:
    host = addr["host"]
    return f"[{host}]:{addr['port']}" if ":" in host else f"{host}:{addr['port']}"


def _refuse_options(addr: Mapping[str, Any]) -> None:
    given = [a.name for a in _INET_OPTIONS if a.name in addr]
    if given:
        raise _error(f"socket options ({', '.join(given)}) are not supported by this engine")


def address_uri(addr: Mapping[str, Any]) -> str:
    """The engine URI for a checked MigrationAddress.

    Transports the engine does not speak (rdma, vsock) become their URI
    form, which :func:`~engine.transport.parse_uri` refuses with the
    engine's usual reason.
    """
    transport = addr["transport"]
    if transport == "socket":
        kind = addr["type"]
        if kind == "inet":
            _refuse_options(addr)
            return f"tcp:{_host_port(addr)}"
        if kind == "unix":
            if addr.get("abstract"):
                raise _error("abstract unix sockets are not supported by this engine")
            return f"unix:{addr['path']}"
        if kind == "vsock":
            return f"vsock:{addr['cid']}:{addr['port']}"
        return f"fd:{addr['str']}"
    if transport == "exec":
        args = addr["args"]
        if not args:
            raise _error("an exec channel needs a command: 'args' is empty")
        # QEMU runs the argv itself; the engine runs "/bin/sh -c CMD", so the
        # argv is quoted for the shell (what QEMU makes of "exec:CMD" is
        # given back as CMD unchanged).
        if len(args) == 3 and args[:2] == [EXEC_SHELL, "-c"]:
            return f"exec:{args[2]}"
        return f"exec:{shlex.join(args)}"
    if transport == "rdma":
        _refuse_options(addr)
        return f"rdma:{_host_port(addr)}"
    if ",offset=" in addr["filename"]:
        # The URI form would end the path there.
        raise _error(f"a file name with ',offset=' in it is not supported: "
                     f"{addr['filename']!r}")
    offset = addr["offset"]
    return f"file:{addr['filename']},offset={offset}" if offset else f"file:{addr['filename']}"


def _main_channel(command: str, channels: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    if command == "migrate-incoming":
        # QEMU 10.2's qemu_start_incoming_migration takes one channel and
        # does not look at its type.
        if len(channels) > 1:
            raise _error("Channel list must have only one entry, for type 'main'")
    else:
        seen: set[str] = set()
        for ch in channels:
            kind = ch["channel-type"]
            if kind in seen:
                raise _error(f"Channel list has more than one {kind} entry")
            seen.add(kind)
    for ch in channels:
        if ch["channel-type"] == "cpr":
            # QEMU ignores a cpr channel outside migration mode cpr-transfer;
            # the engine has no cpr-transfer mode, so the channel could only
            # be a mistake.
            raise _error("a 'cpr' channel is for migration mode cpr-transfer, which this "
                         "engine does not have (its only mode is 'normal'): give one "
                         "channel, of type 'main'")
    main = [ch for ch in channels if ch["channel-type"] == "main"]
    if not main:
        raise _error("Channel list has no main entry")
    return main[0]


def migration_uri(command: str, uri: str | None,
                  channels: Sequence[Mapping[str, Any]] | None) -> str:
    """The URI to migrate over, from a command's checked ``uri`` / ``channels``.

    Exactly one must be given (an empty list counts as none: QAPI makes it
    NULL, and QEMU tests the pointer).  The URI is parsed here so that a bad
    channel is the command's error, named as the channel was written.
    """
    if (uri is None) == (not channels):
        raise _error(NEED_URI_OR_CHANNELS)
    if uri is not None:
        return uri
    assert channels     # exactly one of the two was given (checked above)
    addr = _main_channel(command, channels)["addr"]
    converted = address_uri(addr)
    try:
        parse_uri(converted)
    except BadURIError as exc:
        raise _error(f"Invalid migration channel (as the URI {converted!r}): "
                     f"{exc.reason}") from None
    return converted
