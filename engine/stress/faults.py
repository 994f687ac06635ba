"""Fault injection: a relay on the main channel, and the trigger that fires.

:class:`Relay` sits between the source and the destination on the main
channel (both directions: the return path comes back through it).  It can
*cut* the connection (a network failure) or *corrupt* the stream.  To
corrupt it follows the stream with the sans-I/O decoder and holds back the
bytes of an element until the element is complete, so it knows where each
record starts when it flips a byte:

* ``structure`` flips a record's flags byte (RAM records) or a section's
  type byte: something the destination must reject, as QEMU's would;
* ``payload`` flips a byte inside a page's data.  QEMU's format carries no
  checksum, so nothing on the wire can notice: only the verification after
  the migration can.  It exists to prove that the verification does.

:class:`Trigger` decides when a case's fault fires: on entering a status
(``setup``, ``pre-switchover``, ``device``), or once a fraction of the
phase's pages has been sent.  It is poked from the migration thread itself
(after each send on the main channel, after each multifd acknowledgement)
as well as by the runner, so a fault cannot miss its moment however fast
the migration goes.
"""
from __future__ import annotations

import contextlib
import select
import socket
import threading
from typing import Callable

from engine.errors import EngineError, RemoteProtocolError
from engine.state import MigrationStatus as S
from engine.stream import events as ev
from engine.stream.constants import TARGET_PAGE_SIZE
from engine.stream.decoder import StreamDecoder
from engine.stress.matrix import STATUS_MOMENTS, Fault
from engine.transport import ChannelTimeoutError, connect, listen, socket_of

#: bytes per relay read
RELAY_CHUNK = 1 << 16
#: records whose first bytes the destination must validate (see the module doc)
_RAM_RECORDS = (ev.RamPage, ev.RamZero, ev.RamEOS)
_SECTION_HEADERS = (ev.SectionPart, ev.SectionEnd)
#: how often the relay looks at its stop flag (seconds)
POLL_SECONDS = 0.05


class Relay:
    """A relay for one connection (the main channel) from ``listen_uri`` to
    ``upstream_uri``.  ``lookup`` (a machine profile's vmsd lookup) lets it
    follow the stream, which :meth:`arm` needs."""

    def __init__(self, listen_uri: str, upstream_uri: str, lookup=None,
                 page_size: int = TARGET_PAGE_SIZE):
        self._listener = listen(listen_uri)
        self.uri = self._listener.uri
        self.upstream = upstream_uri
        self.page_size = page_size
        self._decoder = StreamDecoder(lookup, page_size=page_size, channel="relay") \
            if lookup is not None else None
        self._pending = bytearray()     # held back: an element not complete yet
        self._forwarded = 0             # stream offset of _pending[0]
        self._mode: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self.cut_done = False
        #: stream offset and description of the byte flipped, once it is
        self.corrupted_at: int | None = None
        self.corrupted_what: str | None = None
        #: why the relay stopped following the stream, if it did
        self.follow_error: str | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._serve, name="stress-relay", daemon=True)
        self._thread.start()

    # -- control --------------------------------------------------------------------
    def arm(self, mode: str) -> None:
        """Flip a byte of the next suitable element (``structure`` or ``payload``)."""
        if mode not in ("structure", "payload"):
            raise ValueError(f"corruption mode {mode!r}")
        if self._decoder is None:
            raise ValueError("this relay does not follow the stream: no lookup")
        with self._lock:
            self._mode = mode

    def cut(self) -> None:
        """Break the connection both ways, as a failing network would."""
        with self._lock:
            self.cut_done = True
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._thread.join(10)
        self._listener.close()

    # -- the relay thread -----------------------------------------------------------
    def _serve(self) -> None:
        a = b = None
        try:
            while a is None:
                if self._stop.is_set():
                    return
                try:
                    a = self._listener.accept(timeout=POLL_SECONDS)
                except ChannelTimeoutError:
                    continue
            b = connect(self.upstream)
            with self._lock:
                self._socks = [socket_of(a), socket_of(b)]     # tcp or unix, both
                cut = self.cut_done
            if cut:
                self.cut()
            self._pump(socket_of(a), socket_of(b))
        except (EngineError, OSError) as exc:
            if not self.cut_done:
                self.error = f"{type(exc).__name__}: {exc}"
        finally:
            for ch in (a, b):
                if ch is not None:
                    ch.close()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        """Source ``a`` <-> destination ``b`` until both directions ended."""
        open_ = {a: True, b: True}
        while any(open_.values()) and not self._stop.is_set():
            readable, _, _ = select.select([s for s, o in open_.items() if o], [], [],
                                           POLL_SECONDS)
            for s in readable:
                try:
                    data = s.recv(RELAY_CHUNK)
                except OSError:
                    data = b""
                other = b if s is a else a
                if not data:
                    open_[s] = False
                    if s is a:
                        self._flush(b)
                    with contextlib.suppress(OSError):
                        other.shutdown(socket.SHUT_WR)
                    continue
                try:
                    if s is a:
                        self._forward(data, b)
                    else:
                        a.sendall(data)
                except OSError:
                    return      # the other side is gone (or cut)

    def _flush(self, b: socket.socket) -> None:
        if self._pending:
            with contextlib.suppress(OSError):
                b.sendall(self._pending)
            self._forwarded += len(self._pending)
            self._pending.clear()

    def _forward(self, data: bytes, b: socket.socket) -> None:
        """Source to destination: raw, or element by element while following."""
        if self._decoder is None:
            b.sendall(data)
            return
        dec = self._decoder
        dec.feed(data)
        self._pending += data
        flipped = False
        try:
            while not flipped:
                start = dec.offset
                event = dec.next_event()
                if event is ev.NEED_DATA:
                    break
                with self._lock:
                    mode = self._mode
                if mode is not None and dec.offset > start:
                    flipped = self._corrupt(mode, event, start, dec.offset)
                del event
        except RemoteProtocolError as exc:
            self.follow_error = str(exc)
            flipped = True      # cannot follow any more: relay the rest as it comes
        if flipped:
            self._decoder = None
            self._flush(b)
            return
        n = dec.offset - self._forwarded
        if n:
            b.sendall(self._pending[:n])
            del self._pending[:n]
            self._forwarded += n

    def _corrupt(self, mode: str, event, start: int, end: int) -> bool:
        if mode == "structure":
            if isinstance(event, _RAM_RECORDS):
                at, what = start + 7, f"flags byte of a {type(event).__name__} record"
            elif isinstance(event, _SECTION_HEADERS):
                at, what = start, f"type byte of a {type(event).__name__} header"
            else:
                return False
        else:
            if not isinstance(event, ev.RamPage):
                return False
            at = end - self.page_size + 1
            what = f"data byte 1 of the page at {event.offset:#x} of {event.block!r}"
        self._pending[at - self._forwarded] ^= 0xFF
        self.corrupted_at, self.corrupted_what = at, what
        return True


