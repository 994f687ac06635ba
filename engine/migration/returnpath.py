"""The source's return-path reader (QEMU's source_return_path_thread, migration.c).

With a return path the destination writes messages back on the main
channel (a socket, so both directions): SHUT at the end, PONGs, page
requests in postcopy, its received bitmaps and RESUME_ACK in a recovery,
SWITCHOVER_ACK.  One :class:`ReturnPathReader` per channel reads them on a
thread of its own and dispatches each through a table
``{message type: (handler, states it is legal in)}`` given by its owner;
a message in a state it is not legal in, or of a type the table does not
know, is the destination's protocol error.

The reader owns the return path's outcome, written once by its thread and
read by anyone: :attr:`status` (SHUT's value), :attr:`error` (what ended
it otherwise) and :attr:`shut` (set when it ended either way, or when
:meth:`stop` asked it to).  :meth:`check` turns that outcome into the
exception the migration thread raises.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any

from engine.errors import (ChannelBrokenError, ChannelClosedError, EngineError,
                           MigrationError, RemoteProtocolError)
from engine.state import MigrationState, MigrationStatus as S
from engine.stream import returnpath as rp
from engine.stream.events import NEED_DATA
from engine.trace import trace
from engine.transport.seams import ByteChannel

__all__ = ["ReturnPathReader", "Handlers"]

#: {message type: (handler, the statuses it is legal in; None: any)}
Handlers = Mapping[type, tuple[Callable[[Any], None], Collection[S] | None]]

#: how long :meth:`ReturnPathReader.stop` waits for the thread (it may be
#: sending an urgent page on the preempt channel, which the caller shut down)
JOIN_SECONDS = 5.0


class ReturnPathReader:
    """Reads and dispatches one channel's return path until SHUT, an error or
    :meth:`stop`.  Handlers run on the reader's thread; one that raises
    :class:`~engine.errors.EngineError` ends the return path with that error.
    ``on_end`` is called (from the reader's thread) when it ends."""

    def __init__(self, channel: ByteChannel, state: MigrationState, handlers: Handlers,
                 on_end: Callable[[], None]):
        self.channel = channel
        self._state = state
        self._handlers = handlers
        self._on_end = on_end
        # -- written by the reader's thread only, once; read by anyone --
        #: SHUT's status; None until a SHUT came
        self.status: int | None = None
        #: what ended the return path other than a SHUT
        self.error: EngineError | None = None
        #: set once the return path is over (SHUT, error, or stop())
        self.shut = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="return-path", daemon=True)

    def start(self) -> None:
        trace("source_return_path_thread_entry", channel=self.channel.name)
        self._thread.start()

    # -- what the migration thread asks ---------------------------------------
    def failed(self) -> bool:
        """Whether the destination gave up (an error SHUT) or the path broke."""
        return self.error is not None or bool(self.status)

    def check(self, recovering: bool = False) -> None:
        """Raise what the return path's end means for the migration, if it
        ended badly: its error, or the destination's failure SHUT.  While
        ``recovering`` any end is a failure (the recovery needs the path)."""
        if self.error is not None:
            raise self.error
        if self.status:
            raise self.shut_error()
        if recovering and self.shut.is_set():
            raise ChannelClosedError(
                f"{self.channel.name}: the return path ended during recovery"
                + (f" (SHUT {self.status})" if self.status is not None else ""))

    def shut_error(self) -> MigrationError:
        return MigrationError(
            f"destination reported an error loading the stream (SHUT {self.status})")

    def stop(self) -> None:
        """End the reader: its channel is shut down (the caller's abort), and
        the thread joined within :data:`JOIN_SECONDS`."""
        self.shut.set()
        try:
            self.channel.shutdown()
        except Exception:       # noqa: BLE001 - already closed or broken: it ends either way
            pass
        if self._thread.ident is not None:
            self._thread.join(JOIN_SECONDS)

    # -- the thread -----------------------------------------------------------
    def _loop(self) -> None:
        channel, shut = self.channel, self.shut
        decoder = rp.ReturnPathDecoder()
        buf = bytearray(1 << 16)
        last_block: str | None = None       # REQ_PAGES names no block
        try:
            while not shut.is_set():
                n = channel.recv_into(buf)
                if n == 0:
                    if not shut.is_set() and self._state.status is not S.COMPLETED:
                        raise ChannelClosedError(
                            f"{channel.name}: the destination closed the return path")
                    return
                decoder.feed(memoryview(buf)[:n])
                while True:
                    ev = decoder.next_event()
                    if ev is NEED_DATA:
                        break
                    kind = type(ev)
                    if kind is rp.Shut:
                        trace("source_return_path_thread_shut", value=ev.status)
                        self.status = ev.status
                        shut.set()
                        return
                    if kind is rp.ReqPages:
                        # The short form continues the previous request's block.
                        if ev.block is None:
                            ev = rp.ReqPages(ev.start, ev.length, last_block)
                        else:
                            last_block = ev.block
                    entry = self._handlers.get(kind)
                    if entry is None:
                        raise RemoteProtocolError(
                            f"unexpected return-path message {kind.__name__}",
                            channel="return path")
                    handler, states = entry
                    if states is not None and self._state.status not in states:
                        raise RemoteProtocolError(
                            f"return-path message {kind.__name__} in "
                            f"{self._state.status.value}", channel="return path")
                    handler(ev)
        except (EngineError, OSError) as exc:
            if not shut.is_set():
                self.error = exc if isinstance(exc, EngineError) else \
                    ChannelBrokenError(f"return path: {exc}")
                trace("source_return_path_thread_bad_end", error=self.error)
                shut.set()
        finally:
            trace("source_return_path_thread_end", status=self.status)
            self._on_end()
