"""Malformed main streams: each must raise RemoteProtocolError naming the offset."""
from __future__ import annotations

import struct

import pytest

from engine.devices import GLOBALSTATE_VMSD, TIMER_VMSD, lookup_qemu_vmsd, timer_values
from engine.errors import LocalProtocolError, RemoteProtocolError
from engine.stream import encoder as enc
from engine.stream import NEED_DATA, RamRecordEncoder, StreamDecoder

TPS = 4096
HEAD = enc.file_header() + enc.configuration("none")
RAM_START = (enc.section_start(2, "ram", 0, 4) + enc.ram_block_list([("m0", 4 * TPS)])
             + enc.ram_eos() + enc.section_footer(2))
PART = enc.section_part(2)


def fail(data: bytes, chunk: int = 0, **kw) -> RemoteProtocolError:
    """Decode ``data`` to its end and return the error it must raise."""
    dec = StreamDecoder(lookup_qemu_vmsd, **kw)
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    with pytest.raises(RemoteProtocolError) as info:
        for piece in pieces:
            dec.feed(piece)
            while dec.next_event() is not NEED_DATA:
                pass
        dec.feed_eof()
        while True:
            assert dec.next_event() is not NEED_DATA, "stream accepted"
    err = info.value
    assert err.offset is not None and 0 <= err.offset <= len(data)
    assert f"at offset {err.offset}" in str(err)
    assert err.channel == kw.get("channel", "main")
    with pytest.raises(RemoteProtocolError):
        dec.next_event()                              # errors are final
    return err


def page_word(offset: int, flags: int) -> bytes:
    return struct.pack(">Q", offset | flags)


# -- header and configuration ------------------------------------------------------

def test_wrong_magic():
    err = fail(b"QEVN" + HEAD[4:])
    assert err.offset == 0 and "bad magic 0x5145564e" in str(err) and "QEVM" in str(err)


def test_obsolete_version_2():
    err = fail(struct.pack(">II", 0x5145564D, 2) + HEAD[8:])
    assert "obsolete" in str(err) and err.offset == 4


def test_unknown_version():
    assert "unsupported stream version 4" in str(fail(struct.pack(">II", 0x5145564D, 4)))


def test_configuration_missing():
    err = fail(enc.file_header() + enc.eof())
    assert "configuration section missing" in str(err) and err.offset == 8
    # Without send-configuration the same stream is fine.
    dec = StreamDecoder(lookup_qemu_vmsd, require_configuration=False)
    dec.feed(enc.file_header() + enc.eof())
    dec.feed_eof()
    assert [type(dec.next_event()).__name__ for _ in range(2)] == ["FileHeader", "Eof"]
    assert dec.next_event() is NEED_DATA and dec.finished


def test_unknown_configuration_subsection():
    data = enc.file_header() + enc.configuration("none", {"configuration/bogus": b""})
    assert "no subsection 'configuration/bogus'" in str(fail(data + enc.eof()))


# -- top level ----------------------------------------------------------------------

@pytest.mark.parametrize("tag", [0x05, 0x06, 0x07, 0x09, 0x7E, 0xFF])
def test_unknown_section_type(tag):
    err = fail(HEAD + RAM_START + bytes([tag]))
    assert f"Unknown section type {tag}" in str(err) and err.offset == len(HEAD + RAM_START)


def test_unknown_device():
    data = HEAD + enc.section_full(3, "x", 0, 1, b"")
    err = fail(data)
    assert "Unknown savevm section or instance 'x' 0" in str(err) and err.offset == len(HEAD)
    err = fail(HEAD + enc.section_full(0, "timer", 1, 2, TIMER_VMSD.encode(timer_values())))
    assert "'timer' 1" in str(err)


def test_unknown_live_section_and_ram_version():
    assert "'block' 0" in str(fail(HEAD + enc.section_start(1, "block", 0, 1)))
    assert "ram: unsupported version 3" in str(fail(HEAD + enc.section_start(1, "ram", 0, 3)))


def test_part_of_unknown_section():
    assert "Unknown savevm section 9" in str(fail(HEAD + RAM_START + enc.section_part(9)))


