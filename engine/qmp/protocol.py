"""QMP, server side, without I/O (in the manner of h11).

A :class:`ServerConnection` is one client's session.  The caller moves
bytes; the connection says what they mean and what to answer:

* :meth:`ServerConnection.greeting` - the first thing to send::

      {"QMP": {"version": {"qemu": {...}, "package": "engine 0.1.0"},
               "capabilities": ["oob"]}}

* :meth:`~ServerConnection.receive_data` takes bytes (``b""`` for EOF) and
  :meth:`~ServerConnection.next_event` returns, one per JSON value received:

  - :class:`Request` - a command to run; answer it with
    :meth:`~ServerConnection.send_return` or :meth:`~ServerConnection.send_error`;
  - :class:`Reply` - an answer the connection composed itself (capabilities
    negotiation, malformed input), to be sent in its turn;
  - :class:`Closed` once, after EOF; or :data:`NEED_DATA`.

* :meth:`~ServerConnection.send_event` frames an :class:`Event` (``b""``
  before negotiation ends: QEMU sends events only to negotiated clients).

What QEMU does and this copies (monitor/qmp.c, qapi/qmp-dispatch.c):

* Input is a stream of JSON values, back to back, newlines optional.
  Every value must be an object with ``execute`` (or ``exec-oob``), and
  optionally ``arguments`` (an object) and ``id`` (any JSON value, echoed
  in the answer).  Each violation has QEMU's text, e.g. ``QMP input member
  'foo' is unexpected``.
* Until ``qmp_capabilities`` succeeds every other command is refused with
  ``CommandNotFound`` / ``Expecting capabilities negotiation with
  'qmp_capabilities'``; afterwards ``qmp_capabilities`` itself is refused.
  ``enable: ["oob"]`` turns on out-of-band execution.
* ``exec-oob`` is a valid member only once OOB is on.  Whether a command
  may run out of band is the dispatcher's business (QEMU's ``allow-oob``);
  an OOB request (or an error about one) skips the in-band queue:
  :attr:`Request.oob` and :attr:`Reply.oob` say so.
* Every message goes out as one line of JSON ending ``\\r\\n``, non-ASCII
  escaped, as QEMU's monitor writes it.
"""
from __future__ import annotations

import enum
import importlib.metadata
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from engine.qmp.errors import (ERROR_CLASS_COMMAND_NOT_FOUND, ERROR_CLASS_GENERIC,
                               QMPError)
from engine.qmp.schema import Arg, Enum, ListOf, check_arguments

__all__ = [
    "NEED_DATA", "NO_ID", "Request", "Reply", "Closed", "Event", "ServerConnection",
    "JsonSplitter", "FramingError", "default_version", "QMP_CAPABILITIES",
    "MAX_MESSAGE_BYTES", "MAX_NESTING", "encode_message", "decode_value",
]

#: QMP capabilities QEMU knows (QMPCapability); a server offers a subset.
QMP_CAPABILITIES = ("oob",)
#: QEMU's json-streamer limits (MAX_TOKEN_SIZE, MAX_NESTING in
#: qobject/json-streamer.c): a value larger or deeper is refused.
MAX_MESSAGE_BYTES = 64 << 20
MAX_NESTING = 1024
#: The QEMU release whose QMP this engine speaks (its migration stream
#: speaks 7.2's dialect too, per machine profile).
QEMU_VERSION = {"major": 10, "minor": 2, "micro": 0}


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: :meth:`ServerConnection.next_event`: nothing complete yet.
NEED_DATA = _Sentinel("NEED_DATA")
#: :attr:`Request.id` of a request that had no ``id`` member (``None`` is a
#: valid id: JSON ``null``, echoed as such).
NO_ID = _Sentinel("NO_ID")


def default_version() -> dict:
    """The greeting's ``version``: QEMU's shape, this engine in ``package``."""
    try:
        ours = importlib.metadata.version("engine")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown"
    return {"qemu": dict(QEMU_VERSION), "package": f"engine {ours}"}


def encode_message(obj: Mapping[str, Any]) -> bytes:
    """One QMP message on the wire: compact JSON (QEMU's spacing), CRLF."""
    return json.dumps(obj).encode("ascii") + b"\r\n"


