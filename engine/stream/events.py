"""What :class:`~engine.stream.decoder.StreamDecoder` yields, one value per wire element.

Events are small immutable records.  Offsets are bytes inside a RAMBlock,
lengths are bytes, ids are QEMU's.  ``NEED_DATA`` is returned (never raised)
when the decoder cannot finish the next element with the bytes it has - and
also, after ``feed_eof()``, once a stream has ended where it may end
(``decoder.finished`` then says so); where it may not, the decoder raises.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class _Sentinel(type):
    def __repr__(cls) -> str:
        return cls.__name__


def _make_sentinel(name: str) -> type:
    # A class that is its own type, so ``type(NEED_DATA) is NEED_DATA`` (h11's trick).
    cls = _Sentinel(name, (_Sentinel,), {})
    # mypy cannot express a class that is an instance of itself
    cls.__class__ = cls  # type: ignore[assignment]
    return cls


#: Returned by ``next_event()`` when more bytes must be fed first.
NEED_DATA = _make_sentinel("NEED_DATA")


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event of the main stream."""


# -- framing -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FileHeader(Event):
    """``QEVM`` magic and stream version (always 3 once accepted)."""
    version: int


@dataclass(frozen=True, slots=True)
class Configuration(Event):
    """The configuration section: source machine type and raw subsection bodies.

    ``subsections`` maps e.g. ``"configuration/capabilities"`` to its body
    bytes; see :func:`engine.stream.decoder.parse_config_capabilities`.
    """
    machine: str
    subsections: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SectionStart(Event):
    """Header of a START section of a live handler (only ``ram`` is understood)."""
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionPart(Event):
    section_id: int


@dataclass(frozen=True, slots=True)
class SectionEnd(Event):
    section_id: int


@dataclass(frozen=True, slots=True)
class SectionFooter(Event):
    """The footer closing a section (START, PART, END and FULL alike)."""
    section_id: int


@dataclass(frozen=True, slots=True)
class DeviceState(Event):
    """A FULL section decoded with its vmsd; its footer follows as SectionFooter."""
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Eof(Event):
    """``QEMU_VM_EOF``: the end of the device state."""


@dataclass(frozen=True, slots=True)
class VMDescription(Event):
    """The JSON trailer after EOF, parsed."""
    data: dict[str, Any]


# -- RAM -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RamBlockInfo:
    """One entry of the RAM block list, as the sender described it.

    ``page_size`` is only on the wire for postcopy with huge-page blocks,
    ``gpa`` (guest physical address) only with x-ignore-shared.
    """
    idstr: str
    used_length: int
    page_size: int | None = None
    gpa: int | None = None


@dataclass(frozen=True, slots=True)
class RamBlockList(Event):
    """A MEM_SIZE record: ``total`` bytes of RAM split into ``blocks``."""
    total: int
    blocks: tuple[RamBlockInfo, ...]


@dataclass(frozen=True, slots=True)
class RamPage(Event):
    """A PAGE record: ``data`` (TARGET_PAGE_SIZE bytes) belongs at ``offset`` of ``block``.

    ``data`` is a read-only memoryview into the decoder's buffer, not a copy.
    Treat it as valid only until the next ``feed()`` or ``next_event()`` call:
    apply or copy it before then.  (The decoder never overwrites bytes under a
    live view - it copies its buffer instead - so keeping views costs memory
    and time, never correctness.)
    """
    block: str
    offset: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class RamZero(Event):
    """A ZERO record: the page at ``offset`` of ``block`` is all zero."""
    block: str
    offset: int


@dataclass(frozen=True, slots=True, eq=False)
class RamPages(Event):
    """Consecutive PAGE records of one block, each continuing the one before.

    Yielded instead of :class:`RamPage` by a decoder made with
    ``page_runs=True``.  ``offsets`` is a 1-D uint64 array of byte offsets
    (as sent: any order, repeats allowed), ``data`` an ``(n, page_size)``
    uint8 array whose rows are the pages, a read-only view into the
    decoder's buffer with the same lifetime as :attr:`RamPage.data`.
    """
    block: str
    offsets: Any
    data: Any

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True, slots=True, eq=False)
class RamZeros(Event):
    """Consecutive ZERO records of one block (:class:`RamZero` in bulk, with
    ``page_runs=True``): ``offsets`` is a 1-D uint64 array of byte offsets."""
    block: str
    offsets: Any

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True, slots=True)
class RamXbzrle(Event):
    """An XBZRLE record: ``data`` is the encoding of the page at ``offset`` of
    ``block`` against the copy the receiver holds (a view with the lifetime
    of :attr:`RamPage.data`)."""
    block: str
    offset: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class RamFlush(Event):
    """MULTIFD_FLUSH: every multifd channel's pages so far must land before what follows."""


@dataclass(frozen=True, slots=True)
class RamEOS(Event):
    """EOS: the end of this section's RAM records (the footer comes next)."""


# -- commands --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Command(Event):
    """Base of the QEMU_VM_COMMAND events."""


@dataclass(frozen=True, slots=True)
class OpenReturnPath(Command):
    pass


@dataclass(frozen=True, slots=True)
class Ping(Command):
    """PING: answer with a return-path PONG carrying ``value``."""
    value: int


@dataclass(frozen=True, slots=True)
class PostcopyAdvise(Command):
    """POSTCOPY_ADVISE; both fields are None in the 0-byte (dirty bitmaps only) form.

    ``page_size_summary`` is the OR of every migrated block's page size (bytes),
    ``target_page_size`` the source's TPS (bytes).
    """
    page_size_summary: int | None
    target_page_size: int | None


@dataclass(frozen=True, slots=True)
class PostcopyListen(Command):
    pass


@dataclass(frozen=True, slots=True)
class PostcopyRun(Command):
    pass


@dataclass(frozen=True, slots=True)
class PostcopyRamDiscard(Command):
    """Drop these ``(start, length)`` byte ranges of ``block``."""
    block: str
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Packaged(Command):
    """A PACKAGED blob: a nested stream without file header.

    Parse it with ``StreamDecoder(..., expect_header=False)``.
    """
    data: bytes


@dataclass(frozen=True, slots=True)
class EnableColo(Command):
    pass


@dataclass(frozen=True, slots=True)
class PostcopyResume(Command):
    pass


@dataclass(frozen=True, slots=True)
class RecvBitmap(Command):
    """Ask the destination for its received bitmap of ``block``."""
    block: str


@dataclass(frozen=True, slots=True)
class SwitchoverStart(Command):
    pass


__all__ = [
    "NEED_DATA", "Event", "FileHeader", "Configuration", "SectionStart", "SectionPart",
    "SectionEnd", "SectionFooter", "DeviceState", "Eof", "VMDescription",
    "RamBlockInfo", "RamBlockList", "RamPage", "RamZero", "RamPages", "RamZeros", "RamXbzrle",
    "RamFlush", "RamEOS",
    "Command", "OpenReturnPath", "Ping", "PostcopyAdvise", "PostcopyListen",
    "PostcopyRun", "PostcopyRamDiscard", "Packaged", "EnableColo", "PostcopyResume",
    "RecvBitmap", "SwitchoverStart",
]
