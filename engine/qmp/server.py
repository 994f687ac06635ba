"""The QMP monitor's sockets and threads around :mod:`engine.qmp.protocol`.

:class:`QMPServer` listens on ``unix:PATH`` or ``tcp:HOST:PORT`` and serves
any number of clients at once.  Each client has three threads:

* a reader, which feeds the protocol and runs out-of-band commands on the
  spot (QEMU runs them in the monitor's I/O thread, so they overtake
  in-band commands that are queued or still running);
* a dispatcher, which runs the client's in-band commands one after the
  other, in the order they arrived;
* a writer, which sends answers and events, so that raising an event never
  blocks the thread that raises it (a migration's status change).

Commands go to a *dispatcher object* with one method,
``execute(request) -> value``, which raises
:class:`~engine.qmp.errors.QMPError` to answer with an error.  It is called
from several threads (every client's dispatcher, and readers for OOB
commands); serialising in-band commands across clients is its business
(QEMU holds its big lock around them).

Events (:meth:`QMPServer.broadcast`) reach every client that has finished
capabilities negotiation, in one order for all of them, never before the
answer to its ``qmp_capabilities``.
"""
from __future__ import annotations

import contextlib
import queue
import socket
import sys
import threading
import traceback
from typing import Any, Mapping, Protocol

from engine.errors import EngineError
from engine.qmp.errors import ERROR_CLASS_GENERIC, QMPError
from engine.qmp.protocol import (NEED_DATA, Closed, Event, Reply, Request,
                                 ServerConnection)
from engine.transport import Listener, UnixAddress, TcpAddress, listen, parse_uri, socket_of

__all__ = ["QMPServer", "Dispatcher"]

#: bytes per recv from a client
RECV_BYTES = 1 << 16
#: seconds close() waits for each client's queued output to go out
FLUSH_SECONDS = 5.0


class Dispatcher(Protocol):
    def execute(self, request: Request) -> Any:
        """Run ``request``; return its QMP ``return`` value or raise QMPError."""


class _Client:
    """One connected client: its protocol state, queues and threads."""

    def __init__(self, server: "QMPServer", sock: socket.socket, name: str):
        self.server, self.sock, self.name = server, sock, name
        self.conn = ServerConnection(server.version, offer_oob=server.offer_oob)
        #: set once the client has received its qmp_capabilities answer
        self.events_on = False
        self.inq: queue.SimpleQueue = queue.SimpleQueue()    # in-band Request/Reply; None ends
        self.outq: queue.SimpleQueue = queue.SimpleQueue()   # bytes; None ends
        self.threads = [
            threading.Thread(target=self._read, name=f"qmp-read {name}", daemon=True),
            threading.Thread(target=self._dispatch, name=f"qmp-dispatch {name}", daemon=True),
            threading.Thread(target=self._write, name=f"qmp-write {name}", daemon=True),
        ]

    def start(self) -> None:
        self.outq.put(self.conn.greeting())
        for t in self.threads:
            t.start()

    # -- reader ----------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                try:
                    data = self.sock.recv(RECV_BYTES)
                except OSError:
                    data = b""
                self.conn.receive_data(data)
                if not self._process():
                    return
        finally:
            self.inq.put(None)

    def _process(self) -> bool:
        """Handle what the received bytes completed; False once closed."""
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                return True
            if isinstance(ev, Closed):
                return False
            assert isinstance(ev, (Request, Reply))     # NEED_DATA returned above
            # Out of band only once the client has its qmp_capabilities
            # answer: nothing may overtake that.
            if ev.oob and self.events_on:
                if isinstance(ev, Reply):
                    self.outq.put(ev.data)
                else:
                    self.outq.put(self._execute(ev))
            else:
                self.inq.put(ev)

    # -- dispatcher -------------------------------------------------------------------
    def _dispatch(self) -> None:
        try:
            while True:
                item = self.inq.get()
                if item is None:
                    return
                if isinstance(item, Reply):
                    with self.server.lock:
                        self.outq.put(item.data)
                        # Only now may events follow: the client must see the
                        # qmp_capabilities answer first.
                        if self.conn.negotiated:
                            self.events_on = True
                elif not self.server.stopping:
                    self.outq.put(self._execute(item))
        finally:
            # A client that left is done; one cut off by quiesce() still gets
            # what the shutdown sends until close().
            if not self.server.stopping:
                self.outq.put(None)

    def _execute(self, request: Request) -> bytes:
        try:
            value = self.server.dispatcher.execute(request)
        except QMPError as exc:
            return self.conn.send_error(request, exc.error_class, exc.desc)
        except EngineError as exc:
            return self.conn.send_error(request, ERROR_CLASS_GENERIC, str(exc))
        except Exception as exc:    # a bug: answer, and leave a trace for the log
            traceback.print_exc(file=sys.stderr)
            return self.conn.send_error(request, ERROR_CLASS_GENERIC,
                                        f"internal error: {type(exc).__name__}: {exc}")
        return self.conn.send_return(request, value)

    # -- writer -----------------------------------------------------------------------
    def _write(self) -> None:
        alive = True
        try:
            while True:
                data = self.outq.get()
                if data is None:
                    return
                if alive:
                    try:
                        self.sock.sendall(data)
                    except OSError:
                        alive = False       # gone: drain the queue, send nothing
        finally:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.server._forget(self)

    def event(self, data: bytes) -> None:
        if self.events_on and data:
            self.outq.put(data)

    def stop_reading(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)


