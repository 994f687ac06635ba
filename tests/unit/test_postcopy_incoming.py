"""The destination's postcopy sub-state table and the decoder's channel restart."""
from __future__ import annotations

import pytest

from engine.errors import ConfigError, RemoteProtocolError
from engine.postcopy.incoming import (TRANSITIONS, PostcopyIncoming, PostcopyState as P,
                                      resolve_fault_mode)
from engine.stream import encoder as enc
from engine.stream import events as ev
from engine.stream.decoder import StreamDecoder


class _Block:
    idstr, page_size, used_length, npages = "ram0", 4096, 1 << 20, 256


class _Guest:
    blocks = [_Block()]
    nvcpus = 0


def test_every_state_has_a_row_and_end_is_final():
    assert set(TRANSITIONS) == set(P)
    assert TRANSITIONS[P.END] == frozenset()
    # LISTEN may follow ADVISE directly (nothing to discard) or the discards.
    assert P.LISTENING in TRANSITIONS[P.ADVISE] and P.LISTENING in TRANSITIONS[P.DISCARD]


@pytest.mark.parametrize("first", [P.DISCARD, P.LISTENING, P.RUNNING, P.END])
def test_commands_out_of_order_are_protocol_errors(first):
    pc = PostcopyIncoming(_Guest(), "software")
    with pytest.raises(RemoteProtocolError, match="incoming postcopy state 'none'"):
        pc._move(first)


def test_advise_refuses_the_zero_byte_form_and_other_page_sizes():
    pc = PostcopyIncoming(_Guest(), "software")
    with pytest.raises(RemoteProtocolError, match="0 byte advise"):
        pc.advise(None, None)
    pc = PostcopyIncoming(_Guest(), "software")
    with pytest.raises(RemoteProtocolError, match="matching RAM page sizes"):
        pc.advise(4096 | (2 << 20), 4096)
    pc = PostcopyIncoming(_Guest(), "software")
    with pytest.raises(RemoteProtocolError, match="matching target page sizes"):
        pc.advise(4096, 8192)


def test_fault_mode_names():
    assert resolve_fault_mode("software") == "software"
    assert resolve_fault_mode("auto") in ("userfaultfd", "software")
    with pytest.raises(ConfigError, match="choose one of"):
        resolve_fault_mode("hardware")


def _lookup(idstr, instance_id):
    return None


def test_decoder_restart_channel_forgets_the_broken_record_and_the_block():
    blocks = [("ram0", 1 << 20)]
    head = (enc.file_header() + enc.configuration("engine-1.0")
            + enc.section_start(2, "ram", 0, 4) + enc.ram_block_list(blocks)
            + enc.ram_eos() + enc.section_footer(2))
    rec = enc.RamRecordEncoder()
    part = enc.section_part(2) + rec.page("ram0", 0, b"\x11" * 4096)
    dec = StreamDecoder(_lookup, channel="main")
    dec.feed(head + part + rec.page("ram0", 4096, b"\x22" * 4096)[:100])  # cut mid-record
    events = []
    while (e := dec.next_event()) is not ev.NEED_DATA:
        events.append(e)
    assert isinstance(events[-1], ev.RamPage) and events[-1].offset == 0
    dec.restart_channel()
    # The resumed source names the block again in its first record, and a
    # CONTINUE record would now be an error: the previous block is gone.
    rec2 = enc.RamRecordEncoder()
    dec.feed(enc.section_part(2) + rec2.page("ram0", 4096, b"\x33" * 4096)
             + enc.ram_eos() + enc.section_footer(2))
    got = []
    while (e := dec.next_event()) is not ev.NEED_DATA:
        got.append(e)
    pages = [e for e in got if isinstance(e, ev.RamPage)]
    assert [(p.offset, bytes(p.data[:1])) for p in pages] == [(4096, b"\x33")]
    assert dec.offset == len(enc.section_part(2)) + 8 + 5 + 4096 + 8 + 5

    dec.restart_channel()
    dec.feed(enc.section_part(2) + rec.page("ram0", 8192, b"\x44" * 4096))  # CONTINUE
    with pytest.raises(RemoteProtocolError, match="CONTINUE but no previous block"):
        while dec.next_event() is not ev.NEED_DATA:
            pass