# -- events -------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    """A QMP event.  ``seconds``/``microseconds`` are wall-clock time since the
    epoch (QEMU's ``g_get_real_time``); ``data`` is ``None`` for events
    without members (STOP, RESUME), which then carry no ``data`` at all."""
    name: str
    data: Mapping[str, Any] | None = None
    seconds: int = 0
    microseconds: int = 0

    @classmethod
    def now(cls, name: str, data: Mapping[str, Any] | None = None,
            clock: Callable[[], int] = time.time_ns) -> "Event":
        """The event stamped with ``clock()`` (nanoseconds since the epoch)."""
        us = clock() // 1000
        return cls(name, data, us // 1_000_000, us % 1_000_000)

    def to_qmp(self) -> dict[str, Any]:
        out: dict[str, Any] = {"timestamp": {"seconds": self.seconds,
                                             "microseconds": self.microseconds},
                               "event": self.name}
        if self.data is not None:
            out["data"] = dict(self.data)
        return out


# -- what next_event() returns ----------------------------------------------------

@dataclass(frozen=True)
class Request:
    """A well-formed command from a negotiated client.

    ``id`` is the request's ``id`` member, or :data:`NO_ID`; ``oob`` is true
    for ``exec-oob`` (run it at once, not after the queued in-band ones).
    """
    command: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: Any = NO_ID
    oob: bool = False


@dataclass(frozen=True)
class Reply:
    """Bytes the connection composed itself, to be sent in order (or at once
    when ``oob``)."""
    data: bytes
    oob: bool = False


@dataclass(frozen=True)
class Closed:
    """The client closed its end (EOF)."""


# -- framing -----------------------------------------------------------------------

@dataclass(frozen=True)
class FramingError:
    """A value that broke a limit; ``desc`` is QEMU's text for it.  Not an
    exception: :meth:`JsonSplitter.next` returns it in the value's place."""
    desc: str


NESTING_LIMIT_DESC = "JSON nesting depth limit exceeded"


def decode_value(raw: bytes) -> Any:
    """One framed value (from :class:`JsonSplitter`) as Python objects, or a
    :class:`FramingError` if it is nested too deep to parse here; raises
    ValueError for bad JSON.

    Python's parser recurses once per bracket and stops at the interpreter's
    recursion limit (1000 frames, less what the calling thread already
    uses), a little below QEMU's :data:`MAX_NESTING` of 1024 that the
    splitter enforces.  A value in between gets the answer QEMU gives one
    beyond its limit, rather than a RecursionError ending the thread that
    reads the monitor.
    """
    try:
        return json.loads(raw)
    except RecursionError:
        return FramingError(NESTING_LIMIT_DESC)


class _Kind(enum.Enum):
    COMPOSITE = 1       # object or array: ends at its matching bracket
    STRING = 2          # top-level string: ends at its closing quote
    SCALAR = 3          # top-level number or keyword: ends at a delimiter


_OUTSIDE_STRING = re.compile(rb'["{}\[\]]')
_INSIDE_STRING = re.compile(rb'["\\]')
_SCALAR_END = re.compile(rb'[\s{}\[\]",:]')
_NOT_SPACE = re.compile(rb"\S")


class JsonSplitter:
    """Cuts a byte stream into JSON values without parsing them.

    Like QEMU's json-streamer it counts brackets outside strings, so values
    may follow each other with or without whitespace between them and may
    arrive in any number of pieces.  :meth:`next` returns one value's bytes,
    a :class:`FramingError` (too large or too deep: the partial value is
    dropped), or ``None`` when it needs more data.  The scan resumes where
    it stopped, so a value arriving byte by byte costs linear time.
    """

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_NESTING):
        self.max_bytes, self.max_depth = max_bytes, max_depth
        self._buf = bytearray()
        self._eof = False
        self._reset()

    def _reset(self) -> None:
        self._start = -1            # where the current value starts; -1: between values
        self._pos = 0               # where scanning resumes
        self._depth = 0
        self._in_string = False
        self._kind: _Kind | None = None

    def feed(self, data: bytes) -> None:
        self._buf += data

    def feed_eof(self) -> None:
        self._eof = True

    def next(self) -> bytes | FramingError | None:
        buf = self._buf
        if self._start < 0:
            m = _NOT_SPACE.search(buf)
            if m is None:
                buf.clear()
                return None
            del buf[:m.start()]
            self._start, self._pos = 0, 1
            first = buf[0:1]
            if first in (b"{", b"["):
                self._kind, self._depth = _Kind.COMPOSITE, 1
            elif first == b'"':
                self._kind, self._in_string = _Kind.STRING, True
            elif first in (b"}", b"]"):
                # A stray closer: a value of its own, for the parser to refuse.
                return self._take(1)
            else:
                self._kind = _Kind.SCALAR
        end = self._scan()
        if isinstance(end, FramingError):
            buf.clear()
            self._reset()
            return end
        if end is not None:
            return self._take(end)
        if self._eof and self._kind is _Kind.SCALAR:
            return self._take(len(buf))
        if len(buf) > self.max_bytes:
            buf.clear()
            self._reset()
            return FramingError("JSON token size limit exceeded")
        return None

    def _take(self, end: int) -> bytes:
        value = bytes(self._buf[:end])
        del self._buf[:end]
        self._reset()
        return value

    def _scan(self) -> int | FramingError | None:
        """End offset of the current value, or None if it is incomplete."""
        buf, pos = self._buf, self._pos
        if self._kind is _Kind.SCALAR:
            m = _SCALAR_END.search(buf, pos)
            self._pos = len(buf)
            return m.start() if m else None
        while True:
            if self._in_string:
                m = _INSIDE_STRING.search(buf, pos)
                if m is None:
                    self._pos = len(buf)
                    return None
                pos = m.end()
                if m.group() == b"\\":
                    if pos >= len(buf):         # the escaped byte has not arrived
                        self._pos = pos - 1
                        return None
                    pos += 1
                    continue
                self._in_string = False
                if self._kind is _Kind.STRING:
                    return pos
                continue
            m = _OUTSIDE_STRING.search(buf, pos)
            if m is None:
                self._pos = len(buf)
                return None
            pos = m.end()
            c = m.group()
            if c == b'"':
                self._in_string = True
            elif c in (b"{", b"["):
                self._depth += 1
                if self._depth > self.max_depth:
                    return FramingError(NESTING_LIMIT_DESC)
            else:
                self._depth -= 1
                if self._depth == 0:
                    return pos


