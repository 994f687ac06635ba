"""Bytes of the main stream, element by element (the writing half of the codec).

Pure functions: each returns the exact bytes QEMU would write for one
element.  Concatenate them in the order of spec 1.5 (header, configuration,
commands, sections, EOF, VMDESCRIPTION).  RAM records depend on the previous
record's block (``CONTINUE``), so they come from a :class:`RamRecordEncoder`
kept per channel.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from engine.errors import LocalProtocolError

from .constants import (
    ENCODING_FLAG_XBZRLE, MAX_DISCARDS_PER_COMMAND, MAX_VM_CMD_PACKAGED_SIZE,
    POSTCOPY_RAM_DISCARD_VERSION,
    QEMU_VM_COMMAND, QEMU_VM_CONFIGURATION, QEMU_VM_EOF, QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION, QEMU_VM_SECTION_END, QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START, QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION, RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE, RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_ZERO, RAM_SECTION_IDSTR, RAM_SECTION_VERSION,
    TARGET_PAGE_SIZE, MigCmd,
)

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_HEADER = struct.Struct(">II")
_SHORT_SECTION = struct.Struct(">BI")       # tag, section id (PART, END, footer)
_COMMAND = struct.Struct(">BHH")           # tag, cmd, len
_CONFIG_SUB_VERSION = 1


def cstr8(text: str) -> bytes:
    """QEMU's counted string: one length byte, then at most 255 bytes, no NUL."""
    raw = text.encode()
    if len(raw) > 255:
        raise LocalProtocolError(f"name {text!r} is longer than 255 bytes")
    return bytes((len(raw),)) + raw


# -- framing ----------------------------------------------------------------------

def file_header() -> bytes:
    """``QEVM`` magic and version 3."""
    return _HEADER.pack(QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)


def configuration(machine: str, subsections: Mapping[str, bytes] | None = None) -> bytes:
    """The configuration section: machine type name, then subsections.

    ``subsections`` maps a full name (``"configuration/capabilities"``) to its
    body (see :func:`config_capabilities`, :func:`config_uuid`,
    :func:`config_target_page_bits`); each is written at version 1.
    """
    name = machine.encode()
    out = bytearray((QEMU_VM_CONFIGURATION,))
    out += _BE32.pack(len(name)) + name
    for sub, body in (subsections or {}).items():
        out.append(QEMU_VM_SUBSECTION)
        out += cstr8(sub) + _BE32.pack(_CONFIG_SUB_VERSION) + body
    return bytes(out)


def config_target_page_bits(bits: int) -> bytes:
    """Body of ``configuration/target-page-bits``."""
    return _BE32.pack(bits)


def config_capabilities(names: Iterable[str]) -> bytes:
    """Body of ``configuration/capabilities``: be32 count, then cstr8 names."""
    names = list(names)
    return _BE32.pack(len(names)) + b"".join(cstr8(n) for n in names)


def config_uuid(uuid: bytes) -> bytes:
    """Body of ``configuration/uuid``: the 16 raw bytes."""
    if len(uuid) != 16:
        raise LocalProtocolError(f"a UUID is 16 bytes, got {len(uuid)}")
    return bytes(uuid)


def _full_header(tag: int, section_id: int, idstr: str, instance_id: int,
                 version_id: int) -> bytes:
    return (_SHORT_SECTION.pack(tag, section_id) + cstr8(idstr)
            + _HEADER.pack(instance_id, version_id))


