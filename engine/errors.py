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


class LocalProtocolError(ProtocolError):
    """We were asked to produce something the format cannot express."""


class ChannelError(EngineError):
    """Transport-level failure."""


class ChannelClosedError(ChannelError):
    """The peer closed the channel (EOF) where more data was required."""


class ChannelBrokenError(ChannelError):
    """The OS reported a failure on the channel; see ``__cause__``."""


class StateError(EngineError):
    """An illegal migration state transition (or a command in a wrong state)."""

    def __init__(self, current: str, requested: str, role: str = ""):
        self.current, self.requested, self.role = current, requested, role
        who = f"{role} " if role else ""
        super().__init__(
            f"Illegal {who}migration state transition {current!r} -> {requested!r}")


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
