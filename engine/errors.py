"""The exception hierarchy.

Every error the engine raises on purpose derives from :class:`EngineError`, and
each subclass says *who* is at fault, in the manner of h11 and Trio:

* :class:`ConfigError` - the caller asked for something invalid (a parameter out
  of range, a capability combination QEMU refuses, a bad URI).  Raised before
  anything starts, so nothing needs undoing.
* :class:`ProtocolError` - bytes on a channel do not follow QEMU's format.
  :class:`RemoteProtocolError` is the peer's fault (a malformed stream);
  :class:`LocalProtocolError` is ours (asked to encode something unencodable).
* :class:`ChannelError` - the transport itself: :class:`ChannelClosedError`
  when the peer ended the stream where a record was expected,
  :class:`ChannelBrokenError` when the OS reported a failure (``__cause__``
  holds the ``OSError``).
* :class:`StateError` - an illegal migration state transition.
* :class:`GuestError` - guest memory or vCPU trouble (shared memory missing,
  block lists that do not match).
* :class:`MigrationError` - a migration that ended in ``failed``; carries the
  error description QEMU would put in ``error-desc``.
* :class:`Terminated` - SIGTERM, raised in the main thread so that cleanup
  runs; a ``SystemExit``, not an :class:`EngineError`.

Every exception class of the engine is defined here (modules that raised one
of their own re-export it under its old name).  Exceptions still defined
elsewhere are listed in docs/ARCHITECTURE.md (Layers).
"""
from __future__ import annotations

from collections.abc import Iterable


class EngineError(Exception):
    """Base of every error the engine raises deliberately."""


class ConfigError(EngineError, ValueError):
    """An invalid request: bad parameter, capability, URI or option."""


class InvalidParameterError(ConfigError):
    """A parameter that does not exist (``value`` None), or a value refused."""

    def __init__(self, name: str, value: object, reason: str):
        self.name, self.value, self.reason = name, value, reason
        what = f"Parameter '{name}'" if value is None else f"Parameter '{name}' = {value!r}"
        super().__init__(f"{what}: {reason}")


class ParameterValueError(InvalidParameterError):
    """A parameter value of the wrong type or out of range.

    ``str()`` is QEMU's wording, ``Parameter 'NAME' expects WHAT``;
    ``reason`` is ``"expects WHAT"``.
    """

    def __init__(self, name: str, value: object, expects: str):
        super().__init__(name, value, f"expects {expects}")
        self.expects = expects
        self.args = (f"Parameter '{name}' expects {expects} (got {value!r})",)


class InvalidCapabilityError(ConfigError):
    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"Capability '{name}': {reason}")


class BadURIError(ConfigError):
    def __init__(self, uri: str, reason: str):
        self.uri, self.reason = uri, reason
        super().__init__(f"Invalid migration URI {uri!r}: {reason}")


class ProtocolError(EngineError):
    """Bytes that do not follow QEMU's migration format.

    ``offset`` is the byte offset in the channel where the problem starts
    (``None`` when not known), ``channel`` names the channel ("main",
    "multifd 2", "return path").
    """

    def __init__(self, message: str, offset: int | None = None,
                 channel: str | None = None):
        self.message, self.offset, self.channel = message, offset, channel
        where = []
        if channel is not None:
            where.append(f"channel {channel}")
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed."""


class NeedData(RemoteProtocolError):
    """The buffer ends before the element does.

    Raised by the stream parsers so that an incremental decoder can retry the
    element once more bytes arrived; anyone else sees it as a
    :class:`RemoteProtocolError` about truncated input.  ``what`` names the
    missing item, ``offset`` is where it starts in the buffer given.
    """

    offset: int     # always known here (a RemoteProtocolError's may be None)

    def __init__(self, what: str, offset: int, end: int | None = None):
        self.what = what
        #: buffer length that would at least let parsing get past this item
        self.end = offset + 1 if end is None else end
        super().__init__(f"truncated: expected {what}", offset=offset)


class LocalProtocolError(ProtocolError):
    """We were asked to produce something the format cannot express."""


class ChannelError(EngineError):
    """Transport-level failure."""


class ChannelClosedError(ChannelError):
    """The peer closed the channel (EOF) where more data was required."""


class ChannelBrokenError(ChannelError):
    """The OS reported a failure on the channel; see ``__cause__``."""


class ChannelTimeoutError(ChannelBrokenError):
    """A channel operation or an accept did not complete within its timeout."""


class StateError(EngineError):
    """An illegal migration state transition (or a command in a wrong state)."""

    def __init__(self, current: str, requested: str, role: str = ""):
        self.current, self.requested, self.role = current, requested, role
        who = f"{role} " if role else ""
        super().__init__(
            f"Illegal {who}migration state transition {current!r} -> {requested!r}")


class UnexpectedStateError(StateError):
    """A guarded command found the migration in a status it did not expect.

    Raised by ``MigrationState.expect`` (the ``migrate-continue`` style
    check).  ``current`` is the status found, ``requested`` the accepted
    statuses joined with ``|``.
    """

    def __init__(self, current: str, expected: Iterable[str], role: str = ""):
        names = "|".join(str(s) for s in expected)
        super().__init__(str(current), names, role)
        who = f"{role} " if role else ""
        self.args = (f"{who}migration not in expected state: "
                     f"it is {str(current)!r}, expected {names!r}",)


class GuestError(EngineError):
    """Guest RAM or vCPU trouble."""


class BlockMismatchError(GuestError):
    """The stream's RAM block list does not match the destination's blocks."""


class CodecError(EngineError):
    """A page codec failed to encode or decode."""


class XbzrleError(CodecError):
    """An XBZRLE encoding that does not decode into the page it patches."""


class MigrationError(EngineError):
    """The migration failed; ``str()`` is the error-desc."""


class MigrationCancelled(MigrationError):
    """The migration was cancelled (migrate_cancel, Ctrl-C)."""


class PostcopyError(MigrationError):
    """Postcopy cannot start or go on: no userfaultfd, a fault handler or
    vCPU that failed to register, a page that cannot be placed."""


class PostcopyPaused(MigrationError):
    """A channel broke during postcopy: both sides keep what they have and
    wait in postcopy-paused for a recovery (migrate-recover + resume)."""


class Terminated(SystemExit):
    """SIGTERM, turned into an exception so every ``finally`` still cleans up
    (a SystemExit, so that nothing catching EngineError or Exception stops it)."""

    code: int       # 128 + the signal number, as a shell reports it


class QMPError(EngineError):
    """A QMP command failed.

    ``error_class`` is one of QEMU's error classes, ``desc`` the human text
    (clients must not parse it).  A command handler raises it to answer with
    ``{"error": {"class", "desc"}}``; the client raises it for such an answer.
    """

    def __init__(self, error_class: str, desc: str):
        self.error_class, self.desc = error_class, desc
        super().__init__(f"{error_class}: {desc}")


class FaultSetupError(EngineError):
    """A vCPU could not carry out a faults request (postcopy's fault registration).

    ``code`` is the error code the vCPU reports (stage and errno, see
    ``engine.ram.faults.error_code``), ``reason`` the details; ``text`` is
    the code's description.
    """

    def __init__(self, code: int, text: str, reason: str = ""):
        self.code = code
        self.reason = reason
        super().__init__(f"{text}: {reason}" if reason else text)