class ChannelTap:
    """The source's main channel, calling ``hook()`` after each send."""

    def __init__(self, channel, hook: Callable[[], None]):
        self._channel = channel
        self._hook = hook

    def sendmsg_all(self, buffers) -> int:
        n = self._channel.sendmsg_all(buffers)
        self._hook()
        return n

    def sendall(self, data) -> None:
        self._channel.sendall(data)
        self._hook()

    def __getattr__(self, name):
        return getattr(self._channel, name)


class Trigger:
    """Fires ``action`` once, at ``fault``'s moment.

    ``progress()`` returns ``(status, pages sent, pages remaining)`` of the
    source.  The action returns a note for the report (or None).
    """

    def __init__(self, fault: Fault, npages: int,
                 progress: Callable[[], tuple[str, int, int]],
                 action: Callable[[], str | None]):
        self.fault = fault
        self.npages = npages
        self.progress = progress
        self.action = action
        self._lock = threading.RLock()
        self._base: tuple[int, int] | None = None   # postcopy: (sent, remaining) at start
        self.fired = False
        self.fired_status: str | None = None
        self.note: str | None = None
        self.error: str | None = None

    def on_status(self, old: S, new: S) -> None:
        """A SourceMigration ``on_status`` callback."""
        f = self.fault
        if f.moment in STATUS_MOMENTS and new.value == f.moment:
            self._fire(new.value)
        elif f.moment == "active" and f.at is not None and not self.fired \
                and old is S.ACTIVE and new in (S.PRE_SWITCHOVER, S.DEVICE):
            # Progress is seen as batches are acknowledged; on a loaded host
            # the rest of the pass can go out before the acknowledgement that
            # crosses the mark is read.  The switchover, the last moment of
            # the pass, is then the nearest to the one asked for (this runs in
            # the migration thread before it goes on in the new status).
            self._fire(old.value)

    def poke(self) -> None:
        """Fire if the progress says so (cheap when it does not apply)."""
        f = self.fault
        if self.fired or f.at is None:
            return
        status, sent, remaining = self.progress()
        if f.moment == "active" and status == "active":
            if sent >= f.at * self.npages:
                self._fire(status)
        elif f.moment == "postcopy" and status == "postcopy-active":
            with self._lock:
                if self._base is None:
                    self._base = (sent, max(1, remaining))
                base_sent, base_left = self._base
            if sent - base_sent >= f.at * base_left:
                self._fire(status)

    def _fire(self, status: str) -> None:
        with self._lock:
            if self.fired:
                return
            self.fired = True
            self.fired_status = status
            try:
                self.note = self.action()
            except Exception as exc:   # reported; the case goes on without its fault
                self.error = f"{type(exc).__name__}: {exc}"
