"""Return-path messages and the received bitmap."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import LocalProtocolError, RemoteProtocolError
from engine.stream import (NEED_DATA, Pong, ReceivedBitmap, RecvBitmapMsg, ReqPages, ResumeAck,
                           ReturnPathDecoder, Shut, SwitchoverAck, bitmap_bits,
                           decode_recv_bitmap, encode_recv_bitmap, recv_bitmap_size, rp_pong,
                           rp_recv_bitmap, rp_req_pages, rp_req_pages_id, rp_resume_ack,
                           rp_shut, rp_switchover_ack)
from engine.stream.returnpath import rp_message


def events(data: bytes, chunk: int = 0) -> list:
    dec = ReturnPathDecoder()
    out = []
    for i in range(0, len(data), chunk or max(len(data), 1)):
        dec.feed(data[i:i + (chunk or len(data))])
        while (ev := dec.next_event()) is not NEED_DATA:
            out.append(ev)
    dec.feed_eof()
    assert dec.next_event() is NEED_DATA and dec.offset == len(data)
    return out


def fail(data: bytes) -> RemoteProtocolError:
    dec = ReturnPathDecoder()
    dec.feed(data)
    dec.feed_eof()
    with pytest.raises(RemoteProtocolError) as info:
        while dec.next_event() is not NEED_DATA:
            pass
    err = info.value
    assert err.channel == "return path" and f"at offset {err.offset}" in str(err)
    return err


def test_every_message_round_trips():
    bits = np.random.default_rng(0).random(1000) < 0.5
    data = (rp_pong(1) + rp_req_pages_id(0x2000, 4096, "pc.ram") + rp_req_pages(0x3000, 8192)
            + rp_recv_bitmap("pc.ram") + encode_recv_bitmap(bits) + rp_resume_ack()
            + rp_switchover_ack() + rp_shut(0))
    expected = [Pong(1), ReqPages(0x2000, 4096, "pc.ram"), ReqPages(0x3000, 8192, None),
                RecvBitmapMsg("pc.ram")]
    for chunk in (0, 1, 7):
        got = events(data, chunk)
        assert got[:4] == expected
        assert isinstance(got[4], ReceivedBitmap) and got[4].block == "pc.ram"
        assert np.array_equal(bitmap_bits(got[4].bitmap, 1000), bits)
        assert got[5:] == [ResumeAck(1), SwitchoverAck(), Shut(0)]


def test_wire_layout():
    assert rp_shut(1) == b"\x00\x01\x00\x04\x00\x00\x00\x01"
    assert rp_req_pages_id(0x1000, 0x1000, "m0") == (
        b"\x00\x03\x00\x0f" + struct.pack(">QI", 0x1000, 0x1000) + b"\x02m0")
    assert rp_switchover_ack() == b"\x00\x07\x00\x00"


def test_bitmap_layout():
    bits = np.zeros(70, dtype=bool)
    bits[[0, 9, 69]] = True
    blob = encode_recv_bitmap(bits)
    assert recv_bitmap_size(70) == 16 and recv_bitmap_size(64) == 8
    assert blob[:8] == struct.pack(">Q", 16)
    assert blob[8:24] == bytes([0x01, 0x02, 0, 0, 0, 0, 0, 0, 0x20]) + bytes(7)
    assert blob[24:] == struct.pack(">Q", 0x0123456789ABCDEF)
    assert decode_recv_bitmap(b"xx" + blob, 2) == (blob[8:24], 2 + len(blob))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), max_size=300))
def test_bitmap_round_trip(bits):
    bitmap, end = decode_recv_bitmap(encode_recv_bitmap(bits))
    assert np.array_equal(bitmap_bits(bitmap, len(bits)), np.array(bits, dtype=bool))


@pytest.mark.parametrize("data,message", [
    (rp_message(0), "Received invalid message 0x0000"),
    (rp_message(8), "Received invalid message 0x0008"),
    (rp_message(0xFFFF, b"x"), "invalid message 0xffff length 0x0001"),
    (rp_message(1, b"\0\0\0"), "'MIG_RP_MSG_SHUT' message with incorrect length 3, expecting 4"),
    (rp_message(2, bytes(5)), "incorrect length 5"),
    (rp_message(4, bytes(13)), "incorrect length 13"),
    (rp_message(6, b""), "MIG_RP_MSG_RESUME_ACK"),
    (rp_message(7, b"\0"), "SWITCHOVER_ACK"),
    (struct.pack(">HH", 3, 513) + bytes(513), "incorrect length 513, expecting at most 512"),
    (rp_message(3, struct.pack(">QI", 0, 4096) + b"\x05m0"), "Req_Page_id with length 15"),
    (rp_message(3, bytes(12)), "Req_Page_id with length 12"),
    (rp_message(5, b"\x03m0"), "RECV_BITMAP with length 3"),
    (rp_req_pages(0, 4096), "REQ_PAGES before any REQ_PAGES_ID"),
    (rp_pong(1)[:-1], "stream truncated: expected MIG_RP_MSG_PONG payload"),
    (rp_pong(1)[:3], "stream truncated: expected return-path message header"),
    (rp_recv_bitmap("m0"), "stream truncated: expected received bitmap of 'm0'"),
    (rp_recv_bitmap("m0") + encode_recv_bitmap([True] * 9)[:-1], "stream truncated"),
    (rp_recv_bitmap("m0") + encode_recv_bitmap([True] * 9)[:-1] + b"\0", "end marker"),
])
def test_bad_messages(data, message):
    assert message in str(fail(data))


def test_error_offset_is_absolute():
    err = fail(rp_pong(1) + rp_pong(2) + rp_message(9))
    assert err.offset == 16


def test_encoders_refuse_what_cannot_be_sent():
    with pytest.raises(LocalProtocolError):
        rp_message(1, bytes(513))
    with pytest.raises(LocalProtocolError):
        rp_req_pages_id(0, 4096, "x" * 256)
