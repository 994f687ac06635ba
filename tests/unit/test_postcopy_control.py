"""The fault handler's control protocol, the error carrier and the blocktime figures.

Pure codecs and arithmetic, one process: every message round-trips, a
malformed packet or a wrong descriptor count is a RemoteProtocolError, an
exception crosses as itself, and the blocktime accounting is QEMU's.
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
from engine.postcopy.blocktime import Blocktime, empty_figures

MS = 1_000_000

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


# -- blocktime ------------------------------------------------------------------------------


def test_blocktime_per_vcpu_and_all_blocked():
    bt = Blocktime(2, "software")
    bt.set_online(2, 0)
    bt.block(0, 0)                 # vCPU 0 waits 0..30 ms
    bt.block(1, 10 * MS)           # vCPU 1 waits 10..20 ms: all blocked 10..20
    bt.latency(1, 10 * MS)
    bt.unblock(1, 20 * MS)
    bt.latency(0, 30 * MS)
    bt.unblock(0, 30 * MS)
    bt.block(1, 40 * MS)           # still waiting at 45 ms
    fig = bt.figures(45 * MS)
    assert fig["postcopy-vcpu-blocktime"] == [30, 15]
    assert fig["postcopy-blocktime"] == 10
    assert fig["postcopy-latency"] == 20 * MS
    assert fig["postcopy-vcpu-latency"] == [30 * MS, 10 * MS]
    # 10 ms = 10000 us is in [2^13, 2^14), 30 ms in [2^14, 2^15)
    dist = fig["postcopy-latency-dist"]
    assert dist[13] == 1 and dist[14] == 1 and sum(dist) == 2
    assert fig["postcopy-faults"] == "software"


def test_a_vcpu_that_leaves_ends_the_all_blocked_spell_and_keeps_its_time():
    bt = Blocktime(1, "userfaultfd")
    bt.set_online(1, 0)
    bt.block(0, 5 * MS)            # the only vCPU: all blocked from 5 ms
    bt.unblock(0, 9 * MS)          # it left while waiting
    bt.set_online(0, 9 * MS)
    fig = bt.figures(100 * MS)
    assert fig["postcopy-vcpu-blocktime"] == [4] and fig["postcopy-blocktime"] == 4
    assert not bt.blocked(0)


def test_latencies_grow_past_the_first_array():
    bt = Blocktime(1, "software")
    for i in range(3000):
        bt.latency(0, 1000 * (i + 1))
    fig = bt.figures(0)
    assert fig["postcopy-latency"] == 1000 * 3001 // 2
    assert sum(fig["postcopy-latency-dist"]) == 3000
    assert empty_figures("software", 1).keys() == fig.keys()


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
