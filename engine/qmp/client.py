"""A small blocking QMP client, for ``engine info`` and scripts.

Works with an ``engine vm`` monitor and with QEMU's alike::

    with QMPClient("unix:/tmp/vm.qmp") as qmp:
        info = qmp.execute("query-migrate")
        qmp.execute("migrate-pause", oob=True)
        ev = qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed")

Events that arrive while waiting for an answer are kept, in order, in
:attr:`QMPClient.events` (and :meth:`wait_event` consumes them from there).
For anything asynchronous, use the ``qemu.qmp`` package.
"""
from __future__ import annotations

import itertools
import socket
import time
from typing import Any, Callable, Mapping

from engine.errors import ChannelClosedError, RemoteProtocolError
from engine.qmp.errors import QMPError
from engine.qmp.protocol import FramingError, JsonSplitter, decode_value, encode_message
from engine.transport import ChannelTimeoutError, connect, socket_of

__all__ = ["QMPClient"]


class QMPClient:
    """A connection to a QMP monitor at ``address`` (``unix:PATH``, ``tcp:HOST:PORT``).

    ``timeout`` bounds connecting and each wait for a message (seconds).
    Connecting reads the greeting and negotiates, enabling OOB when offered.
    """

    def __init__(self, address: str, *, timeout: float = 30.0):
        self.address = address
        self.timeout = timeout
        self.greeting: dict | None = None
        self.oob = False
        #: events received and not yet taken by wait_event(), oldest first
        self.events: list[dict] = []
        self._ids = itertools.count(1)
        self._splitter = JsonSplitter()
        self._channel = connect(address, timeout=timeout)
        # a monitor is a unix or tcp socket
        self._sock: socket.socket = socket_of(self._channel)
        try:
            self.greeting = self._recv(time.monotonic() + timeout)
            if "QMP" not in self.greeting:
                raise RemoteProtocolError(f"{address}: not a QMP greeting: {self.greeting}")
            offered = self.greeting["QMP"].get("capabilities", [])
            self.oob = "oob" in offered
            self.execute("qmp_capabilities", {"enable": ["oob"]} if self.oob else None)
        except BaseException:
            self.close()
            raise

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                oob: bool = False) -> Any:
        """Run ``command``; its ``return`` value, or :class:`QMPError`."""
        rid = f"engine-{next(self._ids)}"
        msg: dict[str, Any] = {"exec-oob" if oob else "execute": command, "id": rid}
        if arguments:
            msg["arguments"] = dict(arguments)
        self._sock.sendall(encode_message(msg))
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._recv(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != rid:
                continue    # an answer to someone else's (or a parse error of ours)
            if "error" in reply:
                err = reply["error"]
                raise QMPError(err.get("class", "GenericError"), err.get("desc", ""))
            return reply.get("return")

    def wait_event(self, name: str, predicate: Callable[[dict], bool] | None = None,
                   timeout: float | None = None) -> dict:
        """The first event called ``name`` (for which ``predicate`` holds),
        received already or within ``timeout`` seconds; removed from
        :attr:`events` with every event before it."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        seen = 0
        while True:
            for i in range(seen, len(self.events)):
                ev = self.events[i]
                if ev.get("event") == name and (predicate is None or predicate(ev)):
                    del self.events[:i + 1]
                    return ev
            seen = len(self.events)
            self.events.append(self._recv(deadline))

    def _recv(self, deadline: float) -> dict:
        while True:
            raw = self._splitter.next()
            if isinstance(raw, FramingError):
                raise RemoteProtocolError(f"{self.address}: {raw.desc}")
            if raw is not None:
                try:
                    value = decode_value(raw)
                except ValueError as exc:
                    raise RemoteProtocolError(f"{self.address}: bad JSON from the monitor: "
                                              f"{exc}") from None
                if isinstance(value, FramingError):
                    raise RemoteProtocolError(f"{self.address}: {value.desc}")
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelTimeoutError(f"{self.address}: no answer within {self.timeout} s")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not data:
                raise ChannelClosedError(f"{self.address}: the monitor closed the connection")
            self._splitter.feed(data)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