# -- the connection ------------------------------------------------------------------

class _State(enum.Enum):
    NEGOTIATING = "negotiating"     # QEMU's capabilities negotiation mode
    COMMAND = "command"             # command mode


_QMP_CAPABILITIES_ARGS = (Arg("enable", ListOf(Enum(QMP_CAPABILITIES)), optional=True),)


class ServerConnection:
    """One client's QMP session, server side (no I/O; see the module doc).

    ``version`` is the greeting's version object (default:
    :func:`default_version`); ``offer_oob`` whether the ``oob`` capability
    is offered.
    """

    def __init__(self, version: Mapping[str, Any] | None = None, *, offer_oob: bool = True,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.version = dict(version) if version is not None else default_version()
        self.offered = ("oob",) if offer_oob else ()
        self.oob_enabled = False
        self._state = _State.NEGOTIATING
        self._splitter = JsonSplitter(max_message_bytes)
        self._eof = False
        self._closed = False        # EOF reported: nothing more comes in

    @property
    def negotiated(self) -> bool:
        """Whether capabilities negotiation has completed (command mode)."""
        return self._state is _State.COMMAND

    @property
    def closed(self) -> bool:
        """Whether the client's EOF has been reported (answers and events may
        still be sent: a half-closed client can read)."""
        return self._closed

    def greeting(self) -> bytes:
        return encode_message({"QMP": {"version": self.version,
                                       "capabilities": list(self.offered)}})

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` means it closed its end."""
        if not data:
            self._eof = True
            self._splitter.feed_eof()
        else:
            self._splitter.feed(data)

    def next_event(self) -> Request | Reply | Closed | _Sentinel:
        if self._closed:
            return NEED_DATA
        raw = self._splitter.next()
        if raw is None:
            if self._eof:
                self._closed = True
                return Closed()
            return NEED_DATA
        if isinstance(raw, FramingError):
            return Reply(self._error(NO_ID, ERROR_CLASS_GENERIC, raw.desc))
        try:
            obj = decode_value(raw)
        except ValueError as exc:       # JSONDecodeError and bad UTF-8 alike
            msg = getattr(exc, "msg", None) or str(exc)
            return Reply(self._error(NO_ID, ERROR_CLASS_GENERIC,
                                     f"JSON parse error, {msg[:1].lower()}{msg[1:]}"))
        if isinstance(obj, FramingError):
            return Reply(self._error(NO_ID, ERROR_CLASS_GENERIC, obj.desc))
        return self._request(obj)

    def _request(self, obj: Any) -> Request | Reply:
        if not isinstance(obj, dict):
            return Reply(self._error(NO_ID, ERROR_CLASS_GENERIC,
                                     "QMP input must be a JSON object"))
        rid = obj.get("id", NO_ID)
        # QEMU answers anything that looks out-of-band at once, even an error.
        oob = "exec-oob" in obj and "execute" not in obj
        problem = self._check_envelope(obj)
        if problem is not None:
            return Reply(self._error(rid, ERROR_CLASS_GENERIC, problem), oob)
        command = obj["execute"] if "execute" in obj else obj["exec-oob"]
        arguments = obj.get("arguments", {})
        if self._state is _State.NEGOTIATING:
            if command != "qmp_capabilities":
                return Reply(self._error(rid, ERROR_CLASS_COMMAND_NOT_FOUND,
                                         "Expecting capabilities negotiation with "
                                         "'qmp_capabilities'"), oob)
            return self._negotiate(arguments, rid, oob)
        if command == "qmp_capabilities":
            return Reply(self._error(rid, ERROR_CLASS_COMMAND_NOT_FOUND,
                                     "Capabilities negotiation is already complete, "
                                     "command ignored"), oob)
        return Request(command, arguments, rid, oob)

    def _check_envelope(self, obj: dict) -> str | None:
        """QEMU's qmp_dispatch_check_obj: the members a request may have."""
        exec_key = None
        for key, value in obj.items():
            if key == "execute" or (key == "exec-oob" and self.oob_enabled):
                if not isinstance(value, str):
                    return f"QMP input member '{key}' must be a string"
                if exec_key is not None:
                    return f"QMP input member '{key}' clashes with '{exec_key}'"
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    return "QMP input member 'arguments' must be an object"
            elif key != "id":
                return f"QMP input member '{key}' is unexpected"
        if exec_key is None:
            return "QMP input lacks member 'execute'"
        return None

    def _negotiate(self, arguments: Mapping[str, Any], rid: Any, oob: bool) -> Reply:
        try:
            args = check_arguments(_QMP_CAPABILITIES_ARGS, arguments)
        except QMPError as exc:
            return Reply(self._error(rid, exc.error_class, exc.desc), oob)
        enable = args.get("enable", [])
        for cap in enable:
            if cap not in self.offered:
                return Reply(self._error(rid, ERROR_CLASS_GENERIC,
                                         f"Capability '{cap}' not available"), oob)
        self.oob_enabled = "oob" in enable
        self._state = _State.COMMAND
        return Reply(self._return(rid, {}), oob)

    # -- answers -----------------------------------------------------------------
    @staticmethod
    def _answer(rid: Any, msg: dict[str, Any]) -> bytes:
        if rid is NO_ID:
            return encode_message(msg)
        try:
            return encode_message({**msg, "id": rid})
        except RecursionError:
            # An id nested deeper than Python can encode (the parser took
            # it a few frames up): refuse the request rather than lose the
            # thread, without the id that cannot be echoed.
            return encode_message({"error": {"class": ERROR_CLASS_GENERIC,
                                             "desc": NESTING_LIMIT_DESC}})

    @classmethod
    def _return(cls, rid: Any, value: Any) -> bytes:
        return cls._answer(rid, {"return": value})

    @classmethod
    def _error(cls, rid: Any, error_class: str, desc: str) -> bytes:
        return cls._answer(rid, {"error": {"class": error_class, "desc": desc}})

    def send_return(self, request: Request, value: Any) -> bytes:
        """The success answer to ``request`` (``value`` must be JSON-able)."""
        return self._return(request.id, value)

    def send_error(self, request: Request, error_class: str, desc: str) -> bytes:
        """The error answer to ``request``."""
        return self._error(request.id, error_class, desc)

    def send_event(self, event: Event) -> bytes:
        """``event`` framed for this client; ``b""`` until it has negotiated."""
        if self._state is not _State.COMMAND:
            return b""
        return encode_message(event.to_qmp())
