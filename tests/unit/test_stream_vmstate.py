"""VMState descriptions: field codecs, versions, subsections, vmdesc, QEMU's devices."""
from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.devices import (GLOBALSTATE_VMSD, TIMER_VMSD, globalstate_runstate,
                            globalstate_values, lookup_qemu_vmsd, timer_values)
from engine.errors import LocalProtocolError, RemoteProtocolError
from engine.stream import Field, NeedData, Subsection, VMStateDescription, build_vmdesc, present
from engine.stream import encoder as enc

INNER = VMStateDescription("dev/extra/deeper", 1, 1, (Field("z", "uint8"),))
EXTRA = VMStateDescription("dev/extra", 2, 1,
                           (Field("x", "uint16"), Field("y", "int8", version_id=2)),
                           subsections=(Subsection(INNER, present(INNER.name)),))
OTHER = VMStateDescription("dev/other", 1, 1, (Field("flag", "bool"),))
DEV = VMStateDescription(
    "dev", 3, 2,
    fields=(
        Field("a", "uint32"),
        Field("pad", "unused_buffer", size=3),
        Field("regs", "int16", array_len=3),
        Field("blob", "buffer", size=5),
        Field("on", "bool"),
        Field("t", "timer"),
        Field("new", "uint64", version_id=3),
    ),
    subsections=(Subsection(EXTRA, present(EXTRA.name)),
                 Subsection(OTHER, lambda v: v.get("a") == 7)))

VALUES = {"a": 7, "regs": [-1, 0, 32767], "blob": b"hello", "on": True, "t": -1,
          "new": 2**64 - 1, "dev/extra": {"x": 65535, "y": -128, "dev/extra/deeper": {"z": 9}},
          "dev/other": {"flag": False}}


def test_encode_layout_and_decode():
    body = DEV.encode(VALUES)
    expected = (struct.pack(">I", 7) + bytes(3) + struct.pack(">3h", -1, 0, 32767) + b"hello"
                + b"\x01" + struct.pack(">q", -1) + struct.pack(">Q", 2**64 - 1)
                + b"\x05\x09dev/extra" + struct.pack(">I", 2) + struct.pack(">Hb", 65535, -128)
                + b"\x05\x10dev/extra/deeper" + struct.pack(">I", 1) + b"\x09"
                + b"\x05\x09dev/other" + struct.pack(">I", 1) + b"\x00")
    assert body == expected
    values, end = DEV.decode(body + b"\x7e\0\0\0\0")
    assert values == VALUES and end == len(body)


PLAIN = {k: v for k, v in VALUES.items() if not k.startswith("dev/")} | {"a": 1}


def test_old_version_skips_newer_fields():
    body = DEV.encode(PLAIN)                     # a != 7: no subsection at all
    v2 = body[:-8]                               # "new" (version 3) is the last field
    values, end = DEV.decode(v2 + b"\x7e", version_id=2)
    assert values == {k: v for k, v in PLAIN.items() if k != "new"} and end == len(v2)
    with pytest.raises(RemoteProtocolError, match="too old"):
        DEV.decode(body, version_id=1)
    with pytest.raises(RemoteProtocolError, match="too new"):
        DEV.decode(body, version_id=4)
    # A subsection written at version 1 omits its version-2 field.
    sub = b"\x05\x09dev/extra" + struct.pack(">I", 1) + struct.pack(">H", 3)
    values, _ = DEV.decode(body + sub + b"\x7e")
    assert values["dev/extra"] == {"x": 3}


def test_subsection_peek_leaves_foreign_bytes():
    base = DEV.encode(PLAIN)
    # 0x05 then a name not longer than "dev" or not starting with it: the caller's.
    for tail in (b"\x05\x04abcd", b"\x05\x03dev", b"\x05\x02de", b"\x05\x05xdev/"):
        values, end = DEV.decode(base + tail)
        assert end == len(base) and values == PLAIN
    # A longer name with the prefix is a subsection, known or not (QEMU compares
    # the bare prefix, without the slash).
    for name in (b"dev/nope", b"devX"):
        with pytest.raises(RemoteProtocolError, match="no subsection") as info:
            DEV.decode(base + b"\x05" + bytes([len(name)]) + name + bytes(8))
        assert info.value.offset == len(base)


def test_truncation_raises_need_data():
    body = DEV.encode(VALUES) + b"\x7e"
    for cut in range(len(body)):
        with pytest.raises(NeedData) as info:
            DEV.decode(body[:cut])
        assert info.value.offset <= cut and isinstance(info.value, RemoteProtocolError)


@pytest.mark.parametrize("values,message", [
    ({**VALUES, "a": -1}, "cannot hold"),
    ({**VALUES, "regs": [1, 2]}, "needs 3 items"),
    ({**VALUES, "blob": b"x"}, "needs 5 bytes"),
    ({k: v for k, v in VALUES.items() if k != "on"}, "no value for field 'on'"),
    ({**VALUES, "t": 2**63}, "cannot hold"),
])
def test_unencodable_values(values, message):
    with pytest.raises(LocalProtocolError, match=message):
        DEV.encode(values)