def section_start(section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    """Header of a START section (the body and footer follow)."""
    return _full_header(QEMU_VM_SECTION_START, section_id, idstr, instance_id, version_id)


def section_part(section_id: int) -> bytes:
    """Header of a PART section."""
    return _SHORT_SECTION.pack(QEMU_VM_SECTION_PART, section_id)


def section_end(section_id: int) -> bytes:
    """Header of an END section."""
    return _SHORT_SECTION.pack(QEMU_VM_SECTION_END, section_id)


def section_footer(section_id: int) -> bytes:
    """The footer closing every section."""
    return _SHORT_SECTION.pack(QEMU_VM_SECTION_FOOTER, section_id)


def section_full(section_id: int, idstr: str, instance_id: int, version_id: int,
                 body: bytes) -> bytes:
    """A whole FULL section: header, ``body`` (e.g. ``vmsd.encode(values)``), footer."""
    return (_full_header(QEMU_VM_SECTION_FULL, section_id, idstr, instance_id, version_id)
            + body + section_footer(section_id))


def eof() -> bytes:
    """``QEMU_VM_EOF``."""
    return bytes((QEMU_VM_EOF,))


def vmdescription(obj: Mapping[str, Any]) -> bytes:
    """The VMDESCRIPTION trailer: tag, be32 length, JSON.

    ``json.dumps`` with its default separators writes exactly what QEMU's
    JSON writer does (``", "`` and ``": "``, ASCII escapes), so a trailer
    built by :func:`engine.stream.vmdesc.build_vmdesc` matches QEMU byte for byte.
    """
    data = json.dumps(obj).encode("ascii")
    return bytes((QEMU_VM_VMDESCRIPTION,)) + _BE32.pack(len(data)) + data


# -- RAM section ---------------------------------------------------------------------

def ram_block_list(blocks: Sequence[tuple[str, int]],
                   page_sizes: Mapping[str, int] | None = None,
                   gpas: Mapping[str, int] | None = None) -> bytes:
    """The MEM_SIZE record opening a RAM START section body.

    ``blocks`` are ``(idstr, used_length)`` in list order.  ``page_sizes``
    gives the blocks whose page size goes on the wire (postcopy-ram with a
    page size other than the host's); ``gpas`` the guest physical addresses
    (x-ignore-shared).  Both are written only for the blocks they name.
    """
    total = sum(length for _, length in blocks)
    out = bytearray(_BE64.pack(total | RAM_SAVE_FLAG_MEM_SIZE))
    for idstr, length in blocks:
        out += cstr8(idstr) + _BE64.pack(length)
        if page_sizes and idstr in page_sizes:
            out += _BE64.pack(page_sizes[idstr])
        if gpas and idstr in gpas:
            out += _BE64.pack(gpas[idstr])
    return bytes(out)


def ram_eos() -> bytes:
    """The EOS record ending every RAM section body."""
    return _BE64.pack(RAM_SAVE_FLAG_EOS)


def ram_flush() -> bytes:
    """A MULTIFD_FLUSH record (QEMU >= 8.0 only: a 7.2 destination refuses it)."""
    return _BE64.pack(RAM_SAVE_FLAG_MULTIFD_FLUSH)


def ram_setup_section(section_id: int, blocks: Sequence[tuple[str, int]],
                      page_sizes: Mapping[str, int] | None = None,
                      gpas: Mapping[str, int] | None = None, flush: bool = False) -> bytes:
    """The whole RAM START section as QEMU writes it at setup.

    ``flush`` adds the MULTIFD_FLUSH of a modern multifd source.
    """
    return (section_start(section_id, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION)
            + ram_block_list(blocks, page_sizes, gpas)
            + (ram_flush() if flush else b"") + ram_eos() + section_footer(section_id))


class RamRecordEncoder:
    """RAM page records of one channel, naming the block only when it changes.

    QEMU tracks the last block sent per channel; a record for the same block
    sets ``CONTINUE`` and omits the name.  Call :meth:`reset` where QEMU
    resets it (migration start, block list change, postcopy discard,
    recovery).  Offsets are bytes inside the block, page aligned.
    """

    def __init__(self, page_size: int = TARGET_PAGE_SIZE):
        self.page_size = page_size
        self.last_block: str | None = None

    def reset(self) -> None:
        """Forget the previous block: the next record names its block."""
        self.last_block = None

    def _check(self, offset: int) -> None:
        if offset % self.page_size or not 0 <= offset < 1 << 64:
            raise LocalProtocolError(f"RAM offset {offset:#x} is not a page-aligned u64")

    def _header(self, block: str, offset: int, flag: int) -> bytes:
        self._check(offset)
        if block == self.last_block:
            return _BE64.pack(offset | flag | RAM_SAVE_FLAG_CONTINUE)
        name = cstr8(block)
        self.last_block = block
        return _BE64.pack(offset | flag) + name

    def page_header(self, block: str, offset: int) -> bytes:
        """Header of a PAGE record (8 bytes, or 9 + name length); the page follows."""
        return self._header(block, offset, RAM_SAVE_FLAG_PAGE)

    def page(self, block: str, offset: int, data) -> bytes:
        """A whole PAGE record."""
        if len(data) != self.page_size:
            raise LocalProtocolError(f"a page is {self.page_size} bytes, got {len(data)}")
        return self.page_header(block, offset) + bytes(data)

    def zero_page(self, block: str, offset: int) -> bytes:
        """A whole ZERO record: header and the fill byte 0."""
        return self._header(block, offset, RAM_SAVE_FLAG_ZERO) + b"\0"

    def xbzrle_page(self, block: str, offset: int, encoding) -> bytes:
        """A whole XBZRLE record: header, ENCODING_FLAG_XBZRLE, be16 length, encoding."""
        if len(encoding) > 0xFFFF:
            raise LocalProtocolError(f"an XBZRLE encoding of {len(encoding)} bytes")
        return (self._header(block, offset, RAM_SAVE_FLAG_XBZRLE)
                + bytes((ENCODING_FLAG_XBZRLE,)) + len(encoding).to_bytes(2, "big")
                + bytes(encoding))

    # -- vectorised forms: one call per batch of pages of one block ----------------
    def record_words(self, block: str, offsets, flag: int) -> tuple[np.ndarray, bytes]:
        """Address words (big-endian uint64) of records at ``offsets`` and the
        counted name that must follow the first one (``b""`` if CONTINUE).

        For callers that lay records out themselves (the RAM saver gathers
        pages straight into its own record array).
        """
        offs = np.asarray(offsets, dtype=np.uint64)
        if offs.ndim != 1:
            raise LocalProtocolError("offsets must be a 1-d array")
        if offs.size and np.any(offs % np.uint64(self.page_size)):
            raise LocalProtocolError("RAM offsets must be page aligned")
        words = (offs | np.uint64(flag | RAM_SAVE_FLAG_CONTINUE)).astype(">u8")
        first = b""
        if offs.size and block != self.last_block:
            words[0] = offs[0] | np.uint64(flag)
            first = cstr8(block)
        if offs.size:
            self.last_block = block
        return words, first

    def page_headers(self, block: str, offsets) -> list[bytes]:
        """Headers for PAGE records of ``block`` at ``offsets`` (a 1-d integer array).

        The first names the block unless it was the previous one; the rest
        are CONTINUE headers of 8 bytes.  Interleave them with the pages.
        """
        words, first = self.record_words(block, offsets, RAM_SAVE_FLAG_PAGE)
        packed = words.tobytes()
        heads = [packed[i:i + 8] for i in range(0, len(packed), 8)]
        if heads and first:
            heads[0] += first
        return heads

    def pages(self, block: str, offsets, data) -> bytearray:
        """PAGE records for ``block``: ``data`` is ``(len(offsets), page_size)`` uint8.

        One buffer holding every record, built with two numpy copies.
        """
        pages = np.asarray(data, dtype=np.uint8).reshape(-1, self.page_size)
        words, first = self.record_words(block, offsets, RAM_SAVE_FLAG_PAGE)
        n = len(words)
        if pages.shape[0] != n:
            raise LocalProtocolError(f"{n} offsets but {pages.shape[0]} pages")
        rec = 8 + self.page_size
        out = bytearray(n * rec + len(first))
        if n == 0:
            return out
        # The first record may carry the block name; the others have one shape.
        _BE64.pack_into(out, 0, int(words[0]))
        out[8:8 + len(first)] = first
        head = 8 + len(first)
        out[head:head + self.page_size] = pages[0].tobytes()
        rest = np.frombuffer(out, dtype=np.uint8, offset=head + self.page_size)
        rest = rest.reshape(n - 1, rec)
        rest[:, :8] = words[1:].view(np.uint8).reshape(-1, 8)
        rest[:, 8:] = pages[1:]
        return out

    def zero_pages(self, block: str, offsets) -> bytes:
        """ZERO records (9 bytes each, the first possibly naming the block)."""
        words, first = self.record_words(block, offsets, RAM_SAVE_FLAG_ZERO)
        n = len(words)
        if n == 0:
            return b""
        recs = np.zeros((n, 9), dtype=np.uint8)
        recs[:, :8] = words.view(np.uint8).reshape(-1, 8)
        raw = recs.tobytes()
        return raw[:8] + first + raw[8:]


# -- commands --------------------------------------------------------------------------

def command(cmd: int, payload: bytes = b"") -> bytes:
    """A QEMU_VM_COMMAND: tag, be16 cmd, be16 len, payload."""
    if len(payload) > 0xFFFF:
        raise LocalProtocolError(f"command {cmd} payload of {len(payload)} bytes is too long")
    return _COMMAND.pack(QEMU_VM_COMMAND, cmd, len(payload)) + bytes(payload)


def open_return_path() -> bytes:
    return command(MigCmd.MIG_CMD_OPEN_RETURN_PATH)


def ping(value: int) -> bytes:
    """PING; the destination answers PONG with the same be32 ``value``."""
    return command(MigCmd.MIG_CMD_PING, _BE32.pack(value))


def postcopy_advise(page_size_summary: int | None = None, tps: int | None = None) -> bytes:
    """POSTCOPY_ADVISE; with no arguments the 0-byte form (dirty bitmaps only)."""
    if page_size_summary is None and tps is None:
        return command(MigCmd.MIG_CMD_POSTCOPY_ADVISE)
    if page_size_summary is None or tps is None:
        raise LocalProtocolError("POSTCOPY_ADVISE needs both page sizes or neither")
    return command(MigCmd.MIG_CMD_POSTCOPY_ADVISE, _BE64.pack(page_size_summary)
                   + _BE64.pack(tps))


def postcopy_listen() -> bytes:
    return command(MigCmd.MIG_CMD_POSTCOPY_LISTEN)


def postcopy_run() -> bytes:
    return command(MigCmd.MIG_CMD_POSTCOPY_RUN)


def postcopy_ram_discard(block: str, ranges: Sequence[tuple[int, int]]) -> bytes:
    """POSTCOPY_RAM_DISCARD commands dropping ``(start, length)`` byte ranges of ``block``.

    At most 12 ranges fit one command; more are split over several.  No
    ranges, no bytes.
    """
    name = block.encode()
    if len(name) > 255:
        raise LocalProtocolError(f"block name {block!r} is longer than 255 bytes")
    head = bytes((POSTCOPY_RAM_DISCARD_VERSION, len(name))) + name + b"\0"
    out = bytearray()
    for i in range(0, len(ranges), MAX_DISCARDS_PER_COMMAND):
        body = b"".join(_BE64.pack(s) + _BE64.pack(n)
                        for s, n in ranges[i:i + MAX_DISCARDS_PER_COMMAND])
        out += command(MigCmd.MIG_CMD_POSTCOPY_RAM_DISCARD, head + body)
    return bytes(out)


def packaged(blob: bytes) -> bytes:
    """PACKAGED: the command carrying the blob length, then the blob itself."""
    if len(blob) > MAX_VM_CMD_PACKAGED_SIZE:
        raise LocalProtocolError(f"package of {len(blob)} bytes is too large")
    return command(MigCmd.MIG_CMD_PACKAGED, _BE32.pack(len(blob))) + bytes(blob)


def enable_colo() -> bytes:
    return command(MigCmd.MIG_CMD_ENABLE_COLO)


def postcopy_resume() -> bytes:
    return command(MigCmd.MIG_CMD_POSTCOPY_RESUME)


def recv_bitmap(block: str) -> bytes:
    """RECV_BITMAP: ask for the destination's received bitmap of ``block``."""
    return command(MigCmd.MIG_CMD_RECV_BITMAP, cstr8(block))


def switchover_start() -> bytes:
    """SWITCHOVER_START (QEMU >= 10.0; a 7.2 destination refuses it)."""
    return command(MigCmd.MIG_CMD_SWITCHOVER_START)


__all__ = [
    "cstr8", "file_header", "configuration", "config_target_page_bits",
    "config_capabilities", "config_uuid", "section_start", "section_part", "section_end",
    "section_footer", "section_full", "eof", "vmdescription", "ram_block_list", "ram_eos",
    "ram_flush", "ram_setup_section", "RamRecordEncoder", "command", "open_return_path",
    "ping", "postcopy_advise", "postcopy_listen", "postcopy_run", "postcopy_ram_discard",
    "packaged", "enable_colo", "postcopy_resume", "recv_bitmap", "switchover_start",
]
