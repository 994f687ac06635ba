"""The stream codec against byte-exact QEMU 7.2 recordings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.devices import (GLOBALSTATE_VMSD, TIMER_VMSD, globalstate_runstate,
                            globalstate_values, lookup_qemu_vmsd, timer_values)
from engine.errors import RemoteProtocolError
from engine.stream import encoder as enc
from engine.stream import (NEED_DATA, Configuration, DeviceState, Eof, FileHeader,
                           RamBlockInfo, RamBlockList, RamEOS, RamFlush, RamPage,
                           RamRecordEncoder, RamZero, SectionEnd, SectionFooter, SectionPart,
                           SectionStart, StreamDecoder, VMDescription,
                           build_vmdesc)
from tests.captures import require_captures


@pytest.fixture(scope="module")
def captures() -> Path:
    return require_captures()


@pytest.fixture(scope="module")
def precopy(captures) -> bytes:
    return (captures / "precopy-file.stream").read_bytes()


@pytest.fixture(scope="module")
def image(captures) -> np.ndarray:
    return np.fromfile(captures / "ram-4MiB.img", dtype=np.uint8)


def chunks(data: bytes, size: int):
    """``size``-byte pieces; for size 1 only around the element-dense head and tail."""
    if size == 1:
        head, tail = 16384, len(data) - 1024
        yield from (data[i:i + 1] for i in range(head))
        yield from (data[i:min(i + 4093, tail)] for i in range(head, tail, 4093))
        yield from (data[i:i + 1] for i in range(tail, len(data)))
        return
    yield from (data[i:i + size] for i in range(0, len(data), size))


def decode(data, pieces=None, ram: np.ndarray | None = None, **kw) -> list:
    """Every event of ``data`` (fed in ``pieces``), applying pages to ``ram``.

    Pages are stored as ``(block, offset, bytes)`` so the list outlives the buffer.
    """
    dec = StreamDecoder(lookup_qemu_vmsd, **kw)
    feed = iter(pieces if pieces is not None else [data])
    events = []
    while True:
        ev = dec.next_event()
        if ev is NEED_DATA:
            if dec.finished:
                assert dec.offset == len(data)
                return events
            piece = next(feed, None)
            if piece is None:
                dec.feed_eof()
            else:
                dec.feed(piece)
            continue
        if isinstance(ev, RamPage):
            if ram is not None:
                ram[ev.offset:ev.offset + len(ev.data)] = ev.data
            ev = ("page", ev.block, ev.offset, bytes(ev.data))
        elif isinstance(ev, RamZero) and ram is not None:
            ram[ev.offset:ev.offset + 4096] = 0
        events.append(ev)


@pytest.mark.parametrize("size", [1, 7, 4093, 65536])
def test_precopy_capture_rebuilds_guest_ram(precopy, image, size):
    ram = np.full(image.size, 0xAA, dtype=np.uint8)   # zero pages must really be zeroed
    events = decode(precopy, chunks(precopy, size), ram)
    assert np.array_equal(ram, image)

    kinds = [type(e) for e in events if not isinstance(e, (tuple, RamZero))]
    assert kinds == [FileHeader, Configuration, SectionStart, RamBlockList, RamEOS,
                     SectionFooter, SectionPart, RamEOS, SectionFooter, SectionEnd, RamEOS,
                     SectionFooter, DeviceState, SectionFooter, DeviceState, SectionFooter,
                     Eof, VMDescription]
    assert events[1] == Configuration("none", {})
    assert events[2] == SectionStart(2, "ram", 0, 4)
    assert events[3] == RamBlockList(4 << 20, (RamBlockInfo("m0", 4 << 20),))
    devices = {e.idstr: e for e in events if isinstance(e, DeviceState)}
    assert devices["timer"] == DeviceState(0, "timer", 0, 2, timer_values())
    assert devices["globalstate"].section_id == 4
    assert globalstate_runstate(devices["globalstate"].values) == "prelaunch"
    assert devices["globalstate"].values == globalstate_values("prelaunch")
    vmdesc = events[-1].data
    assert vmdesc["page_size"] == 4096
    assert [d["name"] for d in vmdesc["devices"]] == ["timer", "globalstate"]
    pages = [e for e in events if isinstance(e, tuple)]
    zeros = [e for e in events if isinstance(e, RamZero)]
    assert len(pages) + len(zeros) == 1024
    assert {e[1] for e in pages} == {e.block for e in zeros} == {"m0"}


@pytest.mark.parametrize("codec", ["none", "zlib", "zstd"])
def test_multifd_main_channel(captures, codec, image):
    data = (captures / f"multifd2-{codec}.conn0").read_bytes()
    events = decode(data, chunks(data, 7))
    zeros = [e for e in events if isinstance(e, RamZero)]
    # 7.2 sends no pages on the main channel with multifd, only zero pages;
    # and it predates the MULTIFD_FLUSH record (its syncs ride on each EOS).
    assert not any(isinstance(e, tuple) for e in events)
    assert not any(isinstance(e, RamFlush) for e in events)
    zero_pages = {e.offset // 4096 for e in zeros}
    assert zero_pages == set(np.flatnonzero(~image.reshape(-1, 4096).any(axis=1)))
    assert isinstance(events[-1], VMDescription) and isinstance(events[-2], Eof)


def _reencode(events) -> bytes:
    """The stream our encoder writes for ``events``."""
    out, rec = [enc.file_header()], RamRecordEncoder()
    sections = {}
    for ev in events:
        if isinstance(ev, Configuration):
            out.append(enc.configuration(ev.machine, ev.subsections))
        elif isinstance(ev, SectionStart):
            out.append(enc.section_start(ev.section_id, ev.idstr, ev.instance_id,
                                         ev.version_id))
        elif isinstance(ev, RamBlockList):
            out.append(enc.ram_block_list([(b.idstr, b.used_length) for b in ev.blocks]))
        elif isinstance(ev, tuple):
            out.append(rec.page(ev[1], ev[2], ev[3]))
        elif isinstance(ev, RamZero):
            out.append(rec.zero_page(ev.block, ev.offset))
        elif isinstance(ev, RamEOS):
            out.append(enc.ram_eos())
        elif isinstance(ev, SectionPart):
            out.append(enc.section_part(ev.section_id))
        elif isinstance(ev, SectionEnd):
            out.append(enc.section_end(ev.section_id))
        elif isinstance(ev, SectionFooter):
            out.append(enc.section_footer(ev.section_id))
        elif isinstance(ev, DeviceState):
            vmsd = lookup_qemu_vmsd(ev.idstr, ev.instance_id)
            sections[ev.idstr] = (ev.idstr, ev.instance_id, vmsd, ev.values)
            full = enc.section_full(ev.section_id, ev.idstr, ev.instance_id, ev.version_id,
                                    vmsd.encode(ev.values))
            out.append(full[:-5])               # its footer is the next event
        elif isinstance(ev, Eof):
            out.append(enc.eof())
        elif isinstance(ev, VMDescription):
            out.append(enc.vmdescription(build_vmdesc(4096, sections.values())))
    return b"".join(out)


@pytest.mark.parametrize("name", ["precopy-file.stream", "multifd2-zstd.conn0"])
def test_reencoding_a_capture_is_byte_exact(captures, name):
    data = (captures / name).read_bytes()
    assert _reencode(decode(data)) == data


def test_encoder_writes_qemu_sections_exactly(precopy):
    head = (enc.file_header() + enc.configuration("none")
            + enc.ram_setup_section(2, [("m0", 4 << 20)]))
    assert precopy.startswith(head)
    timer, gs = timer_values(), globalstate_values("prelaunch")
    tail = (enc.section_full(0, "timer", 0, 2, TIMER_VMSD.encode(timer))
            + enc.section_full(4, "globalstate", 0, 1, GLOBALSTATE_VMSD.encode(gs))
            + enc.eof()
            + enc.vmdescription(build_vmdesc(4096, [("timer", 0, TIMER_VMSD, timer),
                                                    ("globalstate", 0, GLOBALSTATE_VMSD,
                                                     gs)])))
    assert precopy.endswith(tail)


def test_capture_truncated_anywhere_is_an_error(precopy):
    full = decode(precopy)
    eof_end = precopy.rindex(b"\x06\x00\x00\x01\xe6")   # just past the EOF byte
    head = range(0, 80)
    body = range(80, len(precopy) - 800, 9973)
    tail = range(len(precopy) - 800, len(precopy))
    for cut in [*head, *body, *tail]:
        if cut == eof_end:
            # The VMDESCRIPTION is optional: a stream may end right after EOF.
            assert decode(precopy[:cut]) == full[:-1]
            continue
        dec = StreamDecoder(lookup_qemu_vmsd)
        dec.feed(precopy[:cut])
        dec.feed_eof()
        got = []
        with pytest.raises(RemoteProtocolError, match="stream truncated: expected") as info:
            while True:
                ev = dec.next_event()
                assert ev is not NEED_DATA
                got.append(("page", ev.block, ev.offset, bytes(ev.data))
                           if isinstance(ev, RamPage) else ev)
        assert info.value.offset is not None and info.value.offset <= cut
        assert f"at offset {info.value.offset}" in str(info.value)
        assert got == full[:len(got)]                       # no garbage before the error
        with pytest.raises(RemoteProtocolError):           # and the error sticks
            dec.next_event()
