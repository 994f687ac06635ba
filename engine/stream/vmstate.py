"""VMState descriptions: QEMU's declarative device-state layout, encode and decode.

A :class:`VMStateDescription` (vmsd) is a named, versioned list of fixed-size
fields followed by optional subsections.  Fields are written in order with
big-endian integers; a subsection is written only when its ``needed``
predicate holds, as ``u8 0x05, cstr8 name, be32 version, body``.

Values are plain dicts keyed by field name; a subsection's values live in a
nested dict under the subsection's vmsd name, e.g.
``{"cpu_ticks_offset": 0, ..., "timer/icount": {"qemu_icount": 5}}``.

Loading follows QEMU's rules: a stream version above ``version_id`` or below
``minimum_version_id`` is refused; a field whose ``version_id`` is above the
stream's version is absent; subsections are *peeked*: ``0x05`` is consumed
only when the name that follows starts with the parent's name and is longer,
otherwise the byte belongs to the caller (typically the section footer).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from engine.errors import LocalProtocolError, NeedData, RemoteProtocolError

from .constants import QEMU_VM_SUBSECTION

# Integer field types: wire format, and the JSON size QEMU reports.
_INT_FORMATS: dict[str, struct.Struct] = {
    "bool": struct.Struct(">B"),
    "uint8": struct.Struct(">B"),
    "uint16": struct.Struct(">H"),
    "uint32": struct.Struct(">I"),
    "uint64": struct.Struct(">Q"),
    "int8": struct.Struct(">b"),
    "int16": struct.Struct(">h"),
    "int32": struct.Struct(">i"),
    "int64": struct.Struct(">q"),
    # A QEMUTimer pointer travels as its be64 expiry time in ns, -1 if not armed.
    "timer": struct.Struct(">q"),
}
_BUFFER_TYPES = ("buffer", "unused_buffer")
FIELD_TYPES = tuple(_INT_FORMATS) + _BUFFER_TYPES

_BE32 = struct.Struct(">I")


def need(buf, pos: int, n: int, what: str) -> None:
    """Raise :class:`NeedData` unless ``buf`` holds ``n`` bytes from ``pos``."""
    if len(buf) - pos < n:
        raise NeedData(what, pos, pos + n)


@dataclass(frozen=True, slots=True)
class Field:
    """One vmstate field.

    ``type`` is one of :data:`FIELD_TYPES`.  Integers are big-endian; ``bool``
    is one byte.  ``array_len`` makes a fixed array (value: a sequence of that
    many items; decoded as a list).  ``buffer`` is ``size`` raw bytes;
    ``unused_buffer`` is ``size`` bytes written as zeros and skipped on load
    (it has no value).  ``version_id``: the field exists only in streams of
    at least that vmsd version (QEMU's ``VMSTATE_*_V``).
    """
    name: str
    type: str
    size: int | None = None
    array_len: int | None = None
    version_id: int = 0

    def __post_init__(self) -> None:
        if self.type not in FIELD_TYPES:
            raise ValueError(f"field {self.name!r}: unknown type {self.type!r}")
        if self.type in _BUFFER_TYPES:
            if not self.size or self.size < 0 or self.array_len is not None:
                raise ValueError(f"field {self.name!r}: {self.type} needs a size > 0 "
                                 "and no array_len")
        elif self.size not in (None, _INT_FORMATS[self.type].size):
            raise ValueError(f"field {self.name!r}: {self.type} has a fixed size")
        if self.array_len is not None and self.array_len < 1:
            raise ValueError(f"field {self.name!r}: array_len must be >= 1")

    @property
    def element_size(self) -> int:
        """Bytes of one element on the wire."""
        if self.type in _BUFFER_TYPES:
            return self.size  # type: ignore[return-value]
        return _INT_FORMATS[self.type].size

    @property
    def wire_size(self) -> int:
        """Bytes of the whole field on the wire."""
        return self.element_size * (self.array_len or 1)


@dataclass(frozen=True, slots=True)
class Subsection:
    """A subsection and the predicate deciding whether the sender writes it.

    ``needed`` receives the parent's values dict.
    """
    vmsd: "VMStateDescription"
    needed: Callable[[Mapping[str, Any]], bool]


def present(name: str) -> Callable[[Mapping[str, Any]], bool]:
    """A ``needed`` predicate: the subsection is sent when the values carry it."""
    return lambda values: name in values


@dataclass(frozen=True, slots=True)
class VMStateDescription:
    """A vmsd: ``name``, versions, ``fields`` in wire order and ``subsections``."""
    name: str
    version_id: int
    minimum_version_id: int
    fields: tuple[Field, ...]
    subsections: tuple[Subsection, ...] = ()

    # -- save ---------------------------------------------------------------
    def encode(self, values: Mapping[str, Any]) -> bytes:
        """The body of this vmsd at ``version_id``: fields, then needed subsections.

        Raises :class:`LocalProtocolError` for a missing or unencodable value.
        """
        out = bytearray()
        self._encode_into(out, values)
        return bytes(out)

    def _encode_into(self, out: bytearray, values: Mapping[str, Any]) -> None:
        for f in self.fields:
            if f.type == "unused_buffer":
                out += bytes(f.size)  # type: ignore[arg-type]
                continue
            try:
                value = values[f.name]
            except KeyError:
                raise LocalProtocolError(f"{self.name}: no value for field {f.name!r}") from None
            if f.array_len is None:
                _encode_item(out, self.name, f, value)
            else:
                if len(value) != f.array_len:
                    raise LocalProtocolError(
                        f"{self.name}: field {f.name!r} needs {f.array_len} items, "
                        f"got {len(value)}")
                for item in value:
                    _encode_item(out, self.name, f, item)
        for sub in self.subsections:
            if not sub.needed(values):
                continue
            name = sub.vmsd.name.encode()
            out.append(QEMU_VM_SUBSECTION)
            out.append(len(name))
            out += name
            out += _BE32.pack(sub.vmsd.version_id)
            sub.vmsd._encode_into(out, values.get(sub.vmsd.name, {}))

    # -- load ---------------------------------------------------------------
    def decode(self, buf, offset: int = 0,
               version_id: int | None = None) -> tuple[dict[str, Any], int]:
        """Parse a body from ``buf[offset:]`` written at ``version_id`` (default: ours).

        Returns ``(values, offset just past the body)``.  Raises
        :class:`RemoteProtocolError` (offset relative to ``buf``) for a
        version out of range or an unknown subsection, and :class:`NeedData`
        when ``buf`` ends first.
        """
        if version_id is None:
            version_id = self.version_id
        if version_id > self.version_id:
            raise RemoteProtocolError(
                f"{self.name}: incoming version_id {version_id} is too new for local "
                f"version_id {self.version_id}", offset=offset)
        if version_id < self.minimum_version_id:
            raise RemoteProtocolError(
                f"{self.name}: incoming version_id {version_id} is too old for local "
                f"minimum version_id {self.minimum_version_id}", offset=offset)
        values: dict[str, Any] = {}
        pos = offset
        for f in self.fields:
            if f.version_id > version_id:
                continue
            size = f.wire_size
            need(buf, pos, size, f"field {f.name!r} of {self.name!r} ({size} bytes)")
            if f.type in _BUFFER_TYPES:
                if f.type == "buffer":
                    values[f.name] = bytes(buf[pos:pos + size])
            elif f.array_len is None:
                values[f.name] = _decode_item(f, buf, pos)
            else:
                step = f.element_size
                values[f.name] = [_decode_item(f, buf, pos + i * step)
                                  for i in range(f.array_len)]
            pos += size
        return values, self._decode_subsections(buf, pos, values)

    def _decode_subsections(self, buf, pos: int, values: dict[str, Any]) -> int:
        prefix = self.name.encode()
        while True:
            # The peek: the caller's next byte may be anything, e.g. a footer.
            need(buf, pos, 1, f"subsection or end of {self.name!r}")
            if buf[pos] != QEMU_VM_SUBSECTION:
                return pos
            need(buf, pos, 2, f"subsection name length in {self.name!r}")
            n = buf[pos + 1]
            if n < len(prefix) + 1:
                return pos
            need(buf, pos, 2 + n, f"subsection name in {self.name!r}")
            raw = bytes(buf[pos + 2:pos + 2 + n])
            if not raw.startswith(prefix):
                return pos
            name = raw.decode("utf-8", "replace")
            sub = next((s.vmsd for s in self.subsections if s.vmsd.name == name), None)
            if sub is None:
                raise RemoteProtocolError(f"{self.name}: no subsection {name!r}", offset=pos)
            need(buf, pos, 6 + n, f"version of subsection {name!r}")
            (ver,) = _BE32.unpack_from(buf, pos + 2 + n)
            sub_values, pos = sub.decode(buf, pos + 6 + n, ver)
            values[name] = sub_values

    # -- vmdesc -------------------------------------------------------------
    def describe(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """This vmsd's part of a VMDESCRIPTION device entry, in QEMU's key order.

        ``{"vmsd_name", "version", "fields": [{"name", ["array_len",] "type",
        "size"}...], ["subsections": [...]]}``; ``size`` is the bytes of one
        element (QEMU describes an array by its first element).  A name used
        by several fields becomes ``name[i]``, as QEMU does.
        """
        counts: dict[str, int] = {}
        for f in self.fields:
            counts[f.name] = counts.get(f.name, 0) + 1
        seen: dict[str, int] = {}
        fields = []
        for f in self.fields:
            name = f.name
            if counts[name] > 1:
                name = f"{name}[{seen.get(f.name, 0)}]"
                seen[f.name] = seen.get(f.name, 0) + 1
            entry: dict[str, Any] = {"name": name}
            if f.array_len is not None and f.array_len > 1:
                entry["array_len"] = f.array_len
            entry["type"] = f.type
            entry["size"] = f.element_size
            fields.append(entry)
        desc: dict[str, Any] = {"vmsd_name": self.name, "version": self.version_id,
                                "fields": fields}
        subs = [s.vmsd.describe(values.get(s.vmsd.name, {}))
                for s in self.subsections if s.needed(values)]
        if subs:
            desc["subsections"] = subs
        return desc


def _encode_item(out: bytearray, vmsd: str, f: Field, value: Any) -> None:
    if f.type == "buffer":
        data = bytes(value)
        if len(data) != f.size:
            raise LocalProtocolError(
                f"{vmsd}: field {f.name!r} needs {f.size} bytes, got {len(data)}")
        out += data
        return
    if f.type == "bool":
        value = bool(value)
    try:
        out += _INT_FORMATS[f.type].pack(int(value))
    except (struct.error, TypeError, ValueError) as exc:
        raise LocalProtocolError(
            f"{vmsd}: field {f.name!r} ({f.type}) cannot hold {value!r}") from exc


def _decode_item(f: Field, buf, pos: int) -> Any:
    (value,) = _INT_FORMATS[f.type].unpack_from(buf, pos)
    return bool(value) if f.type == "bool" else value


__all__ = ["FIELD_TYPES", "Field", "Subsection", "VMStateDescription", "NeedData",
           "need", "present"]