class QMPServer:
    """A QMP monitor on ``address`` (``unix:PATH`` or ``tcp:HOST:PORT``).

    ``start()`` binds and serves in background threads; ``uri`` is then the
    bound address (a tcp port 0 resolved).  Shutting down is two steps:
    :meth:`quiesce` (no new clients, no new commands; commands already
    running finish and are answered) and :meth:`close` (queued answers and
    events are sent, connections closed).  ``version`` is the greeting's.
    """

    def __init__(self, address: str, dispatcher: Dispatcher, *,
                 version: Mapping[str, Any] | None = None, offer_oob: bool = True):
        addr = parse_uri(address) if isinstance(address, str) else address
        if not isinstance(addr, (UnixAddress, TcpAddress)):
            raise QMPError(ERROR_CLASS_GENERIC,
                           f"a QMP monitor listens on unix: or tcp:, not {addr.uri}")
        self.address = addr
        self.dispatcher = dispatcher
        self.version = version
        self.offer_oob = offer_oob
        #: taken to broadcast, so every client sees events in one order
        self.lock = threading.Lock()
        self.stopping = False
        self._clients: list[_Client] = []
        self._listener: Listener | None = None
        self._accepter: threading.Thread | None = None
        self._accepted = 0

    @property
    def uri(self) -> str:
        return self._listener.uri if self._listener is not None else self.address.uri

    def start(self) -> None:
        self._listener = listen(self.address)
        self._accepter = threading.Thread(target=self._accept, name="qmp-accept", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        assert self._listener is not None   # start() made it before this thread
        while True:
            try:
                channel = self._listener.accept()
            except EngineError:
                return      # closed by quiesce(), or the socket failed
            # The protocol owns the socket from here; the channel wrapper goes.
            sock = socket_of(channel).dup()     # unix: or tcp: only
            channel.close()
            with self.lock:
                if self.stopping:
                    sock.close()
                    continue
                self._accepted += 1
                client = _Client(self, sock, f"#{self._accepted}")
                self._clients.append(client)
            client.start()

    def _forget(self, client: _Client) -> None:
        with self.lock:
            if client in self._clients:
                self._clients.remove(client)

    @property
    def clients(self) -> int:
        """How many clients are connected."""
        with self.lock:
            return len(self._clients)

    def broadcast(self, event: Event) -> None:
        """Send ``event`` to every negotiated client (never blocks on a socket)."""
        with self.lock:
            for client in self._clients:
                client.event(client.conn.send_event(event))

    def emit(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Broadcast event ``name`` stamped now."""
        self.broadcast(Event.now(name, data))

    def quiesce(self, timeout: float = 30.0) -> None:
        """Stop accepting clients and commands; wait for running commands."""
        with self.lock:
            self.stopping = True
            clients = list(self._clients)
        if self._listener is not None:
            self._listener.close()
        for c in clients:
            c.stop_reading()
        me = threading.current_thread()
        for c in clients:
            for t in c.threads[:2]:
                if t is not me and t.is_alive():
                    t.join(timeout)

    def close(self, timeout: float = FLUSH_SECONDS) -> None:
        """Send what is queued, then close every connection and the listener."""
        self.quiesce()
        with self.lock:
            clients = list(self._clients)
        for c in clients:
            c.outq.put(None)
        me = threading.current_thread()
        for c in clients:
            t = c.threads[2]
            if t is not me and t.is_alive():
                t.join(timeout)
            # A writer stuck on a client that does not read: cut it off.
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)
        if self._accepter is not None and self._accepter is not me:
            self._accepter.join(timeout)

    def __enter__(self) -> "QMPServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
