"""Hostile input on the load side: typed errors with channel and offset."""
from __future__ import annotations

import json
import struct

import pytest

from engine.errors import RemoteProtocolError
from engine.machine import get_profile
from engine.stream import events as ev
from engine.stream.constants import (QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION,
                                     RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS,
                                     RAM_SAVE_FLAG_MULTIFD_FLUSH)
from engine.stream.decoder import StreamDecoder
from engine.stream.vmdesc import MAX_VMDESC_DEPTH, parse_vmdesc


def _after_eof_decoder() -> tuple[StreamDecoder, int]:
    """A decoder that has read a nested stream's EOF (VMDESCRIPTION next)."""
    dec = StreamDecoder(get_profile("none").lookup(0), channel="main", expect_header=False)
    dec.feed(bytes([QEMU_VM_EOF]))
    assert isinstance(dec.next_event(), ev.Eof)
    return dec, dec.offset


def _vmdesc(payload: bytes) -> bytes:
    return bytes([QEMU_VM_VMDESCRIPTION]) + struct.pack(">I", len(payload)) + payload


def test_vmdesc_nested_100000_deep_is_a_protocol_error_with_channel_and_offset():
    dec, at = _after_eof_decoder()
    dec.feed(_vmdesc(b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"))
    dec.feed_eof()
    with pytest.raises(RemoteProtocolError) as err:
        dec.next_event()
    assert err.value.channel == "main" and err.value.offset == at + 5
    assert "nested" in str(err.value) and "main" in str(err.value)


def test_vmdesc_parser_counts_brackets_outside_strings_only():
    deep_text = "[" * 1000
    desc = {"page_size": 4096, "devices": [{"name": deep_text + '\\"{'}]}
    assert parse_vmdesc(json.dumps(desc).encode()) == desc
    nested = "[" * (MAX_VMDESC_DEPTH + 1) + "]" * (MAX_VMDESC_DEPTH + 1)
    with pytest.raises(RemoteProtocolError):
        parse_vmdesc(('{"x":' + nested + "}").encode())
    with pytest.raises(RemoteProtocolError, match="not a JSON object"):
        parse_vmdesc(b"[1]")


def _ram_decoder() -> StreamDecoder:
    """A records-only decoder (the preempt channel's): RAM records at once."""
    return StreamDecoder(get_profile("none").lookup(0), channel="preempt",
                         ram_records_only=True,
                         ram_blocks=[ev.RamBlockInfo("m0", 1 << 20, None, None)])


@pytest.mark.parametrize("word", [
    RAM_SAVE_FLAG_MULTIFD_FLUSH | 0x5000,                       # address bits with FLUSH
    RAM_SAVE_FLAG_MULTIFD_FLUSH | RAM_SAVE_FLAG_CONTINUE,        # CONTINUE with FLUSH
    RAM_SAVE_FLAG_EOS | 0x1000,
    RAM_SAVE_FLAG_MULTIFD_FLUSH | 0x400,                        # an unknown flag bit
])
def test_misaligned_ram_record_header_is_an_error_not_a_flush(word):
    dec = _ram_decoder()
    dec.feed(struct.pack(">Q", word))
    with pytest.raises(RemoteProtocolError) as err:
        dec.next_event()
    assert err.value.offset == 0 and err.value.channel == "preempt"


def test_a_plain_flush_is_still_a_flush():
    dec = _ram_decoder()
    dec.feed(struct.pack(">Q", RAM_SAVE_FLAG_MULTIFD_FLUSH))
    assert isinstance(dec.next_event(), ev.RamFlush)
