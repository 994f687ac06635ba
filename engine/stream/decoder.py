"""The main stream, bytes in, events out (the reading half of the codec; sans-I/O).

Theory of operation
-------------------
The stream has no framing: the only way to find an element's end is to parse
it.  The grammar, as a QEMU destination reads it::

    stream   := header [configuration] element* EOF [VMDESCRIPTION]
    element  := START ram-body footer | PART ram-body footer
              | END ram-body footer   | FULL vmstate-body footer | COMMAND
    ram-body := record* EOS          (a record is MEM_SIZE, ZERO, PAGE or FLUSH)

A PACKAGED blob is itself a stream without header, ending anywhere an
element may end; parse it with a second decoder made with
``expect_header=False``.

The decoder is a small state machine: each :class:`_State` names what it
waits for, and ``StreamDecoder._readers`` maps it to the reader of that
element.  Every *element* - a header, a whole FULL section, one RAM record,
one command with its PACKAGED blob - is parsed atomically: when the buffer
ends inside one, nothing is consumed and ``next_event()`` returns NEED_DATA;
the element is parsed again from its first byte once more bytes arrive.
After ``feed_eof()`` the same situation is a truncated stream and raises
:class:`RemoteProtocolError`.  Any error is final: the decoder raises it again
on every later call.

Speed: bytes are appended to one store, consumed by index; when it is full
the unconsumed tail moves to a new one (:meth:`StreamDecoder._room`).  A
transport can receive straight into the store (:meth:`StreamDecoder.get_buffer`,
:meth:`StreamDecoder.buffer_updated`) instead of handing bytes to
:meth:`StreamDecoder.feed`, which copies them.  A PAGE record becomes a
:class:`RamPage` whose data is a read-only memoryview slice of the store (no
copy).  PAGE|CONTINUE
records, nearly all of a precopy stream, take a short path through
:meth:`StreamDecoder.next_event`.  With ``page_runs=True`` they do not come one
by one at all: every run of PAGE|CONTINUE (or ZERO|CONTINUE) records that is
whole in the buffer is checked with a few array operations (flags, bounds,
fill bytes) and yielded as one :class:`RamPages` (:class:`RamZeros`) whose
pages are a strided view of the buffer, so a receiver lands a run with one
array assignment instead of one Python step per page.  A record the array
check refuses ends the run, and the per-record reader then takes it (and
raises the error it deserves).
"""
from __future__ import annotations

import struct
from collections import deque
from enum import Enum
from typing import Callable, Iterable

import numpy as np

from engine.errors import LocalProtocolError, RemoteProtocolError

from .constants import (
    CONFIGURATION_VMSD_NAME, ENCODING_FLAG_XBZRLE, MIG_CMD_LEN, MIG_CMD_MAX,
    POSTCOPY_ADVISE_LEN, QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION, QEMU_VM_EOF, QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT, QEMU_VM_SECTION_END, QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START, QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION, RAM_SAVE_FLAG_COMPRESS_PAGE, RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_FULL, RAM_SAVE_FLAG_HOOK, RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO, RAM_SECTION_IDSTR, RAM_SECTION_VERSION,
    TARGET_PAGE_SIZE, MigCmd,
)
from .events import (
    NEED_DATA, Configuration, DeviceState, EnableColo, Eof, Event, FileHeader,
    OpenReturnPath, Packaged, Ping, PostcopyAdvise, PostcopyListen, PostcopyResume, PostcopyRun,
    RamBlockInfo, RamBlockList, RamEOS, RamFlush, RamPage, RamPages, RamXbzrle, RamZero,
    RamZeros, RecvBitmap, SectionEnd, SectionFooter, SectionPart, SectionStart,
    SwitchoverStart, VMDescription,
)
from .payloads import parse_config_capabilities, parse_discard
from .vmdesc import parse_vmdesc
from .vmstate import NeedData, VMStateDescription, need

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_HEADER = struct.Struct(">II")
_COMMAND = struct.Struct(">HH")
_FOOTER = struct.Struct(">BI")

_PAGE_CONTINUE = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
_ZERO_CONTINUE = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
#: records one RamPages/RamZeros event may hold (16 MiB of pages at most)
MAX_RUN_RECORDS = 4096
#: smallest store the decoder allocates, bytes
_MIN_STORE = 64 << 10
_NO_STORE = np.empty(0, np.uint8)

