"""The coordinator <-> worker control messages: a worker's failure crosses the
process line as itself (engine.ctlerrors, as the postcopy fault handler's)."""
from __future__ import annotations

import pytest

from engine.errors import (ChannelClosedError, CodecError, MigrationError, ProtocolError,
                           RemoteProtocolError)
from engine.multifd import control as ctl


def across(exc: BaseException) -> Exception:
    """``exc`` sent as a worker's ERROR, decoded and raised as the coordinator does."""
    frames = [bytes(f) for f in ctl.Error.of(exc).frames()]
    msg = ctl.decode(frames)
    assert isinstance(msg, ctl.Error)
    return msg.exception("multifd channel 1")


def test_a_protocol_error_keeps_its_channel_and_offset():
    got = across(RemoteProtocolError("multifd packet 7: zstd: corrupt payload", 4242,
                                     "multifd 1"))
    assert type(got) is RemoteProtocolError
    assert (got.channel, got.offset) == ("multifd 1", 4242)
    assert str(got) == ("multifd channel 1: multifd packet 7: zstd: corrupt payload "
                        "(channel multifd 1, offset 4242)")


@pytest.mark.parametrize("exc", [ChannelClosedError("stream truncated at offset 9"),
                                 CodecError("zstd: compression failed")])
def test_engine_errors_arrive_as_themselves(exc):
    got = across(exc)
    assert type(got) is type(exc) and not isinstance(got, ProtocolError)
    assert str(got) == f"multifd channel 1: {exc}"


def test_other_failures_arrive_as_migration_errors_caused_by_them():
    got = across(OSError(5, "Input/output error"))
    assert type(got) is MigrationError
    assert str(got) == "multifd channel 1: [Errno 5] Input/output error"
    assert isinstance(got.__cause__, OSError) and got.__cause__.errno == 5


def test_an_error_without_a_location_has_none():
    got = across(RemoteProtocolError("bad"))
    assert (got.channel, got.offset) == (None, None)


def test_a_malformed_error_report_is_a_remote_protocol_error():
    with pytest.raises(RemoteProtocolError, match="malformed error report"):
        ctl.decode([ctl.ERROR, b"{not json"]).exception("multifd channel 0")