def test_field_validation():
    with pytest.raises(ValueError):
        Field("x", "float")
    with pytest.raises(ValueError):
        Field("x", "buffer")
    with pytest.raises(ValueError):
        Field("x", "uint8", array_len=0)
    assert Field("x", "uint32", array_len=4).wire_size == 16


def test_describe_matches_qemu_shape():
    desc = DEV.describe(VALUES)
    assert desc["vmsd_name"] == "dev" and desc["version"] == 3
    assert desc["fields"][1] == {"name": "pad", "type": "unused_buffer", "size": 3}
    assert desc["fields"][2] == {"name": "regs", "array_len": 3, "type": "int16", "size": 2}
    assert [s["vmsd_name"] for s in desc["subsections"]] == ["dev/extra", "dev/other"]
    assert desc["subsections"][0]["subsections"][0]["vmsd_name"] == "dev/extra/deeper"
    twice = VMStateDescription("t", 1, 1, (Field("unused", "unused_buffer", size=2),
                                           Field("k", "uint8"),
                                           Field("unused", "unused_buffer", size=4)))
    assert [f["name"] for f in twice.describe({})["fields"]] == ["unused[0]", "k", "unused[1]"]
    assert "subsections" not in twice.describe({})


def test_qemu_devices_and_vmdesc_bytes():
    timer, gs = timer_values(1, 2), globalstate_values("running")
    assert TIMER_VMSD.encode(timer) == struct.pack(">q", 1) + bytes(8) + struct.pack(">q", 2)
    assert GLOBALSTATE_VMSD.encode(gs)[:4] == struct.pack(">I", 8)
    assert globalstate_values("prelaunch")["size"] == 0x0A
    assert globalstate_runstate(gs) == "running"
    v1, _ = TIMER_VMSD.decode(struct.pack(">q", 5) + bytes(8) + b"\x7e", version_id=1)
    assert v1 == {"cpu_ticks_offset": 5}
    trailer = enc.vmdescription(build_vmdesc(4096, [("timer", 0, TIMER_VMSD, timer)]))
    assert trailer[5:].startswith(b'{"page_size": 4096, "devices": [{"name": "timer", '
                                  b'"instance_id": 0, "vmsd_name": "timer", "version": 2, '
                                  b'"fields": [{"name": "cpu_ticks_offset", "type": "int64", '
                                  b'"size": 8}, {"name": "unused", "type": "unused_buffer"')
    assert struct.unpack(">I", trailer[1:5])[0] == len(trailer) - 5
    assert json.loads(trailer[5:])["devices"][0]["fields"][2]["name"] == "cpu_clock_offset"
    assert lookup_qemu_vmsd("timer", 0) is TIMER_VMSD and lookup_qemu_vmsd("timer", 1) is None


def test_timer_icount_subsections_round_trip():
    values = {**timer_values(1, 2),
              "timer/icount": {"qemu_icount_bias": 3, "qemu_icount": 4,
                               "timer/icount/shift": {"icount_time_shift": -5,
                                                      "last_delta": 6}}}
    body = TIMER_VMSD.encode(values)
    assert TIMER_VMSD.decode(body + b"\x7e")[0] == values


@pytest.mark.parametrize("values,message", [
    ({"size": 8, "runstate": b"running" + bytes(93)}, None),
    ({"size": 9, "runstate": b"running" + bytes(93)}, "does not match"),
    ({"size": 101, "runstate": b"x" * 100}, "not NUL terminated"),
    ({"size": 6, "runstate": b"bogus" + bytes(95)}, "unknown run state"),
])
def test_globalstate_runstate_checks(values, message):
    if message is None:
        assert globalstate_runstate(values) == "running"
    else:
        with pytest.raises(RemoteProtocolError, match=message):
            globalstate_runstate(values)
    with pytest.raises(LocalProtocolError):
        globalstate_values("x" * 100)


_int_types = {"uint8": (0, 2**8 - 1), "uint16": (0, 2**16 - 1), "uint32": (0, 2**32 - 1),
              "uint64": (0, 2**64 - 1), "int8": (-2**7, 2**7 - 1), "int16": (-2**15, 2**15 - 1),
              "int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1)}


@st.composite
def _vmsd_and_values(draw):
    fields, values = [], {}
    for i in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from([*_int_types, "bool", "buffer", "unused_buffer"]))
        n = draw(st.none() | st.integers(1, 4)) if kind in _int_types else None
        if kind in ("buffer", "unused_buffer"):
            size = draw(st.integers(1, 16))
            fields.append(Field(f"f{i}", kind, size=size))
            if kind == "buffer":
                values[f"f{i}"] = draw(st.binary(min_size=size, max_size=size))
            continue
        fields.append(Field(f"f{i}", kind, array_len=n))
        item = st.booleans() if kind == "bool" else st.integers(*_int_types[kind])
        values[f"f{i}"] = draw(item) if n is None else draw(st.lists(item, min_size=n, max_size=n))
    return VMStateDescription("p", 1, 1, tuple(fields)), values


@settings(max_examples=100, deadline=None)
@given(_vmsd_and_values())
def test_vmstate_round_trip(case):
    vmsd, values = case
    body = vmsd.encode(values)
    assert len(body) == sum(f.wire_size for f in vmsd.fields)
    assert vmsd.decode(body + b"\x00") == (values, len(body))