_UNSUPPORTED_RAM_FLAGS = {
    RAM_SAVE_FLAG_FULL: "FULL",
    RAM_SAVE_FLAG_HOOK: "HOOK",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
}

#: RAM records that never continue a block (EOS and FLUSH carry no address either)
_NO_CONTINUE = frozenset({RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SAVE_FLAG_MEM_SIZE})

# The configuration subsections QEMU defines (see _config_body_len for their bodies).
_CONFIG_SUBSECTIONS = ("configuration/target-page-bits", "configuration/capabilities",
                       "configuration/uuid")

VmsdLookup = Callable[[str, int], "VMStateDescription | None"]


class _State(Enum):
    HEADER = "file header"
    CONFIGURATION = "configuration section"
    TOP = "section type"
    RAM = "RAM record"
    FOOTER = "section footer"
    AFTER_EOF = "VMDESCRIPTION or end of stream"
    DONE = "end of stream"


#: States in which the input may end cleanly (the others: truncated stream).
#: TOP is one only for a nested (PACKAGED) stream.
_MAY_END = frozenset({_State.AFTER_EOF, _State.DONE})


class StreamDecoder:
    """Incremental decoder of one QEMU main-stream channel.

    ``lookup_vmsd(idstr, instance_id)`` gives the vmsd of a FULL section (None:
    unknown device, an error).  ``page_size`` is the target page size (bytes).
    ``channel`` names the channel in errors.  ``expect_header=False`` parses a
    PACKAGED blob (no header, no configuration, may end between elements).

    Keyword options for the less common setups:

    * ``require_configuration`` - refuse a stream without configuration
      section (QEMU's default ``send-configuration=on``);
    * ``section_footers`` - sections end with a footer (``send-section-footer``);
    * ``host_page_size`` and ``block_page_size(idstr)`` - after a 16-byte
      POSTCOPY_ADVISE, a block list entry carries a page size iff the local
      block's page size differs from the host's (default: it never does);
    * ``ignore_shared`` - x-ignore-shared: block list entries carry the
      guest physical address;
    * ``ram_records_only`` with ``ram_blocks`` - a channel of bare RAM records
      (the postcopy preempt channel): no header, no sections, the blocks come
      from the main channel's block list; an EOS ends it;
    * ``page_runs`` - yield PAGE and ZERO records as :class:`RamPages` and
      :class:`RamZeros` runs (a run of one for a record that names its block)
      instead of one :class:`RamPage` / :class:`RamZero` each.

    Feed bytes with :meth:`feed`, signal the end with :meth:`feed_eof`, and
    pull events with :meth:`next_event` until it returns ``NEED_DATA``.  After
    ``feed_eof()`` a stream cut short raises; one that ended where it may
    returns ``NEED_DATA`` with :attr:`finished` true.
    """

    def __init__(self, lookup_vmsd: VmsdLookup, *, page_size: int = TARGET_PAGE_SIZE,
                 channel: str = "main", expect_header: bool = True,
                 require_configuration: bool = True, section_footers: bool = True,
                 host_page_size: int | None = None,
                 block_page_size: Callable[[str], int] | None = None,
                 ignore_shared: bool = False, ram_records_only: bool = False,
                 ram_blocks: Iterable[RamBlockInfo] = (), page_runs: bool = False):
        if page_size <= 0 or page_size & (page_size - 1) or page_size > 1 << 30:
            raise ValueError(f"page_size {page_size} is not a power of two")
        self._lookup_vmsd = lookup_vmsd
        self._page_size = page_size
        self._flag_mask = page_size - 1
        self._channel = channel
        self._nested = not expect_header
        self._require_configuration = require_configuration
        self._footers = section_footers
        self._host_page_size = host_page_size or page_size
        self._block_page_size = block_page_size
        self._ignore_shared = ignore_shared
        self._page_runs = page_runs

        self._store = _NO_STORE  # the bytes: _store[_pos:_end] are not consumed yet
        self._mv = self._store.data
        self._pos = 0            # consumed bytes of _store
        self._end = 0            # bytes of _store holding data
        self._base = 0           # stream offset of _store[0]
        self._data: memoryview | None = None    # read-only view of _store[:_end]
        self._eof = False
        self._wait_for = 0       # stream offset the buffer must reach before a retry
        self._error: RemoteProtocolError | None = None
        self._pending: deque[Event] = deque()

        self._records_only = ram_records_only
        if ram_records_only:
            self._state = _State.RAM
        else:
            self._state = _State.HEADER if expect_header else _State.TOP
        self._ram_sections: dict[int, str] = {}   # section id -> idstr of live sections
        self._section: int | None = None          # section whose body is being read
        self._blocks: dict[str, RamBlockInfo] = {b.idstr: b for b in ram_blocks}
        self._last_block: RamBlockInfo | None = None
        self._postcopy_advised = False

        self._readers = {
            _State.HEADER: self._read_header,
            _State.CONFIGURATION: self._read_configuration,
            _State.TOP: self._read_top,
            _State.RAM: self._read_ram_record,
            _State.FOOTER: self._read_footer,
            _State.AFTER_EOF: self._read_vmdescription,
            _State.DONE: self._read_after_end,
        }

    # -- input -----------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Bytes of the stream consumed so far (the offset of the next element)."""
        return self._base + self._pos

    @property
    def ram_blocks(self) -> dict[str, RamBlockInfo]:
        """The RAM blocks of the latest block list, by idstr (a copy)."""
        return dict(self._blocks)

    @property
    def postcopy_advised(self) -> bool:
        """Whether a POSTCOPY_ADVISE with page sizes (postcopy-ram) was read."""
        return self._postcopy_advised

    @property
    def finished(self) -> bool:
        """True once ``feed_eof()`` was called and every byte was consumed where the
        stream may end: after EOF, after the VMDESCRIPTION, between elements of a
        PACKAGED blob, between records of a records-only channel.
        ``next_event()`` then returns NEED_DATA."""
        if not self._eof or self._pos != self._end:
            return False
        if self._records_only:
            return True
        return self._state in _MAY_END or (self._nested and self._state is _State.TOP)

    def feed(self, data) -> None:
        """Append bytes (any buffer) received from the channel."""
        if self._eof:
            raise LocalProtocolError("feed() after feed_eof()", channel=self._channel)
        data = memoryview(data).cast("B")
        n = len(data)
        if not n:
            return
        self._room(n)
        self._mv[self._end:self._end + n] = data
        self._end += n
        self._data = None

    def get_buffer(self, size: int) -> memoryview:
        """A writable view of ``size`` bytes after what the decoder holds: a
        transport receives straight into it (``recv_into``) and then calls
        :meth:`buffer_updated`, saving the copy :meth:`feed` makes.  Valid
        until that call (as asyncio's ``BufferedProtocol.get_buffer``)."""
        if self._eof:
            raise LocalProtocolError("get_buffer() after feed_eof()", channel=self._channel)
        self._room(size)
        return self._mv[self._end:self._end + size]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were written at the start of the last :meth:`get_buffer`."""
        if nbytes < 0 or self._end + nbytes > len(self._store):
            raise LocalProtocolError(f"buffer_updated({nbytes}) past the buffer",
                                     channel=self._channel)
        self._end += nbytes
        self._data = None

    def _room(self, nbytes: int) -> None:
        """Make room for ``nbytes`` more after the data.

        A full store is never reused: events may still hold views of the
        bytes already consumed (a RamPage's data, a RamPages run), and those
        must not change under them.  So the unconsumed tail (usually less
        than one record) moves to a new store, and the old one lives as long
        as some view of it does.  np.empty: no time spent zeroing bytes that
        are about to be overwritten.
        """
        if self._end + nbytes <= len(self._store):
            return
        tail = self._end - self._pos
        store = np.empty(max(2 * (tail + nbytes), _MIN_STORE), np.uint8)
        store[:tail] = self._store[self._pos:self._end]
        self._base += self._pos
        self._pos, self._end = 0, tail
        self._store, self._mv = store, store.data
        self._data = None

    def _view(self) -> memoryview:
        """The bytes held, read-only (what the readers parse)."""
        data = self._data
        if data is None:
            data = self._data = self._mv[:self._end].toreadonly()
        return data

    def feed_eof(self) -> None:
        """The channel ended: no more bytes will come."""
        self._eof = True

    def restart_channel(self) -> None:
        """Go on reading the same stream from a new channel (postcopy recovery).

        What the broken channel left half-parsed is dropped, offsets count
        from the new channel's start, and the previous-block memory is
        forgotten (the resumed source names the block again); the RAM block
        list, the live sections and the ADVISE survive.  The resumed source
        sends no header, so parsing starts between elements.
        """
        self._store = _NO_STORE
        self._mv = self._store.data
        self._data = None
        self._pos = self._end = self._base = self._wait_for = 0
        self._eof = False
        self._error = None
        self._pending.clear()
        self._section = None
        self._last_block = None
        self._state = _State.RAM if self._records_only else _State.TOP

    # -- output ----------------------------------------------------------------------
    def next_event(self):
        """The next event, or ``NEED_DATA`` (more bytes needed, or :attr:`finished`).

        Raises :class:`RemoteProtocolError` (with the stream offset) for
        malformed or truncated input; after that the decoder is unusable.
        """
        if self._pending:
            return self._pending.popleft()
        if self._error is not None:
            raise self._error
        if self._state is _State.RAM and self._page_runs:
            run = self._ram_run()
            if run is not None:
                return run
        elif self._state is _State.RAM:
            # Short path for the common record: PAGE|CONTINUE within bounds.
            pos = self._pos
            end = pos + 8 + self._page_size
            block = self._last_block
            if end <= self._end and block is not None:
                buf = self._view()
                (word,) = _BE64.unpack_from(buf, pos)
                flags = word & self._flag_mask
                if flags == _PAGE_CONTINUE and (word ^ flags) < block.used_length \
                        and block.used_length - (word ^ flags) >= self._page_size:
                    self._pos = end
                    return RamPage(block.idstr, word ^ flags, buf[pos + 8:end])
        if self._base + self._end < self._wait_for and not self._eof:
            return NEED_DATA    # the element being assembled is still incomplete
        while True:
            buf, pos = self._view(), self._pos
            if pos == len(buf):
                if not self._eof:
                    return NEED_DATA
                if self.finished:
                    return NEED_DATA
                raise self._fail(f"stream truncated: expected {self._state.value}", pos)
            try:
                events = self._readers[self._state](buf, pos)
            except NeedData as exc:
                if not self._eof:
                    self._wait_for = self._base + exc.end
                    return NEED_DATA
                raise self._fail(f"stream truncated: expected {exc.what}", exc.offset) from None
            except RemoteProtocolError as exc:
                at = exc.offset if exc.offset is not None else pos
                raise self._fail(exc.message, at) from None
            if events:
                if len(events) > 1:
                    self._pending.extend(events[1:])
                return events[0]

    def _ram_run(self) -> RamPages | RamZeros | None:
        """``page_runs``: the run of PAGE|CONTINUE (or ZERO|CONTINUE) records at
        the cursor, as far as it is whole in the buffer and valid; None when
        the next record is not one of those (the per-record reader takes it)."""
        block = self._last_block
        pos = self._pos
        avail = self._end - pos
        if block is None or avail < 8:
            return None
        buf = self._view()
        (word,) = _BE64.unpack_from(buf, pos)
        kind = word & self._flag_mask
        ps = self._page_size
        if kind == _PAGE_CONTINUE:
            stride = 8 + ps
        elif kind == _ZERO_CONTINUE:
            stride = 9
        else:
            return None
        n = min(avail // stride, MAX_RUN_RECORDS)
        if n == 0:
            return None
        words = np.ndarray((n,), dtype=">u8", buffer=buf, offset=pos,
                           strides=(stride,)).astype(np.uint64)
        flags = words & np.uint64(self._flag_mask)
        offsets = words ^ flags
        ok = (flags == np.uint64(kind)) & (offsets <= np.uint64(block.used_length - ps))
        if kind == _ZERO_CONTINUE:
            fill = np.ndarray((n,), dtype=np.uint8, buffer=buf, offset=pos + 8,
                              strides=(stride,))
            ok &= fill == 0
        if not ok.all():
            n = int(np.argmin(ok))
            if n == 0:
                return None     # the per-record reader says what is wrong with it
            offsets = offsets[:n]
        self._pos = pos + n * stride
        if kind == _ZERO_CONTINUE:
            return RamZeros(block.idstr, offsets)
        data = np.ndarray((n, ps), dtype=np.uint8, buffer=buf, offset=pos + 8,
                          strides=(stride, 1))
        data.flags.writeable = False
        return RamPages(block.idstr, offsets, data)

    def _fail(self, message: str, buf_offset: int) -> RemoteProtocolError:
        offset = self._base + buf_offset
        err = RemoteProtocolError(f"{message} at offset {offset}", channel=self._channel)
        err.offset = offset
        self._error = err
        return err

    def _page_view(self, start: int, end: int) -> memoryview:
        return self._view()[start:end]

    # -- readers: each parses one element from buf[pos:] and commits only at its end ---
    # They return the events and set self._pos; errors carry offsets into buf.

    def _read_header(self, buf, pos: int) -> list[Event]:
        need(buf, pos, 8, "file header (8 bytes)")
        magic, version = _HEADER.unpack_from(buf, pos)
        if magic != QEMU_VM_FILE_MAGIC:
            raise RemoteProtocolError(
                f"bad magic {magic:#010x}, expected QEVM ({QEMU_VM_FILE_MAGIC:#010x}): "
                "not a migration stream", offset=pos)
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise RemoteProtocolError(
                f"stream version {version} (SaveVM v2) is obsolete, expected "
                f"{QEMU_VM_FILE_VERSION}", offset=pos + 4)
        if version != QEMU_VM_FILE_VERSION:
            raise RemoteProtocolError(
                f"unsupported stream version {version}, expected {QEMU_VM_FILE_VERSION}",
                offset=pos + 4)
        self._pos = pos + 8
        self._state = _State.CONFIGURATION
        return [FileHeader(version)]

    def _read_configuration(self, buf, pos: int) -> list[Event]:
        if buf[pos] != QEMU_VM_CONFIGURATION:
            if self._require_configuration:
                raise RemoteProtocolError(
                    f"configuration section missing: got byte {buf[pos]:#04x}, expected "
                    f"{int(QEMU_VM_CONFIGURATION):#04x}", offset=pos)
            self._state = _State.TOP
            return []
        p = pos + 1
        need(buf, p, 4, "machine type name length")
        (n,) = _BE32.unpack_from(buf, p)
        p += 4
        need(buf, p, n, f"machine type name ({n} bytes)")
        machine = bytes(buf[p:p + n]).decode("utf-8", "replace")
        p += n
        subsections: dict[str, bytes] = {}
        prefix = CONFIGURATION_VMSD_NAME.encode()
        while True:
            need(buf, p, 1, "configuration subsection or next section")
            if buf[p] != QEMU_VM_SUBSECTION:
                break
            need(buf, p, 2, "configuration subsection name length")
            n = buf[p + 1]
            need(buf, p, 2 + n, "configuration subsection name")
            raw = bytes(buf[p + 2:p + 2 + n])
            if n < len(prefix) + 1 or not raw.startswith(prefix):
                break
            name = raw.decode("utf-8", "replace")
            if name not in _CONFIG_SUBSECTIONS:
                raise RemoteProtocolError(f"configuration: no subsection {name!r}", offset=p)
            p += 2 + n
            need(buf, p, 4, f"version of {name!r}")
            (version,) = _BE32.unpack_from(buf, p)
            if version != 1:
                raise RemoteProtocolError(
                    f"{name}: incoming version_id {version}, expected 1", offset=p)
            p += 4
            body_len = self._config_body_len(name, buf, p)
            subsections[name] = bytes(buf[p:p + body_len])
            p += body_len
        self._pos = p
        self._state = _State.TOP
        return [Configuration(machine, subsections)]

    @staticmethod
    def _config_body_len(name: str, buf, p: int) -> int:
        if name == "configuration/target-page-bits":
            need(buf, p, 4, "target page bits")
            return 4
        if name == "configuration/uuid":
            need(buf, p, 16, "UUID (16 bytes)")
            return 16
        need(buf, p, 4, "capability count")
        (count,) = _BE32.unpack_from(buf, p)
        q = p + 4
        for i in range(count):
            need(buf, q, 1, f"capability {i} name length")
            need(buf, q, 1 + buf[q], f"capability {i} name")
            q += 1 + buf[q]
        return q - p

    def _read_top(self, buf, pos: int) -> list[Event]:
        tag = buf[pos]
        if tag == QEMU_VM_SECTION_START or tag == QEMU_VM_SECTION_FULL:
            return self._read_full_header(tag, buf, pos)
        if tag == QEMU_VM_SECTION_PART or tag == QEMU_VM_SECTION_END:
            need(buf, pos, 5, "section id")
            (section_id,) = _BE32.unpack_from(buf, pos + 1)
            if section_id not in self._ram_sections:
                raise RemoteProtocolError(f"Unknown savevm section {section_id}", offset=pos + 1)
            self._pos = pos + 5
            self._state = _State.RAM
            self._section = section_id
            cls = SectionPart if tag == QEMU_VM_SECTION_PART else SectionEnd
            return [cls(section_id)]
        if tag == QEMU_VM_COMMAND:
            return self._read_command(buf, pos)
        if tag == QEMU_VM_EOF:
            self._pos = pos + 1
            self._state = _State.AFTER_EOF
            return [Eof()]
        raise RemoteProtocolError(f"Unknown section type {tag}", offset=pos)

    def _read_full_header(self, tag: int, buf, pos: int) -> list[Event]:
        kind = "START" if tag == QEMU_VM_SECTION_START else "FULL"
        p = pos + 1
        need(buf, p, 5, f"{kind} section header")
        (section_id,) = _BE32.unpack_from(buf, p)
        n = buf[p + 4]
        p += 5
        need(buf, p, n + 8, f"{kind} section header")
        idstr = bytes(buf[p:p + n]).decode("utf-8", "replace")
        instance_id, version_id = _HEADER.unpack_from(buf, p + n)
        p += n + 8
        if tag == QEMU_VM_SECTION_START:
            if idstr != RAM_SECTION_IDSTR or instance_id != 0:
                raise RemoteProtocolError(
                    f"Unknown savevm section or instance '{idstr}' {instance_id}", offset=pos)
            if version_id != RAM_SECTION_VERSION:
                raise RemoteProtocolError(
                    f"ram: unsupported version {version_id}, expected {RAM_SECTION_VERSION}",
                    offset=pos)
            self._pos = p
            self._ram_sections[section_id] = idstr
            self._section = section_id
            self._state = _State.RAM
            return [SectionStart(section_id, idstr, instance_id, version_id)]
        vmsd = self._lookup_vmsd(idstr, instance_id)
        if vmsd is None:
            raise RemoteProtocolError(
                f"Unknown savevm section or instance '{idstr}' {instance_id}", offset=pos)
        values, p = vmsd.decode(buf, p, version_id)
        events: list[Event] = [DeviceState(section_id, idstr, instance_id, version_id, values)]
        if self._footers:
            p = self._check_footer(buf, p, section_id)
            events.append(SectionFooter(section_id))
        self._pos = p
        return events

    def _check_footer(self, buf, p: int, section_id: int) -> int:
        need(buf, p, 5, f"footer of section {section_id}")
        tag, read_id = _FOOTER.unpack_from(buf, p)
        if tag != QEMU_VM_SECTION_FOOTER:
            raise RemoteProtocolError(
                f"missing section footer for section {section_id}: got byte {tag:#04x}, "
                f"expected {int(QEMU_VM_SECTION_FOOTER):#04x}", offset=p)
        if read_id != section_id:
            raise RemoteProtocolError(
                f"mismatched section id in footer: read {read_id}, expected {section_id}",
                offset=p + 1)
        return p + 5

    def _read_footer(self, buf, pos: int) -> list[Event]:
        section_id = self._section
        assert section_id is not None
        self._pos = self._check_footer(buf, pos, section_id)
        self._state = _State.TOP
        self._section = None
        return [SectionFooter(section_id)]

    def _read_ram_record(self, buf, pos: int) -> list[Event]:
        need(buf, pos, 8, "RAM record")
        (word,) = _BE64.unpack_from(buf, pos)
        flags = word & self._flag_mask
        addr = word ^ flags
        kind = flags & ~RAM_SAVE_FLAG_CONTINUE
        p = pos + 8
        if kind == RAM_SAVE_FLAG_PAGE or kind == RAM_SAVE_FLAG_ZERO \
                or kind == RAM_SAVE_FLAG_XBZRLE:
            if flags & RAM_SAVE_FLAG_CONTINUE:
                block = self._last_block
                if block is None:
                    raise RemoteProtocolError(
                        "RAM record with CONTINUE but no previous block", offset=pos)
            else:
                need(buf, p, 1, "RAM block name length")
                n = buf[p]
                need(buf, p, 1 + n, "RAM block name")
                name = bytes(buf[p + 1:p + 1 + n]).decode("utf-8", "replace")
                block = self._blocks.get(name)
                if block is None:
                    raise RemoteProtocolError(f"unknown RAM block '{name}'", offset=p)
                p += 1 + n
            if addr >= block.used_length or block.used_length - addr < self._page_size:
                raise RemoteProtocolError(
                    f"RAM offset {addr:#x} is outside block '{block.idstr}' "
                    f"(used_length {block.used_length:#x})", offset=pos)
            if kind == RAM_SAVE_FLAG_PAGE:
                need(buf, p, self._page_size, f"RAM page data ({self._page_size} bytes)")
                data = self._page_view(p, p + self._page_size)
                event: Event = (RamPages(block.idstr, np.array([addr], np.uint64),
                                         np.frombuffer(data, np.uint8).reshape(1, -1))
                                if self._page_runs else RamPage(block.idstr, addr, data))
                p += self._page_size
            elif kind == RAM_SAVE_FLAG_XBZRLE:
                event, p = self._read_xbzrle(buf, p, block.idstr, addr)
            else:
                need(buf, p, 1, "zero page fill byte")
                if buf[p]:
                    raise RemoteProtocolError(
                        f"zero page with fill byte {buf[p]:#04x}, expected 0", offset=p)
                event = (RamZeros(block.idstr, np.array([addr], np.uint64))
                         if self._page_runs else RamZero(block.idstr, addr))
                p += 1
            self._last_block = block
        elif kind in _NO_CONTINUE and (flags & RAM_SAVE_FLAG_CONTINUE
                                       or addr and kind != RAM_SAVE_FLAG_MEM_SIZE):
            # Only PAGE and ZERO continue; EOS and FLUSH name no page: not a sync point.
            raise RemoteProtocolError(f"misaligned RAM record header {word:#018x}", offset=pos)
        elif kind == RAM_SAVE_FLAG_MEM_SIZE:
            event, p = self._read_block_list(buf, p, addr)
            self._blocks = {b.idstr: b for b in event.blocks}
        elif kind == RAM_SAVE_FLAG_EOS:
            event = RamEOS()
            if self._records_only:
                self._state = _State.DONE
            else:
                self._state = _State.FOOTER if self._footers else _State.TOP
        elif kind == RAM_SAVE_FLAG_MULTIFD_FLUSH:
            event = RamFlush()
        elif kind in _UNSUPPORTED_RAM_FLAGS:
            raise RemoteProtocolError(
                f"unsupported RAM flag {kind:#x} ({_UNSUPPORTED_RAM_FLAGS[kind]})", offset=pos)
        else:
            raise RemoteProtocolError(
                f"Unknown combination of migration flags: {flags:#x}", offset=pos)
        self._pos = p
        return [event]

    def _read_xbzrle(self, buf, p: int, block: str, addr: int) -> tuple[RamXbzrle, int]:
        # QEMU's load_xbzrle checks the header; the encoding is checked as it is applied.
        need(buf, p, 3, "XBZRLE encoding flag and length")
        if buf[p] != ENCODING_FLAG_XBZRLE:
            raise RemoteProtocolError("Failed to load XBZRLE page - wrong compression! "
                                      f"(encoding flag {buf[p]:#04x})", offset=p)
        n = buf[p + 1] << 8 | buf[p + 2]
        if n > self._page_size:
            raise RemoteProtocolError(f"Failed to load XBZRLE page - len overflow! ({n} bytes "
                                      f"for a {self._page_size}-byte page)", offset=p + 1)
        need(buf, p + 3, n, f"XBZRLE encoding ({n} bytes)")
        return RamXbzrle(block, addr, self._page_view(p + 3, p + 3 + n)), p + 3 + n

    def _read_block_list(self, buf, p: int, total: int) -> tuple[RamBlockList, int]:
        blocks: list[RamBlockInfo] = []
        names: set[str] = set()
        remaining = total
        while remaining:
            need(buf, p, 1, "RAM block name length")
            n = buf[p]
            need(buf, p, 9 + n, "RAM block list entry")
            name = bytes(buf[p + 1:p + 1 + n]).decode("utf-8", "replace")
            (length,) = _BE64.unpack_from(buf, p + 1 + n)
            entry_at, p = p, p + 9 + n
            page_size = gpa = None
            local_ps = self._block_page_size(name) if self._block_page_size else \
                self._host_page_size
            if self._postcopy_advised and local_ps != self._host_page_size:
                need(buf, p, 8, f"page size of RAM block '{name}'")
                (page_size,) = _BE64.unpack_from(buf, p)
                p += 8
                if page_size != local_ps:
                    raise RemoteProtocolError(
                        f"mismatched RAM page size {name} (local) {local_ps} != {page_size}",
                        offset=p - 8)
            if self._ignore_shared:
                need(buf, p, 8, f"guest address of RAM block '{name}'")
                (gpa,) = _BE64.unpack_from(buf, p)
                p += 8
            if name in names:
                raise RemoteProtocolError(f"RAM block '{name}' listed twice", offset=entry_at)
            if length > remaining:
                raise RemoteProtocolError(
                    f"RAM block '{name}' length {length:#x} overruns the block list total "
                    f"{total:#x}", offset=entry_at)
            names.add(name)
            blocks.append(RamBlockInfo(name, length, page_size, gpa))
            remaining -= length
        return RamBlockList(total, tuple(blocks)), p

    def _read_command(self, buf, pos: int) -> list[Event]:
        need(buf, pos, 5, "command header")
        cmd, length = _COMMAND.unpack_from(buf, pos + 1)
        if cmd == 0 or cmd >= MIG_CMD_MAX:
            raise RemoteProtocolError(f"MIG_CMD {cmd:#x} unknown (len {length:#x})", offset=pos)
        cmd = MigCmd(cmd)
        fixed = MIG_CMD_LEN[cmd]
        short = cmd.name[len("MIG_CMD_"):]
        if fixed is not None and length != fixed:
            raise RemoteProtocolError(
                f"{short} received with bad length - expecting {fixed}, got {length}",
                offset=pos + 3)
        p = pos + 5
        need(buf, p, length, f"{short} payload ({length} bytes)")
        payload = bytes(buf[p:p + length])
        p += length
        event: Event
        if cmd == MigCmd.MIG_CMD_OPEN_RETURN_PATH:
            event = OpenReturnPath()
        elif cmd == MigCmd.MIG_CMD_PING:
            event = Ping(_BE32.unpack(payload)[0])
        elif cmd == MigCmd.MIG_CMD_POSTCOPY_ADVISE:
            if length == 0:
                event = PostcopyAdvise(None, None)
            elif length == POSTCOPY_ADVISE_LEN:
                summary, tps = struct.unpack(">QQ", payload)
                event = PostcopyAdvise(summary, tps)
            else:
                raise RemoteProtocolError(
                    f"POSTCOPY_ADVISE received with bad length - expecting 0 or "
                    f"{POSTCOPY_ADVISE_LEN}, got {length}", offset=pos + 3)
        elif cmd == MigCmd.MIG_CMD_POSTCOPY_RAM_DISCARD:
            event = parse_discard(payload, pos)
        elif cmd == MigCmd.MIG_CMD_PACKAGED:
            (blob_len,) = _BE32.unpack(payload)
            need(buf, p, blob_len, f"PACKAGED blob ({blob_len} bytes)")
            event = Packaged(bytes(buf[p:p + blob_len]))
            p += blob_len
        elif cmd == MigCmd.MIG_CMD_RECV_BITMAP:
            if length < 1 or payload[0] + 1 != length:
                raise RemoteProtocolError(
                    f"RECV_BITMAP received with bad length {length}", offset=pos + 3)
            event = RecvBitmap(payload[1:].decode("utf-8", "replace"))
        else:
            event = {
                MigCmd.MIG_CMD_POSTCOPY_LISTEN: PostcopyListen,
                MigCmd.MIG_CMD_POSTCOPY_RUN: PostcopyRun,
                MigCmd.MIG_CMD_ENABLE_COLO: EnableColo,
                MigCmd.MIG_CMD_POSTCOPY_RESUME: PostcopyResume,
                MigCmd.MIG_CMD_SWITCHOVER_START: SwitchoverStart,
            }[cmd]()
        if isinstance(event, PostcopyAdvise) and event.page_size_summary is not None:
            self._postcopy_advised = True
        self._pos = p
        return [event]

    def _read_vmdescription(self, buf, pos: int) -> list[Event]:
        tag = buf[pos]
        if tag != QEMU_VM_VMDESCRIPTION:
            raise RemoteProtocolError(
                f"expected VMDESCRIPTION ({int(QEMU_VM_VMDESCRIPTION):#04x}) after EOF, "
                f"got byte {tag:#04x}", offset=pos)
        need(buf, pos, 5, "VMDESCRIPTION length")
        (n,) = _BE32.unpack_from(buf, pos + 1)
        need(buf, pos + 5, n, f"VMDESCRIPTION JSON ({n} bytes)")
        try:
            data = parse_vmdesc(bytes(buf[pos + 5:pos + 5 + n]))
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(exc.message, offset=pos + 5) from None
        self._pos = pos + 5 + n
        self._state = _State.DONE
        return [VMDescription(data)]

    def _read_after_end(self, buf, pos: int) -> list[Event]:
        raise RemoteProtocolError(
            f"{len(buf) - pos} bytes after the end of the stream", offset=pos)


__all__ = ["StreamDecoder", "VmsdLookup", "parse_config_capabilities"]
