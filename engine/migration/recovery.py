"""The destination's wait in postcopy-paused (QEMU's postcopy_pause_incoming).

A channel that breaks once the guest runs here pauses postcopy: neither
side has the whole guest.  The destination then waits for QMP
``migrate-recover URI`` to listen for the source's new main channel
(QEMU's ``migrate_incoming_recover``) and for the resumed source to
connect there.  :class:`RecoveryWait` is that wait: bounded by a timeout
when one is given (a destination nobody can send migrate-recover to gives
up, saying it was paused), cancellable by :meth:`RecoveryWait.close` from
any thread, and checking the fault handler while it waits.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable

from engine.errors import ChannelError, MigrationError, PostcopyPaused
from engine.transport import ChannelTimeoutError

if TYPE_CHECKING:
    from engine.transport import Channel, Listener

__all__ = ["RecoveryWait"]


class RecoveryWait:
    """The listener of a recovery and the wait for its channel.

    ``timeout`` (seconds, None: until :meth:`close`) bounds each pause.
    """

    def __init__(self, timeout: float | None = None):
        self.timeout = timeout
        #: the listener migrate-recover opened (the preempt channel of a
        #: resumed postcopy-preempt source connects there too)
        self.listener: Listener | None = None
        self._ready = threading.Event()
        self._closing = threading.Event()

    def recover(self, uri: str) -> str:
        """Listen on ``uri``; returns the address listened on (a tcp port 0
        resolved).  A second call replaces the first listener."""
        from engine.transport import listen, parse_uri
        old, self.listener = self.listener, listen(parse_uri(uri))
        if old is not None:
            old.close()
        self._ready.set()
        return self.listener.uri

    def accept(self, cause: BaseException, check: Callable[[], None]) -> Channel:
        """The resumed source's new main channel.  ``cause`` is why postcopy
        paused (for the message when the wait gives up); ``check`` raises if
        something the destination depends on died meanwhile."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            if self._closing.is_set():
                raise MigrationError("destination closed while postcopy was paused")
            if deadline is not None and time.monotonic() >= deadline:
                waited = f"within {self.timeout:g} s" if self.timeout else "possible here"
                raise PostcopyPaused(
                    f"postcopy-paused: {cause}; no recovery (migrate-recover) {waited}, "
                    f"giving up: the guest's memory is split between source and "
                    f"destination")
            check()
            if not self._ready.wait(0.1):
                continue
            listener = self.listener
            if listener is None:        # closed meanwhile: the next turn says so
                continue
            try:
                return listener.accept(timeout=0.2)
            except ChannelTimeoutError:
                continue
            except ChannelError:
                if self._closing.is_set() or listener is not self.listener:
                    continue
                raise

    def close(self) -> None:
        """End any wait and close the listener (idempotent, any thread)."""
        self._closing.set()
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
