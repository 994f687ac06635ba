"""The coordinator <-> worker control messages: a worker's failure crosses the
process line as itself."""
from __future__ import annotations

import pytest

from engine.errors import (ChannelClosedError, CodecError, MigrationError, ProtocolError,
                           RemoteProtocolError)
from engine.multifd import control as ctl

KINDS = {cls.__name__: cls for cls in (ChannelClosedError, RemoteProtocolError)}


def across(exc: BaseException) -> Exception:
    """``exc`` sent as a worker's ERROR, decoded and raised as the coordinator does."""
    frames = [bytes(f) for f in ctl.Error.of(exc).frames()]
    msg = ctl.decode(frames)
    assert isinstance(msg, ctl.Error)
    return msg.exception("multifd channel 1", KINDS, MigrationError)


def test_a_protocol_error_keeps_its_channel_and_offset():
    got = across(RemoteProtocolError("multifd packet 7: zstd: corrupt payload", 4242,
                                     "multifd 1"))
    assert type(got) is RemoteProtocolError
    assert (got.channel, got.offset) == ("multifd 1", 4242)
    assert str(got) == ("multifd channel 1: multifd packet 7: zstd: corrupt payload "
                        "(channel multifd 1, offset 4242)")


@pytest.mark.parametrize("exc, kind", [
    (ChannelClosedError("stream truncated at offset 9"), ChannelClosedError),
    (CodecError("zstd: compression failed"), MigrationError),    # not a channel's kind
    (OSError(5, "Input/output error"), MigrationError),
])
def test_other_failures_keep_their_kind_and_text(exc, kind):
    got = across(exc)
    assert type(got) is kind and not isinstance(got, ProtocolError)
    assert str(got) == f"multifd channel 1: {exc}"


def test_an_error_without_a_location_has_none():
    got = across(RemoteProtocolError("bad"))
    assert (got.channel, got.offset) == (None, None)


def test_the_old_two_frame_error_still_decodes():
    msg = ctl.decode([ctl.ERROR, b"boom", b"OSError"])
    assert msg == ctl.Error("boom", "OSError")
    assert str(msg.exception("multifd channel 0", KINDS, MigrationError)) \
        == "multifd channel 0: boom"
