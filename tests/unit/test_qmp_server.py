"""The QMP server's threads and sockets, with a stand-in dispatcher.

Checked: clients on unix and tcp, the qemu.qmp client, in-band commands in
order with OOB ones overtaking them, events to negotiated clients only and
never before their qmp_capabilities answer, and a shutdown that answers
what runs and flushes what is queued.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import pytest

from engine.qmp.client import QMPClient
from engine.qmp.errors import QMPError
from engine.qmp.protocol import JsonSplitter, Request
from engine.qmp.server import QMPServer

WAIT = 10.0


class Stand:
    """A dispatcher: echo, a command that blocks until an OOB one releases it."""

    def __init__(self):
        self.gate = threading.Event()
        self.ran: list[str] = []

    def execute(self, req: Request):
        self.ran.append(req.command)
        if req.command == "echo":
            return dict(req.arguments)
        if req.command == "block":
            assert self.gate.wait(WAIT)
            return "released"
        if req.command == "release" and req.oob:
            self.gate.set()
            return {}
        if req.command == "crash":
            raise ZeroDivisionError("boom")
        raise QMPError("CommandNotFound", f"The command {req.command} has not been found")


@pytest.fixture
def server(tmp_path):
    made = []

    def make(address=None):
        srv = QMPServer(address or f"unix:{tmp_path}/qmp.sock", Stand())
        srv.start()
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.close()


class RawClient:
    """A socket speaking QMP by hand, to see exactly what arrives when."""

    def __init__(self, uri: str):
        path = uri.split(":", 1)[1]
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.settimeout(WAIT)
        self.splitter = JsonSplitter()

    def send(self, *messages) -> None:
        self.sock.sendall(b"".join(json.dumps(m).encode() for m in messages))

    def recv(self) -> dict | None:
        raw = self.recv_raw()
        return None if raw is None else json.loads(raw)

    def recv_raw(self) -> bytes | None:
        while True:
            raw = self.splitter.next()
            if raw is not None:
                return raw
            data = self.sock.recv(4096)
            if not data:
                return None
            self.splitter.feed(data)

    def close(self):
        self.sock.close()


def test_the_qemu_qmp_client_works_against_it(server):
    from qemu.qmp import ExecuteError, QMPClient as AsyncClient
    srv = server()

    async def session():
        qmp = AsyncClient("test")
        await qmp.connect(srv.address.path)
        try:
            assert qmp.greeting.QMP.capabilities == ["oob"]
            assert await qmp.execute("echo", {"a": [1]}) == {"a": [1]}
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("nope")
            assert info.value.error_class == "CommandNotFound"
            blocked = asyncio.ensure_future(qmp.execute("block"))
            await asyncio.sleep(0.1)
            assert not blocked.done()
            assert await qmp.execute("release", oob=True) == {}
            assert await asyncio.wait_for(blocked, WAIT) == "released"
            srv.emit("MIGRATION", {"status": "active"})
            ev = await asyncio.wait_for(qmp.events.get(), WAIT)
            assert ev["event"] == "MIGRATION" and ev["data"] == {"status": "active"}
            assert set(ev["timestamp"]) == {"seconds", "microseconds"}
        finally:
            await qmp.disconnect()

    asyncio.run(session())


def test_several_tcp_clients_see_events_in_one_order(server):
    srv = server("tcp:127.0.0.1:0")
    assert srv.uri.startswith("tcp:127.0.0.1:") and not srv.uri.endswith(":0")
    a, b = QMPClient(srv.uri), QMPClient(srv.uri)
    try:
        emitters = [threading.Thread(target=lambda k=k: [srv.emit("E", {"k": k, "i": i})
                                                          for i in range(20)])
                    for k in range(3)]
        for t in emitters:
            t.start()
        for t in emitters:
            t.join()
        seen = []
        for c in (a, b):
            got = [c.wait_event("E", timeout=WAIT)["data"] for _ in range(60)]
            seen.append(got)
        assert seen[0] == seen[1]
        for k in range(3):      # each emitter's events in its order
            assert [d["i"] for d in seen[0] if d["k"] == k] == list(range(20))
    finally:
        a.close()
        b.close()


def test_no_event_before_the_qmp_capabilities_answer(server):
    srv = server()
    raw = RawClient(srv.uri)
    stop = threading.Event()
    pump = threading.Thread(target=lambda: [srv.emit("TICK") for _ in iter(stop.is_set, True)])
    try:
        assert "QMP" in raw.recv()
        pump.start()
        time.sleep(0.05)
        raw.send({"execute": "qmp_capabilities", "id": "neg"})
        assert raw.recv() == {"return": {}, "id": "neg"}
        assert raw.recv()["event"] == "TICK"
    finally:
        stop.set()
        pump.join()
        raw.close()


def test_in_band_commands_keep_their_order_and_oob_overtakes(server):
    srv = server()
    raw = RawClient(srv.uri)
    try:
        raw.recv()
        raw.send({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
        assert raw.recv() == {"return": {}}
        # One write: a blocked command, one queued behind it, and the OOB
        # command that releases the first.
        raw.send({"execute": "block", "id": 1}, {"execute": "echo", "id": 2},
                 {"exec-oob": "release", "id": 3})
        answers = [raw.recv() for _ in range(3)]
        assert [m.get("id") for m in answers] == [3, 1, 2]
        assert answers[1]["return"] == "released"
    finally:
        raw.close()


def test_a_failing_command_is_answered_not_fatal(server, capsys):
    srv = server()
    with QMPClient(srv.uri) as c:
        with pytest.raises(QMPError) as info:
            c.execute("crash")
        assert info.value.error_class == "GenericError"
        assert "ZeroDivisionError: boom" in info.value.desc
        assert c.execute("echo", {"still": "here"}) == {"still": "here"}
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_shutdown_answers_the_running_command_and_flushes_events(tmp_path):
    srv = QMPServer(f"unix:{tmp_path}/qmp.sock", Stand())
    srv.start()
    raw = RawClient(srv.uri)
    raw.recv()
    raw.send({"execute": "qmp_capabilities"}, {"execute": "block", "id": "b"},
             {"execute": "echo", "id": "never"})
    assert raw.recv() == {"return": {}}
    deadline = time.monotonic() + WAIT
    while "block" not in srv.dispatcher.ran:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    threading.Timer(0.2, srv.dispatcher.gate.set).start()
    srv.quiesce()           # returns once 'block' has been answered
    srv.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    srv.close()
    got = []
    while (m := raw.recv()) is not None:
        got.append(m)
    raw.close()
    assert got[0] == {"return": "released", "id": "b"}
    assert got[1]["event"] == "SHUTDOWN" and len(got) == 2      # 'echo' never ran
    assert "echo" not in srv.dispatcher.ran
    assert not os.path.exists(f"{tmp_path}/qmp.sock")


def test_clients_that_leave_are_forgotten(server):
    srv = server()
    for _ in range(3):
        QMPClient(srv.uri).close()
    deadline = time.monotonic() + WAIT
    while srv.clients:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_only_sockets(tmp_path):
    with pytest.raises(QMPError):
        QMPServer(f"file:{tmp_path}/x", Stand())


@pytest.mark.parametrize("depth", [990, 1000, 1024, 1025, 5000])
def test_deeply_nested_input_is_answered_and_the_reader_lives(server, depth):
    """A value nested deeper than Python's parser goes (990: RecursionError
    in json.loads, which used to end the reader thread) or than QEMU's limit
    (1024) gets a GenericError, and the session goes on."""
    srv = server()
    c = RawClient(srv.uri)
    try:
        assert "QMP" in c.recv()
        c.send({"execute": "qmp_capabilities"})
        assert c.recv() == {"return": {}}
        line = b'{"execute": "echo", "arguments": {"x": ' + b"[" * depth + b"]" * depth + b"}}"
        c.sock.sendall(line)
        answer = c.recv()
        if depth < 1024 and "return" in answer:     # Python parsed it: echoed
            assert answer["return"]["x"] is not None
        else:
            assert answer["error"]["class"] == "GenericError", answer
            assert "nesting" in answer["error"]["desc"], answer
        c.send({"execute": "echo", "arguments": {"after": 1}, "id": 7})
        assert c.recv() == {"return": {"after": 1}, "id": 7}
    finally:
        c.close()


def test_deeply_nested_id_is_answered_without_it(server):
    """An id too deep to echo: the answer leaves it out instead of the
    thread that encodes it dying."""
    srv = server()
    c = RawClient(srv.uri)
    try:
        assert "QMP" in c.recv()
        c.send({"execute": "qmp_capabilities"})
        assert c.recv() == {"return": {}}
        for depth in (900, 980, 995):
            c.sock.sendall(b'{"execute": "echo", "id": ' + b"[" * depth + b"]" * depth + b"}")
            raw = c.recv_raw()      # this test's own stack may be too deep to parse it
            assert raw.startswith(b'{"return": {}, "id": [[[') or raw.startswith(
                b'{"error": {"class": "GenericError", "desc": "JSON nesting'), raw[:80]
        c.send({"execute": "echo", "arguments": {"after": 2}})
        assert c.recv() == {"return": {"after": 2}}
    finally:
        c.close()
