"""The sans-I/O QMP server connection: framing, negotiation, answers, events."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from engine.qmp.protocol import (NEED_DATA, NO_ID, Closed, Event, FramingError, JsonSplitter,
                                 Reply, Request, ServerConnection, default_version)


def _events(conn: ServerConnection) -> list:
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)


def _feed(conn: ServerConnection, *messages) -> list:
    conn.receive_data(b"".join(json.dumps(m).encode() for m in messages))
    return _events(conn)


def _decode(data: bytes) -> dict:
    assert data.endswith(b"\r\n") and data.count(b"\n") == 1
    return json.loads(data)


def _negotiated(**kw) -> ServerConnection:
    conn = ServerConnection(**kw)
    [reply] = _feed(conn, {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
    assert _decode(reply.data) == {"return": {}}
    return conn


def _error(ev) -> dict:
    assert isinstance(ev, Reply), ev
    return _decode(ev.data)


# -- greeting and negotiation -------------------------------------------------------

def test_greeting_has_qemus_shape_with_the_engine_as_package():
    conn = ServerConnection()
    greeting = _decode(conn.greeting())
    qmp = greeting["QMP"]
    assert qmp["capabilities"] == ["oob"]
    assert set(qmp["version"]["qemu"]) == {"major", "minor", "micro"}
    assert qmp["version"]["package"].startswith("engine ")
    assert qmp["version"] == default_version()
    assert _decode(ServerConnection(offer_oob=False).greeting())["QMP"]["capabilities"] == []


def test_commands_before_negotiation_are_refused_as_qemu_does():
    conn = ServerConnection()
    [ev] = _feed(conn, {"execute": "query-status", "id": "a"})
    assert _error(ev) == {"error": {"class": "CommandNotFound", "desc":
                                    "Expecting capabilities negotiation with 'qmp_capabilities'"},
                          "id": "a"}
    assert not conn.negotiated


def test_negotiation_then_commands_and_no_second_negotiation():
    conn = ServerConnection()
    [ok] = _feed(conn, {"execute": "qmp_capabilities", "id": 1})
    assert _decode(ok.data) == {"return": {}, "id": 1}
    assert conn.negotiated and not conn.oob_enabled
    [req, again] = _feed(conn, {"execute": "query-status", "arguments": {"x": 1}, "id": [1, 2]},
                         {"execute": "qmp_capabilities"})
    assert req == Request("query-status", {"x": 1}, [1, 2], False)
    assert _error(again)["error"] == {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored"}


@pytest.mark.parametrize("arguments, desc", [
    ({"enable": ["bogus"]}, "Parameter 'enable[0]' does not accept value 'bogus'"),
    ({"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
    ({"other": 1}, "Parameter 'other' is unexpected"),
])
def test_negotiation_argument_errors(arguments, desc):
    conn = ServerConnection()
    [ev] = _feed(conn, {"execute": "qmp_capabilities", "arguments": arguments})
    assert _error(ev)["error"] == {"class": "GenericError", "desc": desc}
    assert not conn.negotiated


def test_oob_cannot_be_enabled_when_not_offered():
    conn = ServerConnection(offer_oob=False)
    [ev] = _feed(conn, {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
    assert _error(ev)["error"]["desc"] == "Capability 'oob' not available"
    assert not conn.negotiated


def test_exec_oob_needs_oob_enabled_and_is_marked_out_of_band():
    conn = ServerConnection()
    _feed(conn, {"execute": "qmp_capabilities"})
    [ev] = _feed(conn, {"exec-oob": "migrate-pause", "id": "p"})
    assert ev.oob     # answered at once, even as an error (QEMU does)
    assert _error(ev) == {"error": {"class": "GenericError",
                                    "desc": "QMP input member 'exec-oob' is unexpected"},
                          "id": "p"}
    conn = _negotiated()
    assert conn.oob_enabled
    [req] = _feed(conn, {"exec-oob": "migrate-recover", "arguments": {"uri": "unix:/x"}})
    assert req == Request("migrate-recover", {"uri": "unix:/x"}, NO_ID, True)


@pytest.mark.parametrize("message, desc", [
    ([1, 2], "QMP input must be a JSON object"),
    ("execute", "QMP input must be a JSON object"),
    ({"arguments": {}}, "QMP input lacks member 'execute'"),
    ({"execute": 3}, "QMP input member 'execute' must be a string"),
    ({"execute": "stop", "arguments": [1]}, "QMP input member 'arguments' must be an object"),
    ({"execute": "stop", "bogus": 1}, "QMP input member 'bogus' is unexpected"),
    ({"execute": "stop", "exec-oob": "stop"}, "QMP input member 'exec-oob' clashes with 'execute'"),
])
def test_malformed_requests_get_qemus_texts(message, desc):
    conn = _negotiated()
    [ev] = _feed(conn, message)
    assert _error(ev)["error"] == {"class": "GenericError", "desc": desc}


def test_ids_are_echoed_verbatim_including_null_and_absent():
    conn = _negotiated()
    reqs = _feed(conn, {"execute": "a", "id": None}, {"execute": "b"},
                 {"execute": "c", "id": {"k": [1]}})
    assert [_decode(conn.send_return(r, 5)) for r in reqs] == [
        {"return": 5, "id": None}, {"return": 5}, {"return": 5, "id": {"k": [1]}}]
    assert _decode(conn.send_error(reqs[2], "GenericError", "no")) == {
        "error": {"class": "GenericError", "desc": "no"}, "id": {"k": [1]}}


# -- framing ------------------------------------------------------------------------

def test_back_to_back_objects_with_and_without_newlines():
    conn = _negotiated()
    conn.receive_data(b'{"execute":"a"}{"execute":"b"}\n\r\n  {"execute":"c","id":"}{\\"x"}'
                      b'{"execute": "d"')
    evs = _events(conn)
    assert [e.command for e in evs] == ["a", "b", "c"]
    assert evs[2].id == '}{"x'
    conn.receive_data(b"}")
    assert [e.command for e in _events(conn)] == ["d"]


def test_a_parse_error_is_answered_and_the_stream_goes_on():
    conn = _negotiated()
    conn.receive_data(b'{"execute": }{"execute": "next"}')
    err, req = _events(conn)
    body = _error(err)
    assert body["error"]["class"] == "GenericError"
    assert body["error"]["desc"].startswith("JSON parse error, ")
    assert "id" not in body
    assert req.command == "next"


def test_top_level_scalars_and_stray_closers_are_not_requests():
    conn = _negotiated()
    conn.receive_data(b'12 "s" true } ')
    evs = _events(conn)
    assert len(evs) == 4
    assert [_error(e)["error"]["desc"].split(",")[0] for e in evs] == [
        "QMP input must be a JSON object"] * 3 + ["JSON parse error"]


def test_eof_ends_the_session_once():
    conn = _negotiated()
    conn.receive_data(b'{"execute": "a"}{"execute": "b"')
    conn.receive_data(b"")
    evs = _events(conn)
    assert [type(e) for e in evs] == [Request, Closed]
    assert conn.next_event() is NEED_DATA and conn.closed


def test_framing_limits():
    s = JsonSplitter(max_bytes=64, max_depth=3)
    s.feed(b"[[[[1]]]]")
    assert s.next() == FramingError("JSON nesting depth limit exceeded")
    s.feed(b'{"a": "' + b"x" * 100)
    assert s.next() == FramingError("JSON token size limit exceeded")
    s.feed(b'{"ok": [[1]]}')
    assert s.next() == b'{"ok": [[1]]}'
    assert s.next() is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.fixed_dictionaries(
    {"execute": st.text(min_size=1, max_size=8)},
    optional={"id": st.one_of(st.integers(), st.text(max_size=6)),
              "arguments": st.dictionaries(st.text(max_size=4),
                                           st.recursive(st.none() | st.booleans() | st.text(max_size=5),
                                                        lambda c: st.lists(c, max_size=3),
                                                        max_leaves=6), max_size=3)}),
    min_size=1, max_size=6),
    st.lists(st.integers(1, 40), min_size=1, max_size=30),
    st.sampled_from([b"", b"\n", b"\r\n", b" \t"]))
def test_any_split_of_any_stream_gives_the_same_requests(messages, cuts, sep):
    wire = sep.join(json.dumps(m, ensure_ascii=False).encode() for m in messages)
    conn = _negotiated()
    got, pos = [], 0
    for n in cuts:
        if wire[pos:pos + n]:       # b"" would mean EOF
            conn.receive_data(wire[pos:pos + n])
        pos += n
        got += _events(conn)
    if wire[pos:]:
        conn.receive_data(wire[pos:])
    got += _events(conn)
    assert got == [Request(m["execute"], m.get("arguments", {}), m.get("id", NO_ID), False)
                   for m in messages]


# -- events -------------------------------------------------------------------------

def test_events_have_qemus_timestamp_and_no_data_when_memberless():
    ev = Event.now("MIGRATION", {"status": "setup"}, clock=lambda: 1_700_000_000_123_456_789)
    assert ev.to_qmp() == {"timestamp": {"seconds": 1_700_000_000, "microseconds": 123_456},
                           "event": "MIGRATION", "data": {"status": "setup"}}
    assert Event("STOP", None, 5, 6).to_qmp() == {
        "timestamp": {"seconds": 5, "microseconds": 6}, "event": "STOP"}


def test_events_go_only_to_negotiated_clients():
    conn = ServerConnection()
    ev = Event("RESUME", None, 1, 2)
    assert conn.send_event(ev) == b""
    _feed(conn, {"execute": "qmp_capabilities"})
    assert _decode(conn.send_event(ev))["event"] == "RESUME"


def test_output_escapes_non_ascii_like_qemu():
    conn = _negotiated()
    [req] = _feed(conn, {"execute": "x", "id": "é"})
    assert conn.send_return(req, "ü") == b'{"return": "\\u00fc", "id": "\\u00e9"}\r\n'
