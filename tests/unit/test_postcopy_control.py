"""The fault handler's control protocol and the error carrier, and the ram/postcopy layers.

Pure codecs, one process: every message round-trips, a malformed packet or
a wrong descriptor count is a RemoteProtocolError, an exception crosses as
itself (the same with the real process: tests/e2e/test_postcopy_handler.py).
"""
from __future__ import annotations

import ast
import errno
import pathlib

import pytest

from engine.ctlerrors import pack_error, unpack_error
from engine.errors import (ChannelBrokenError, InvalidParameterError, LocalProtocolError,
                           MigrationError, PostcopyError, RemoteProtocolError, StateError)
from engine.postcopy import control as ctl
from engine.postcopy.blocktime import empty_figures

MESSAGES = [
    (ctl.ReturnPath(), 1), (ctl.Preempt(), 1), (ctl.Placed(0, 0), 0),
    (ctl.Placed(7, (1 << 40) + 3), 0), (ctl.Pause(), 0), (ctl.Resend(), 0),
    (ctl.QueryStats(), 0), (ctl.Stop(), 0), (ctl.Ready(), 0), (ctl.Vcpus(0), 0),
    (ctl.Vcpus(3), 0), (ctl.Vcpus(2, (0x7f0000000000, 0x7f1000000000)), 1),
    (ctl.Vcpus(1, ()), 1),
    (ctl.Stats(empty_figures("software", 2)), 0),
]


@pytest.mark.parametrize("msg,nfds", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg, nfds):
    assert msg.fds() == nfds
    assert ctl.unpack(ctl.pack(msg), nfds) == msg


def test_directions_cover_every_message_once():
    kinds = {type(m) for m, _ in MESSAGES} | {ctl.Error}
    assert set(ctl.TO_HANDLER) | set(ctl.TO_COORDINATOR) == kinds
    assert not set(ctl.TO_HANDLER) & set(ctl.TO_COORDINATOR)


@pytest.mark.parametrize("msg,nfds", [(ctl.ReturnPath(), 0), (ctl.Placed(1, 2), 1),
                                      (ctl.Vcpus(2, (4096,)), 0), (ctl.Vcpus(2), 1)])
def test_a_wrong_descriptor_count_is_refused(msg, nfds):
    with pytest.raises(RemoteProtocolError, match="descriptors") as info:
        ctl.unpack(ctl.pack(msg), nfds)
    assert info.value.channel == ctl.CHANNEL


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff", bytes([ctl.MSG_PLACED]) + b"\0" * 3,
                                  ctl.pack(ctl.Stop()) + b"x",
                                  ctl.pack(ctl.Vcpus(1, (1, 2)))[:-1],
                                  bytes([ctl.MSG_STATS]) + b"[1, 2]",
                                  bytes([ctl.MSG_STATS]) + b"{nope",
                                  bytes([ctl.MSG_ERROR]) + b"{\"text\": 1}"])
def test_malformed_packets_are_remote_protocol_errors(data):
    with pytest.raises(RemoteProtocolError) as info:
        ctl.unpack(data)
    assert info.value.channel == ctl.CHANNEL


def test_unencodable_messages_are_local_protocol_errors():
    with pytest.raises(LocalProtocolError):
        ctl.pack(ctl.Placed(-1, 0))
    with pytest.raises(LocalProtocolError):
        ctl.pack(("placed", 1, 2))


# -- errors cross as themselves -----------------------------------------------------------


def _cross(exc: BaseException) -> BaseException:
    msg = ctl.unpack(ctl.pack(ctl.Error(exc)))
    assert isinstance(msg, ctl.Error)
    return msg.exc


def test_a_protocol_error_arrives_as_itself_with_channel_and_offset():
    sent = RemoteProtocolError("unknown RAM block 'nosuch.ram'", 4119, "postcopy preempt")
    got = _cross(sent)
    assert type(got) is RemoteProtocolError
    assert (got.message, got.offset, got.channel) == (sent.message, 4119, "postcopy preempt")
    assert str(got) == str(sent)
    assert any("postcopy fault handler" in n for n in got.__notes__)
    assert type(_cross(LocalProtocolError("x", None, "c"))) is LocalProtocolError


def test_engine_errors_with_their_own_constructors_keep_their_attributes():
    got = _cross(StateError("active", "setup", "destination"))
    assert type(got) is StateError
    assert (got.current, got.requested, got.role) == ("active", "setup", "destination")
    got = _cross(InvalidParameterError("max-bandwidth", -1, "must be >= 0"))
    assert type(got) is InvalidParameterError and got.name == "max-bandwidth"
    assert got.value == -1 and str(got) == "Parameter 'max-bandwidth' = -1: must be >= 0"
    got = _cross(PostcopyError("vCPU 0 (pid 42) registered for userfaultfd faults"))
    assert type(got) is PostcopyError and str(got).startswith("vCPU 0 (pid 42)")


def test_the_cause_crosses_too():
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        except OSError as os_exc:
            raise ChannelBrokenError("return path: send failed") from os_exc
    except ChannelBrokenError as exc:
        got = _cross(exc)
    assert type(got) is ChannelBrokenError and str(got) == "return path: send failed"
    assert type(got.__cause__) is ConnectionResetError
    assert got.__cause__.errno == errno.ECONNRESET


def test_foreign_errors_arrive_as_the_fallback_naming_their_type():
    got = _cross(KeyError("pc.ram"))
    assert type(got) is PostcopyError
    assert str(got) == "postcopy fault handler: KeyError: 'pc.ram'"
    got = unpack_error(pack_error(ValueError("bad")), fallback=MigrationError,
                       where="multifd channel 2")
    assert type(got) is MigrationError and str(got) == "multifd channel 2: ValueError: bad"


def test_only_engine_error_classes_are_rebuilt_by_name():
    # A report naming some other importable class is not obeyed.
    for name in ("subprocess.CalledProcessError", "engine.state.MigrationStatus",
                 "engine.errors.nosuch"):
        data = ('{"type": "%s", "text": "t", "args": ["t"], "attrs": {}}' % name).encode()
        got = unpack_error(data, fallback=PostcopyError, where="w")
        assert type(got) is PostcopyError, name


# -- layers --------------------------------------------------------------------------------


def _engine_imports(package: pathlib.Path) -> set[tuple[str, str]]:
    found = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add((path.name, node.module))
            elif isinstance(node, ast.Import):
                found.update((path.name, a.name) for a in node.names)
    return found


def test_ram_does_not_import_postcopy():
    """postcopy builds on ram (blocks, dirty logs, the vCPUs' fault protocol);
    ram importing postcopy back (even lazily, in a function) is a circle."""
    ram = pathlib.Path(__file__).resolve().parents[2] / "engine" / "ram"
    upward = sorted((f, m) for f, m in _engine_imports(ram)
                    if m.startswith(("engine.postcopy", "engine.migration")))
    assert upward == []
