"""Multifd wire structures, sans-I/O (spec section 3).

A multifd channel carries, in order:

1. one 64-byte :class:`MultiFDInit` naming the source VM and the channel id;
2. packets, each a fixed-size :class:`MultiFDPacketHeader` of
   ``packet_size(page_count)`` bytes (1344 for 4 KiB target pages) followed
   by :attr:`MultiFDPacketHeader.payload_size` bytes of codec payload.

Both sides size the header from their own target page size, so they must
agree on it.  The layout is the same in QEMU 7.2 and later, except that the
``zero_pages`` word is reserved (always 0) before 9.0.

Things a 7.2 source really sends, and which this module therefore accepts
(see the captures in ``shared/reference/qemu-7.2-captures``):

* a packet without normal pages has no payload, yet its ``next_packet_size``
  (and its block name and offsets past the used ones) may still hold the
  previous packet's values; only ``normal_pages > 0`` makes a payload;
* such packets may also lack the codec's compression bit;
* SYNC packets may carry pages (with a payload) like any other.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from engine.compress.base import MULTIFD_FLAG_COMPRESSION_MASK
from engine.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MULTIFD_MAGIC", "MULTIFD_VERSION", "MULTIFD_FLAG_SYNC",
    "MULTIFD_FLAG_DEVICE_STATE", "MULTIFD_PACKET_SIZE",
    "MULTIFD_INIT_SIZE", "MULTIFD_HEADER_FIXED_SIZE", "RAMBLOCK_IDSTR_SIZE",
    "MultiFDInit", "MultiFDPacketHeader", "RamPacketBatch",
    "packet_size", "multifd_packet_count",
]

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
#: The packet ends a sync round (spec 3.8).
MULTIFD_FLAG_SYNC = 0x01
#: A device-state packet (QEMU >= 10.0), a different layout we do not speak.
MULTIFD_FLAG_DEVICE_STATE = 0x40
#: Guest bytes per full packet: page_count = MULTIFD_PACKET_SIZE / page size.
MULTIFD_PACKET_SIZE = 512 * 1024
#: Size of MultiFDInit_t in bytes.
MULTIFD_INIT_SIZE = 64
#: Size of MultiFDPacket_t before the offsets array, in bytes.
MULTIFD_HEADER_FIXED_SIZE = 320
#: Size of the NUL-padded RAMBlock idstr field, in bytes.
RAMBLOCK_IDSTR_SIZE = 256

# magic, version, uuid, channel id, 7 + 32 reserved bytes.
_INIT = struct.Struct(">II16sB39x")
# magic, version, flags, pages_alloc, normal_pages, next_packet_size,
# packet_num, zero_pages, 4 + 24 reserved bytes, ramblock idstr.
_HEADER = struct.Struct(">IIIIIIQI28x256s")
# next_packet_size alone, at byte 20 of a header
_NEXT_PACKET_SIZE = struct.Struct(">I")
assert _INIT.size == MULTIFD_INIT_SIZE
assert _HEADER.size == MULTIFD_HEADER_FIXED_SIZE

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


def multifd_packet_count(page_size: int = 4096) -> int:
    """Pages per packet for a target page size in bytes (128 for 4 KiB)."""
    if page_size <= 0 or MULTIFD_PACKET_SIZE % page_size:
        raise ValueError(f"page size {page_size} does not divide "
                         f"{MULTIFD_PACKET_SIZE}")
    return MULTIFD_PACKET_SIZE // page_size


def packet_size(page_count: int = 128) -> int:
    """Bytes of a packet header (without payload) for ``page_count`` pages."""
    return MULTIFD_HEADER_FIXED_SIZE + 8 * page_count


def _channel_name(channel: str | int | None) -> str | None:
    return f"multifd {channel}" if isinstance(channel, int) else channel


def _need(buf: memoryview, size: int, what: str, channel: str | None,
          stream_offset: int) -> None:
    if buf.nbytes < size:
        raise RemoteProtocolError(
            f"truncated {what}: {buf.nbytes} of {size} bytes",
            stream_offset, channel)


def _check_magic_version(magic: int, version: int, channel: str | None,
                         stream_offset: int) -> None:
    if magic != MULTIFD_MAGIC:
        raise RemoteProtocolError(
            f"multifd: received magic {magic:#010x}, expected {MULTIFD_MAGIC:#010x}",
            stream_offset, channel)
    if version != MULTIFD_VERSION:
        raise RemoteProtocolError(
            f"multifd: received version {version}, expected {MULTIFD_VERSION}",
            stream_offset + 4, channel)


@dataclass(frozen=True, slots=True)
class MultiFDInit:
    """The first 64 bytes of every multifd channel (``MultiFDInit_t``)."""

    #: The source VM's UUID, 16 raw bytes (all zero when none was given).
    uuid: bytes
    #: Channel id, 0..multifd-channels-1.
    channel_id: int

    def __post_init__(self) -> None:
        if not isinstance(self.uuid, (bytes, bytearray)) or len(self.uuid) != 16:
            raise LocalProtocolError("MultiFDInit uuid must be 16 bytes")
        if not 0 <= self.channel_id <= 0xFF:
            raise LocalProtocolError(
                f"MultiFDInit channel id {self.channel_id} does not fit a byte")
        object.__setattr__(self, "uuid", bytes(self.uuid))

    def pack(self) -> bytes:
        """The 64 wire bytes."""
        return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, self.uuid, self.channel_id)

    def pack_into(self, buf, offset: int = 0) -> None:
        """Write the 64 wire bytes into ``buf`` at ``offset``."""
        _INIT.pack_into(buf, offset, MULTIFD_MAGIC, MULTIFD_VERSION,
                        self.uuid, self.channel_id)

    @classmethod
    def unpack(cls, buf, channel: str | int | None = None,
               stream_offset: int = 0) -> MultiFDInit:
        """Parse the first 64 bytes of ``buf``, checking magic and version.

        ``channel`` and ``stream_offset`` (where ``buf`` starts in the channel)
        only label errors: :class:`RemoteProtocolError` on a bad magic, version
        or short buffer.  Reserved bytes are not checked (QEMU does not).
        """
        name = _channel_name(channel)
        view = memoryview(buf).cast("B")
        _need(view, MULTIFD_INIT_SIZE, "MultiFDInit", name, stream_offset)
        magic, version, uuid, channel_id = _INIT.unpack_from(view)
        _check_magic_version(magic, version, name, stream_offset)
        return cls(uuid, channel_id)


def _idstr(ramblock: str) -> bytes:
    """The RAMBlock name for the NUL-padded idstr field, checked to fit it."""
    name = ramblock.encode("utf-8", "surrogateescape")
    if len(name) >= RAMBLOCK_IDSTR_SIZE:
        raise LocalProtocolError(
            f"RAMBlock name of {len(name)} bytes is too long "
            f"(max {RAMBLOCK_IDSTR_SIZE - 1})")
    return name


def _check_fits(field_name: str, value: int, limit: int = _U32) -> None:
    """Raise :class:`LocalProtocolError` unless ``value`` fits a be32 (or be64) field."""
    if not 0 <= value <= limit:
        width = "be64" if limit == _U64 else "be32"
        raise LocalProtocolError(f"{field_name} {value} does not fit {width}")


def _as_offsets(offsets) -> np.ndarray:
    arr = np.array(offsets, dtype=np.uint64, copy=True).reshape(-1)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, slots=True, eq=False)
class MultiFDPacketHeader:
    """A RAM packet header (``MultiFDPacket_t``), offsets included.

    ``offsets`` holds the ``normal_pages`` normal-page offsets followed by the
    ``zero_pages`` zero-page offsets (bytes into the RAM block, read-only
    ``uint64``); the unused tail of the wire array is not kept.
    """

    #: MULTIFD_FLAG_SYNC | codec flag (engine.compress) bits.
    flags: int
    #: Capacity of the packet in pages (page_count; 0 in a modern SYNC packet).
    pages_alloc: int
    #: Pages whose bytes are in the payload.
    normal_pages: int
    #: Payload bytes that follow the header (meaningful only with normal pages).
    next_packet_size: int
    #: Sequence number shared by all channels of a migration.
    packet_num: int
    #: Pages to be zeroed, listed after the normal ones (always 0 from QEMU < 9.0).
    zero_pages: int
    #: RAMBlock idstr the offsets refer to.
    ramblock: str
    #: uint64 byte offsets: normal pages, then zero pages.
    offsets: np.ndarray = field(default_factory=lambda: _as_offsets(()))

    def __post_init__(self) -> None:
        object.__setattr__(self, "offsets", _as_offsets(self.offsets))
        if self.offsets.size != self.normal_pages + self.zero_pages:
            raise LocalProtocolError(
                f"packet lists {self.offsets.size} offsets for "
                f"{self.normal_pages} normal + {self.zero_pages} zero pages")

    # -- construction --------------------------------------------------

    @classmethod
    def ram(cls, *, flags: int, packet_num: int, ramblock: str,
            normal, zero=(), next_packet_size: int,
            page_count: int = 128) -> MultiFDPacketHeader:
        """A packet of ``normal`` and ``zero`` page offsets (bytes) of one block."""
        normal = np.asarray(normal, dtype=np.uint64).reshape(-1)
        zero = np.asarray(zero, dtype=np.uint64).reshape(-1)
        return cls(flags, page_count, normal.size, next_packet_size, packet_num,
                   zero.size, ramblock, np.concatenate((normal, zero)))

    @classmethod
    def sync(cls, packet_num: int, flags: int = 0) -> MultiFDPacketHeader:
        """A SYNC packet as modern QEMU sends it: no pages, no block, no payload."""
        return cls(MULTIFD_FLAG_SYNC | flags, 0, 0, 0, packet_num, 0, "")

    # -- views ----------------------------------------------------------

    @property
    def is_sync(self) -> bool:
        """Whether the packet ends a sync round."""
        return bool(self.flags & MULTIFD_FLAG_SYNC)

    @property
    def compression(self) -> int:
        """The compression bits of the flags (compare with ``Codec.flag``)."""
        return self.flags & MULTIFD_FLAG_COMPRESSION_MASK

    @property
    def payload_size(self) -> int:
        """Bytes of payload that follow this header on the wire.

        ``next_packet_size`` when the packet has normal pages, else 0: a 7.2
        source leaves a stale size in packets without pages and sends nothing.
        """
        return self.next_packet_size if self.normal_pages else 0

    @property
    def normal_offsets(self) -> np.ndarray:
        """Byte offsets of the pages carried in the payload, in payload order."""
        return self.offsets[:self.normal_pages]

    @property
    def zero_offsets(self) -> np.ndarray:
        """Byte offsets of the pages to be zeroed."""
        return self.offsets[self.normal_pages:]

    # -- wire -----------------------------------------------------------

    def pack(self, page_count: int = 128) -> bytes:
        """The ``packet_size(page_count)`` header bytes."""
        out = bytearray(packet_size(page_count))
        self.pack_into(out, 0, page_count)
        return bytes(out)

    def pack_into(self, buf, offset: int = 0, page_count: int = 128) -> None:
        """Write the header into ``buf`` at ``offset`` (``packet_size(page_count)`` bytes).

        Raises :class:`LocalProtocolError` for values the format cannot carry.
        """
        used = self.offsets.size
        if used > page_count:
            raise LocalProtocolError(
                f"{used} offsets do not fit a packet of {page_count} pages")
        name = _idstr(self.ramblock)
        for fname in ("flags", "pages_alloc", "normal_pages",
                      "next_packet_size", "zero_pages"):
            _check_fits(fname, getattr(self, fname))
        _check_fits("packet_num", self.packet_num, _U64)
        _HEADER.pack_into(buf, offset, MULTIFD_MAGIC, MULTIFD_VERSION,
                          self.flags, self.pages_alloc, self.normal_pages,
                          self.next_packet_size, self.packet_num,
                          self.zero_pages, name)
        table = np.frombuffer(buf, dtype=">u8", count=page_count,
                              offset=offset + MULTIFD_HEADER_FIXED_SIZE)
        table[:used] = self.offsets
        table[used:] = 0

    @classmethod
    def unpack(cls, buf, page_count: int = 128, channel: str | int | None = None,
               stream_offset: int = 0, used_length: int | None = None,
               page_size: int = 4096) -> MultiFDPacketHeader:
        """Parse a header with QEMU's receiver checks.

        ``buf`` holds at least ``packet_size(page_count)`` bytes.  Checks magic,
        version, ``pages_alloc <= page_count``, ``normal_pages <= pages_alloc``,
        ``zero_pages <= pages_alloc - normal_pages``, rejects device-state
        packets, and forces the idstr's last byte to NUL.  When
        ``used_length`` (bytes of the named block) is given, also runs
        :meth:`validate`.  ``channel`` and ``stream_offset`` (where ``buf``
        starts in the channel) label :class:`RemoteProtocolError`.
        """
        name = _channel_name(channel)
        view = memoryview(buf).cast("B")
        _need(view, packet_size(page_count), "multifd packet header", name,
              stream_offset)
        (magic, version, flags, pages_alloc, normal, next_size, packet_num,
         zero, idstr) = _HEADER.unpack_from(view)
        _check_magic_version(magic, version, name, stream_offset)

        def bad(message: str, field_offset: int) -> RemoteProtocolError:
            return RemoteProtocolError(message, stream_offset + field_offset, name)

        if flags & MULTIFD_FLAG_DEVICE_STATE:
            raise bad(f"multifd: device-state packet (flags {flags:#x}) "
                      "is not supported", 8)
        if pages_alloc > page_count:
            raise bad(f"multifd: packet with {pages_alloc} pages, "
                      f"expected at most {page_count}", 12)
        if normal > pages_alloc:
            raise bad(f"multifd: packet with {normal} normal pages, "
                      f"expected at most {pages_alloc}", 16)
        if zero > pages_alloc - normal:
            raise bad(f"multifd: packet with {zero} zero pages, "
                      f"expected at most {pages_alloc - normal}", 32)
        # The receiver terminates the name itself: byte 255 is never part of it.
        ramblock = idstr[:RAMBLOCK_IDSTR_SIZE - 1].split(b"\0", 1)[0] \
            .decode("utf-8", "surrogateescape")
        offsets = np.frombuffer(view, dtype=">u8", count=normal + zero,
                                offset=MULTIFD_HEADER_FIXED_SIZE)
        header = cls(flags, pages_alloc, normal, next_size, packet_num, zero,
                     ramblock, offsets)
        if used_length is not None:
            header.validate(used_length, page_size, channel, stream_offset)
        return header

    def validate(self, used_length: int, page_size: int = 4096,
                 channel: str | int | None = None, stream_offset: int = 0) -> None:
        """Check every used offset against the block's ``used_length`` (bytes).

        QEMU's rule is ``offset <= used_length - page_size``; we also require
        page alignment, without which the page would straddle two pages.
        Raises :class:`RemoteProtocolError` naming the first bad entry.
        """
        if self.offsets.size == 0:
            return
        limit = used_length - page_size
        bad = (self.offsets % np.uint64(page_size)) != 0
        if limit < 0:
            bad[:] = True
        else:
            bad |= self.offsets > np.uint64(limit)
        if bad.any():
            i = int(np.argmax(bad))
            value = int(self.offsets[i])
            kind = "normal" if i < self.normal_pages else "zero"
            raise RemoteProtocolError(
                f"multifd: {kind} page offset {value:#x} (entry {i}) invalid for "
                f"block {self.ramblock!r} of {used_length} bytes "
                f"(max {max(limit, 0):#x}, aligned to {page_size})",
                stream_offset + MULTIFD_HEADER_FIXED_SIZE + 8 * i,
                _channel_name(channel))

    def check_compression(self, expected_flag: int, channel: str | int | None = None,
                          stream_offset: int = 0) -> None:
        """Require the codec bits to equal ``expected_flag`` when the packet has pages.

        Packets without pages are exempt: 7.2 sends them without the bit.
        """
        if (self.normal_pages or self.zero_pages) \
                and self.compression != expected_flag:
            raise RemoteProtocolError(
                f"multifd: packet compression flags {self.compression:#04x}, "
                f"expected {expected_flag:#04x}",
                stream_offset + 8, _channel_name(channel))

    # -- value semantics (ndarray fields defeat the generated ones) -------

    def _key(self) -> tuple:
        return (self.flags, self.pages_alloc, self.normal_pages,
                self.next_packet_size, self.packet_num, self.zero_pages,
                self.ramblock, self.offsets.tobytes())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MultiFDPacketHeader):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def _header_dtype(page_count: int) -> np.dtype:
    """``MultiFDPacket_t`` as a numpy record (big-endian, no padding)."""
    return np.dtype([("magic", ">u4"), ("version", ">u4"), ("flags", ">u4"),
                     ("pages_alloc", ">u4"), ("normal_pages", ">u4"),
                     ("next_packet_size", ">u4"), ("packet_num", ">u8"),
                     ("zero_pages", ">u4"), ("reserved", "V28"),
                     ("ramblock", f"S{RAMBLOCK_IDSTR_SIZE}"),
                     ("offsets", ">u8", (page_count,))])


class RamPacketBatch:
    """The headers of every packet a batch of pages makes, packed at once.

    A sender splits a batch of ``pages`` (ascending page indexes of one
    block) into packets of ``page_count`` pages, in order.  Each packet lists
    its normal pages first, then its zero pages, each group in ascending
    order, which is what :meth:`MultiFDPacketHeader.ram` makes of one packet;
    the bytes are the same.  Packing all headers with a few array operations
    instead of one :class:`MultiFDPacketHeader` per packet takes the
    per-packet Python off a worker's hot path.

    ``next_packet_size`` starts as ``normal * page_size`` (nocomp's payload);
    a codec's sender sets each packet's real size with :meth:`set_payload_size`
    once it has compressed it.
    """

    __slots__ = ("page_count", "header_size", "headers", "normal", "zero", "order",
                 "_records")

    def __init__(self, *, flags: int, first_packet_num: int, ramblock: str,
                 pages: np.ndarray, zero: np.ndarray, page_size: int,
                 page_count: int = 128) -> None:
        n = len(pages)
        if len(zero) != n:
            raise LocalProtocolError(f"{len(zero)} zero flags for {n} pages")
        npackets = -(-n // page_count)
        name = _idstr(ramblock)
        _check_fits("flags", flags)
        _check_fits("packet_num", first_packet_num, _U64)
        _check_fits("packet_num", first_packet_num + max(npackets - 1, 0), _U64)
        if page_count * page_size > _U32:
            raise LocalProtocolError(f"{page_count} pages of {page_size} bytes "
                                     "do not fit next_packet_size")
        self.page_count = page_count
        self.header_size = packet_size(page_count)
        records = np.zeros(npackets, dtype=_header_dtype(page_count))
        self._records = records
        self.headers = records.view(np.uint8).data
        zero = np.asarray(zero, dtype=bool)
        packet = np.arange(n) // page_count
        # Stable: within a packet, normal pages (key 2p) come before zero ones
        # (2p + 1), each group keeping the batch's ascending order.
        self.order = np.argsort(packet * 2 + zero, kind="stable")
        zeros = np.bincount(packet, weights=zero, minlength=npackets).astype(np.int64)
        sizes = np.full(npackets, page_count, dtype=np.int64)
        if n % page_count:
            sizes[-1] = n % page_count
        normal = sizes - zeros
        table = np.zeros(npackets * page_count, dtype=np.uint64)
        table[:n] = np.asarray(pages, dtype=np.uint64)[self.order] * np.uint64(page_size)
        records["magic"] = MULTIFD_MAGIC
        records["version"] = MULTIFD_VERSION
        records["flags"] = flags
        records["pages_alloc"] = page_count
        records["normal_pages"] = normal
        records["next_packet_size"] = normal * page_size
        records["packet_num"] = np.arange(first_packet_num, first_packet_num + npackets,
                                          dtype=np.uint64)
        records["zero_pages"] = zeros
        records["ramblock"] = name
        records["offsets"] = table.reshape(npackets, page_count)
        #: normal and zero pages per packet
        self.normal: list[int] = normal.tolist()
        self.zero: list[int] = zeros.tolist()

    def __len__(self) -> int:
        return len(self.normal)

    def header(self, k: int) -> memoryview:
        """The wire bytes of packet ``k``'s header."""
        return self.headers[k * self.header_size:(k + 1) * self.header_size]

    def normal_positions(self, k: int) -> np.ndarray:
        """Positions in the batch of packet ``k``'s normal pages, in payload order."""
        first = k * self.page_count
        return self.order[first:first + self.normal[k]]

    def payload_bytes(self) -> int:
        """Payload bytes of the whole batch (packets without normal pages have none)."""
        records = self._records
        return int(np.dot(records["next_packet_size"].astype(np.int64),
                          records["normal_pages"] > 0))

    def set_payload_size(self, k: int, size: int) -> None:
        """Set packet ``k``'s ``next_packet_size`` (its codec payload's length)."""
        _check_fits("next_packet_size", size)
        _NEXT_PACKET_SIZE.pack_into(self.headers, k * self.header_size + 20, size)