def test_device_version_out_of_range():
    body = TIMER_VMSD.encode(timer_values())
    assert "too new" in str(fail(HEAD + enc.section_full(0, "timer", 0, 3, body)))
    assert "too old" in str(fail(HEAD + enc.section_full(0, "timer", 0, 0, body)))


def test_bad_footer():
    full = enc.section_full(0, "timer", 0, 2, TIMER_VMSD.encode(timer_values()))
    err = fail(HEAD + full[:-4] + struct.pack(">I", 1))
    assert "mismatched section id in footer: read 1, expected 0" in str(err)
    assert err.offset == len(HEAD) + len(full) - 4
    err = fail(HEAD + full[:-5] + b"\x00" + full[-4:])
    assert "missing section footer" in str(err)
    ram_bad = RAM_START[:-4] + struct.pack(">I", 3)
    assert "read 3, expected 2" in str(fail(HEAD + ram_bad))


def test_wrong_body_length_is_caught_by_the_footer():
    """A globalstate body one byte short makes the footer land in the wrong place."""
    body = GLOBALSTATE_VMSD.encode({"size": 8, "runstate": b"running".ljust(100, b"\0")})
    err = fail(HEAD + enc.section_full(4, "globalstate", 0, 1, body[:-1]))
    assert "footer" in str(err)


# -- RAM records ----------------------------------------------------------------------

def test_page_offset_outside_block():
    rec = RamRecordEncoder()
    err = fail(HEAD + RAM_START + PART + rec.page("m0", 4 * TPS, bytes(TPS)))
    assert "RAM offset 0x4000 is outside block 'm0'" in str(err)
    assert err.offset == len(HEAD + RAM_START + PART)
    rec.reset()
    page = rec.page("m0", 0, bytes(TPS)) + rec.zero_page("m0", 1 << 40)
    assert "outside block" in str(fail(HEAD + RAM_START + PART + page))


def test_unknown_block():
    err = fail(HEAD + RAM_START + PART + RamRecordEncoder().zero_page("pc.ram", 0))
    assert "unknown RAM block 'pc.ram'" in str(err)


def test_continue_without_previous_block():
    err = fail(HEAD + RAM_START + PART + page_word(0, 0x28) + bytes(TPS))
    assert "CONTINUE but no previous block" in str(err)


def test_nonzero_fill_byte():
    record = RamRecordEncoder().zero_page("m0", TPS)[:-1] + b"\x01"
    err = fail(HEAD + RAM_START + PART + record)
    assert "fill byte 0x01" in str(err) and err.offset == len(HEAD + RAM_START + PART) + 11


@pytest.mark.parametrize("flag,name", [(0x80, "HOOK"),
                                        (0x100, "COMPRESS_PAGE"), (0x01, "FULL")])
def test_unsupported_ram_flags(flag, name):
    err = fail(HEAD + RAM_START + PART + page_word(0, flag) + b"\x02m0" + bytes(TPS))
    assert f"unsupported RAM flag {flag:#x} ({name})" in str(err)


@pytest.mark.parametrize("flags", [0x0A, 0x400, 0x800, 0x18])
def test_unknown_flag_combination(flags):
    err = fail(HEAD + RAM_START + PART + page_word(0, flags) + b"\x02m0" + bytes(TPS))
    assert "Unknown combination of migration flags" in str(err)


def test_block_list_errors():
    overrun = (enc.section_start(2, "ram", 0, 4) + page_word(TPS, 0x04) + b"\x02m0"
               + struct.pack(">Q", 2 * TPS))
    assert "overruns" in str(fail(HEAD + overrun))
    twice = (enc.section_start(2, "ram", 0, 4) + page_word(2 * TPS, 0x04)
             + (b"\x02m0" + struct.pack(">Q", TPS)) * 2)
    assert "listed twice" in str(fail(HEAD + twice))


def test_postcopy_page_size_mismatch():
    huge = 2 << 20
    data = (HEAD + enc.postcopy_advise(huge, TPS) + enc.section_start(2, "ram", 0, 4)
            + enc.ram_block_list([("m0", huge)], page_sizes={"m0": 1 << 30}))
    err = fail(data, block_page_size=lambda name: huge)
    assert "mismatched RAM page size" in str(err)


# -- commands -------------------------------------------------------------------------

