"""The source's return-path reader: dispatch by table, the states each
message is legal in, and the outcome it owns (SHUT status, error)."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from engine.errors import ChannelClosedError, MigrationError, RemoteProtocolError
from engine.migration.returnpath import ReturnPathReader
from engine.state import MigrationState, MigrationStatus as S
from engine.stream import returnpath as rp
from engine.transport.channels import _SocketChannel


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = _SocketChannel(ours, "test-channel")
    yield channel, theirs
    channel.close()
    theirs.close()


def _state(*path: S) -> MigrationState:
    st = MigrationState("source")
    for s in path:
        st.transition(s)
    return st


def _reader(channel, state, handlers):
    ended = threading.Event()
    r = ReturnPathReader(channel, state, handlers, on_end=ended.set)
    r.start()
    return r, ended


def test_messages_go_to_their_handlers_and_shut_ends_it(pair):
    channel, peer = pair
    got = []
    handlers = {rp.Pong: (lambda ev: got.append(ev.value), None)}
    r, ended = _reader(channel, _state(S.SETUP, S.ACTIVE), handlers)
    peer.sendall(rp.rp_pong(1) + rp.rp_pong(7) + rp.rp_shut(0))
    assert ended.wait(5)
    assert got == [1, 7]
    assert r.status == 0 and r.error is None and r.shut.is_set()
    r.check()           # SHUT(0) is no failure
    r.stop()


def test_a_failure_shut_is_the_destinations_error(pair):
    channel, peer = pair
    r, ended = _reader(channel, _state(S.SETUP), {})
    peer.sendall(rp.rp_shut(1))
    assert ended.wait(5)
    with pytest.raises(MigrationError, match="SHUT 1"):
        r.check()
    r.stop()


def test_a_message_outside_its_states_is_a_protocol_error(pair):
    """A page request in precopy: the table says postcopy states only."""
    channel, peer = pair
    asked = []
    handlers = {rp.ReqPages: (asked.append, frozenset({S.POSTCOPY_ACTIVE}))}
    r, ended = _reader(channel, _state(S.SETUP, S.ACTIVE), handlers)
    peer.sendall(rp.rp_req_pages_id(0, 4096, "pc.ram"))
    assert ended.wait(5)
    assert not asked
    assert isinstance(r.error, RemoteProtocolError)
    assert "ReqPages" in str(r.error) and "active" in str(r.error)
    with pytest.raises(RemoteProtocolError):
        r.check()
    r.stop()


def test_short_page_requests_continue_the_last_block(pair):
    channel, peer = pair
    asked = []
    handlers = {rp.ReqPages: (asked.append, None)}
    r, ended = _reader(channel, _state(S.SETUP, S.ACTIVE), handlers)
    peer.sendall(rp.rp_req_pages_id(0, 4096, "pc.ram") + rp.rp_req_pages(8192, 4096)
                 + rp.rp_shut(0))
    assert ended.wait(5)
    assert [(a.block, a.start) for a in asked] == [("pc.ram", 0), ("pc.ram", 8192)]
    r.stop()


def test_a_message_the_table_does_not_know_is_an_error(pair):
    channel, peer = pair
    r, ended = _reader(channel, _state(S.SETUP), {})
    peer.sendall(rp.rp_resume_ack(1))
    assert ended.wait(5)
    assert isinstance(r.error, RemoteProtocolError)
    r.stop()


def test_end_of_file_mid_migration_is_an_error_and_recovery_needs_the_path(pair):
    channel, peer = pair
    r, ended = _reader(channel, _state(S.SETUP), {})
    peer.close()
    assert ended.wait(5)
    assert isinstance(r.error, ChannelClosedError)
    r.stop()


def test_stop_ends_a_blocked_reader_at_once(pair):
    channel, _peer = pair
    r, ended = _reader(channel, _state(S.SETUP), {})
    start = time.monotonic()
    r.stop()
    assert ended.is_set() and time.monotonic() - start < 1.0
    assert r.error is None          # our own stop is no failure
    r.check()