@pytest.mark.parametrize("cmd,payload,message", [
    (0, b"", "MIG_CMD 0x0 unknown"),
    (12, b"", "MIG_CMD 0xc unknown"),
    (0x7FFF, b"", "unknown"),
    (1, b"\0", "OPEN_RETURN_PATH received with bad length - expecting 0, got 1"),
    (2, b"\0\0\0", "PING received with bad length - expecting 4, got 3"),
    (3, bytes(8), "POSTCOPY_ADVISE received with bad length - expecting 0 or 16, got 8"),
    (4, b"\0", "POSTCOPY_LISTEN received with bad length"),
    (7, bytes(5), "PACKAGED received with bad length - expecting 4, got 5"),
    (11, b"\0", "SWITCHOVER_START received with bad length"),
    (6, bytes(19), "POSTCOPY_RAM_DISCARD too short"),
    (6, b"\x01\x02m0\x00" + bytes(16), "POSTCOPY_RAM_DISCARD invalid version 1"),
    (6, b"\x00\x02m0\x01" + bytes(16), "POSTCOPY_RAM_DISCARD with bad length"),
    (6, b"\x00\x02m0\x00" + bytes(17), "POSTCOPY_RAM_DISCARD with bad length"),
    (6, b"\x00\x02m0\x00" + bytes(16 * 13), "POSTCOPY_RAM_DISCARD with bad length"),
    (10, b"\x05m0", "RECV_BITMAP received with bad length 3"),
])
def test_bad_commands(cmd, payload, message):
    err = fail(HEAD + enc.command(cmd, payload) + enc.eof())
    assert message in str(err)
    assert len(HEAD) <= err.offset <= len(HEAD) + 5


def test_truncated_package():
    err = fail(HEAD + enc.packaged(bytes(100))[:-1])
    assert "stream truncated: expected PACKAGED blob (100 bytes)" in str(err)
    assert err.offset == len(HEAD) + 9


# -- after EOF ------------------------------------------------------------------------

def test_after_eof():
    assert "expected VMDESCRIPTION" in str(fail(HEAD + enc.eof() + enc.eof()))
    bad_json = bytes([6]) + struct.pack(">I", 5) + b"{nope"
    assert "not JSON" in str(fail(HEAD + enc.eof() + bad_json))
    trailing = enc.eof() + enc.vmdescription({"page_size": 4096, "devices": []}) + b"\0"
    assert "1 bytes after the end of the stream" in str(fail(HEAD + trailing))


# -- truncation, offsets, API misuse ----------------------------------------------------

def _small_stream() -> bytes:
    rec = RamRecordEncoder()
    return (HEAD + enc.open_return_path() + enc.ping(1) + RAM_START + PART
            + rec.page("m0", 0, bytes(range(256)) * 16) + rec.zero_page("m0", TPS)
            + enc.ram_eos() + enc.section_footer(2)
            + enc.section_full(0, "timer", 0, 2, TIMER_VMSD.encode(timer_values(5, 6)))
            + enc.packaged(enc.ping(3)) + enc.eof())


@pytest.mark.parametrize("chunk", [0, 3])
def test_truncated_at_every_byte(chunk):
    data = _small_stream()
    for cut in range(len(data)):
        err = fail(data[:cut], chunk)
        assert "stream truncated: expected" in str(err)
        assert err.offset <= cut


def test_complete_small_stream_finishes():
    dec = StreamDecoder(lookup_qemu_vmsd)
    dec.feed(_small_stream())
    dec.feed_eof()
    names = []
    while (ev := dec.next_event()) is not NEED_DATA:
        names.append(type(ev).__name__)
    assert names[-1] == "Eof" and dec.finished and dec.offset == len(_small_stream())
    assert dec.next_event() is NEED_DATA


def test_offsets_are_absolute_across_feeds():
    data = HEAD + RAM_START + PART + RamRecordEncoder().page("m0", 0, bytes(TPS))
    bad = data + RamRecordEncoder().zero_page("zz", 0)
    err = fail(bad, chunk=1000)
    assert err.offset == len(data) + 8


def test_feed_after_eof_is_a_local_error():
    dec = StreamDecoder(lookup_qemu_vmsd)
    dec.feed_eof()
    with pytest.raises(LocalProtocolError):
        dec.feed(b"x")
