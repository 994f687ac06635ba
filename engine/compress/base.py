"""The page-codec interface shared by every multifd compression method.

A codec turns the *normal* pages of one multifd RAM packet into that packet's
payload and back.  It knows nothing about headers, sockets or zero pages: the
multifd worker decides which pages are normal, builds the header (whose flags
carry :attr:`Codec.flag`) and moves the bytes.  This mirrors QEMU's
``MultiFDMethods`` table, where the core never branches on the method.

Streaming codecs (zlib, zstd) keep **one compression stream per channel for
the whole migration**: an encoder is created once per sending channel and a
decoder once per receiving channel, and packets must be decoded strictly in
the order that channel carried them.  Packets of different channels are
independent.

Pages are handed over in one of two shapes:

* a 2-D ``numpy`` array ``(n, page_size)`` of ``uint8`` (rows may be a view of
  guest shared memory), or
* a sequence of ``n`` bytes-like objects of ``page_size`` bytes each.

The array forms are the fast path: copies and scatters are single numpy
calls.  The ``*_gather`` / ``*_scatter`` variants take a whole RAM block as a
``(block_pages, page_size)`` array plus page indexes, so a worker never builds
per-page views.

Above the page codecs sit the channel methods, QEMU's ``MultiFDMethods``:
:meth:`Codec.send_setup` gives a sending channel its :class:`SendMethods`
(``send_prepare``: the buffers of a batch's packets, ``send_cleanup``) and
:meth:`Codec.recv_setup` a receiving channel its :class:`RecvMethods`
(``recv``: read one packet's payload and land its pages, ``recv_cleanup``).
The multifd sender and receiver look the codec up once and call these; they
never ask which codec they have.  The methods see the channel only through
two narrow seams, :class:`PayloadSource` and :class:`PageLanding`, so this
package needs nothing from :mod:`engine.multifd`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Protocol, Union

import numpy as np

from engine.errors import CodecError, InvalidParameterError

__all__ = [
    "MULTIFD_FLAG_NOCOMP", "MULTIFD_FLAG_ZLIB", "MULTIFD_FLAG_ZSTD",
    "MULTIFD_FLAG_QPL", "MULTIFD_FLAG_UADK", "MULTIFD_FLAG_QATZIP",
    "MULTIFD_FLAG_COMPRESSION_MASK",
    "Buffer", "Pages", "Payload",
    "Codec", "PageEncoder", "PageDecoder",
    "StreamPageEncoder", "StreamPageDecoder", "StreamCodec",
    "SendMethods", "RecvMethods", "StreamSendMethods", "StreamRecvMethods",
    "PacketBatch", "PayloadSource", "PageLanding",
    "payload_nbytes",
]

# Compression bits of a multifd packet's flags word (spec 3.5).  Only one may
# be set; the receiver compares ``flags & MULTIFD_FLAG_COMPRESSION_MASK`` with
# its own codec's flag.
MULTIFD_FLAG_NOCOMP = 0x00
MULTIFD_FLAG_ZLIB = 0x02
MULTIFD_FLAG_ZSTD = 0x04
MULTIFD_FLAG_QPL = 0x08
MULTIFD_FLAG_UADK = 0x10
MULTIFD_FLAG_QATZIP = 0x20
MULTIFD_FLAG_COMPRESSION_MASK = 0x3E

#: Anything exporting the buffer protocol (bytes, bytearray, memoryview, ndarray).
Buffer = Any
#: The normal pages of one packet: an ``(n, page_size)`` uint8 array or a
#: sequence of ``page_size``-byte buffers.
Pages = Union[np.ndarray, Sequence[Buffer]]
#: A packet payload: one buffer, or the list of buffers an encoder returned.
Payload = Union[Buffer, Sequence[Buffer]]


def payload_nbytes(buffers: Sequence[Buffer]) -> int:
    """Total size in bytes of an encoder's output (the header's ``next_packet_size``)."""
    return sum(memoryview(b).nbytes for b in buffers)


def _flat_bytes(buf: Buffer) -> memoryview:
    """A 1-D unsigned-byte view of any C-contiguous buffer (no copy)."""
    view = memoryview(buf)
    if view.ndim == 1 and view.format == "B":
        return view
    if not view.c_contiguous:
        raise CodecError("page buffers must be C-contiguous")
    return view.cast("B")


def _joined(payload: Payload) -> Buffer:
    """One contiguous buffer for a payload that may come as several parts."""
    if isinstance(payload, (list, tuple)):
        if len(payload) == 1:
            return payload[0]
        return b"".join(payload)
    return payload


def _check_rows(pages: np.ndarray) -> np.ndarray:
    if pages.ndim != 2:
        raise CodecError(
            f"page array must be 2-D (n, page_size), got shape {pages.shape}")
    if pages.dtype != np.uint8:
        raise CodecError(f"page array must be uint8, got {pages.dtype}")
    return pages


def _check_indexes(ram: np.ndarray, indexes: np.ndarray) -> np.ndarray:
    """Validated page indexes into ``ram`` (an ``(npages, page_size)`` array)."""
    _check_rows(ram)
    idx = np.asarray(indexes)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise CodecError("page indexes must be a 1-D integer array")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= ram.shape[0]):
        raise CodecError(
            f"page index out of range 0..{ram.shape[0] - 1} "
            f"(got {int(idx.min())}..{int(idx.max())})")
    return idx.astype(np.intp, copy=False)


def _scatter(data: np.ndarray, out: Pages) -> None:
    """Copy the ``(n, page_size)`` rows of ``data`` into the destination pages."""
    if isinstance(out, np.ndarray):
        np.copyto(out, data)
        return
    for row, dest in zip(data, out):
        _flat_bytes(dest)[:] = row.data


def _out_geometry(out: Pages) -> tuple[int, int]:
    """(pages, page_size) of a decode destination; page_size 0 when empty."""
    if isinstance(out, np.ndarray):
        _check_rows(out)
        if not out.flags.writeable:
            raise CodecError("destination page array is read-only")
        return out.shape[0], out.shape[1]
    if len(out) == 0:
        return 0, 0
    page_size = memoryview(out[0]).nbytes
    for i, page in enumerate(out):
        size = memoryview(page).nbytes
        if size != page_size:
            raise CodecError(
                f"destination page {i} has {size} bytes, expected {page_size}")
    return len(out), page_size


class PageEncoder(ABC):
    """Turns the normal pages of successive packets into payloads.

    One instance per sending channel; not thread-safe.  Encoding zero pages
    produces an empty payload and leaves any stream untouched (QEMU does not
    run the codec for a packet without normal pages).
    """

    @abstractmethod
    def encode(self, pages: Pages) -> list[Buffer]:
        """Payload of one packet carrying ``pages``, as a list of buffers.

        The buffers may alias ``pages`` (nocomp) or the encoder's internal
        state, and stay valid only until the next call.  Their total size is
        the header's ``next_packet_size``.
        """

    @abstractmethod
    def encode_gather(self, ram: np.ndarray, indexes: np.ndarray) -> list[Buffer]:
        """Like :meth:`encode` for pages ``ram[indexes]`` of a RAM block.

        ``ram`` is the block as an ``(npages, page_size)`` uint8 array,
        ``indexes`` the page numbers (offset // page_size) in packet order.
        """


class PageDecoder(ABC):
    """Writes the pages of successive packet payloads into guest memory.

    One instance per receiving channel; packets must be fed in the order the
    channel carried them.  Any failure raises :class:`CodecError` and leaves
    the decoder unusable (as in QEMU, the migration fails).
    """

    @abstractmethod
    def decode(self, payload: Payload, out: Pages) -> None:
        """Decode one packet's payload into ``out``.

        ``out`` is an ``(n, page_size)`` writable uint8 array or a sequence of
        ``n`` writable buffers of ``page_size`` bytes; the payload must
        decode to exactly ``n * page_size`` bytes.
        """

    @abstractmethod
    def decode_scatter(self, payload: Payload, ram: np.ndarray,
                       indexes: np.ndarray) -> None:
        """Like :meth:`decode`, writing page ``i`` of the packet to ``ram[indexes[i]]``."""


class PacketBatch(Protocol):
    """The packet headers of one batch (:class:`engine.multifd.packet.RamPacketBatch`)."""

    page_count: int
    #: normal pages per packet
    normal: list[int]

    def __len__(self) -> int: ...
    def header(self, k: int) -> memoryview: ...
    def normal_positions(self, k: int) -> np.ndarray: ...
    def set_payload_size(self, k: int, size: int) -> None: ...


class PayloadSource(Protocol):
    """A receiving channel, as the codec's ``recv`` sees it.  Both calls read
    exactly what they are asked for or raise (a closed or broken channel)."""

    def recv_views(self, views: list, what: str) -> None:
        """Fill each 1-D byte view of ``views``, in order."""

    def recv_payload(self, size: int, what: str) -> memoryview:
        """The next ``size`` bytes, in a buffer valid until the next call."""


class PageLanding(Protocol):
    """Where one RAM block's received pages go (its mapping, or its file)."""

    def recv_pages(self, source: PayloadSource, idx: np.ndarray) -> None:
        """Read ``len(idx)`` raw pages from ``source`` into pages ``idx``."""

    def write(self, idx: np.ndarray, data: Buffer) -> None:
        """Store page ``i`` of the contiguous ``data`` into page ``idx[i]``."""


class SendMethods(ABC):
    """A sending channel's codec methods (QEMU's ``send_setup``, ``send_prepare``,
    ``send_cleanup``); made by :meth:`Codec.send_setup`, one per channel."""

    @abstractmethod
    def send_prepare(self, batch: PacketBatch, block, idx: np.ndarray,
                     zero: np.ndarray) -> Iterator[list[Buffer]]:
        """The wire buffers of ``batch``, each list to go out in one send call.

        ``block`` is the RAM block (its ``buf`` and ``pages``), ``idx`` the
        batch's page indexes and ``zero`` its zero-page mask, in batch order.
        The codec sets each packet's payload size in ``batch`` before it yields
        that packet's header.  A list is valid until the next one is asked for.
        """

    def send_cleanup(self) -> None:
        """Release what the channel's codec holds (the channel is done)."""


class RecvMethods(ABC):
    """A receiving channel's codec methods (QEMU's ``recv_setup``, ``recv``,
    ``recv_cleanup``); made by :meth:`Codec.recv_setup`, one per channel.

    Failures caused by the payload raise :class:`CodecError`; the receiver
    turns them into :class:`~engine.errors.RemoteProtocolError` naming the
    channel and offset, once, where the data came in.
    """

    def payload_size(self, npages: int, page_size: int) -> int | None:
        """The only payload size a packet of ``npages`` normal pages may
        announce, or None when any size may be right (a compressed stream)."""
        return None

    @abstractmethod
    def recv(self, source: PayloadSource, landing: PageLanding, idx: np.ndarray,
             size: int, page_size: int) -> None:
        """Read one packet's ``size``-byte payload from ``source`` and land its
        normal pages (``idx``, in payload order) through ``landing``."""

    def recv_cleanup(self) -> None:
        """Release what the channel's codec holds (the channel is done)."""


class Codec(ABC):
    """A multifd compression method, registered under QEMU's name.

    Instances are immutable and stateless; per-channel state lives in the
    encoders and decoders they create.
    """

    #: QEMU's ``multifd-compression`` value: 'none', 'zlib' or 'zstd'.
    name: ClassVar[str]
    #: The bit this codec sets in a packet's flags (``MULTIFD_FLAG_*``).
    flag: ClassVar[int]
    #: The migration parameter holding the level, or None if there is none.
    level_parameter: ClassVar[str | None] = None
    #: Accepted levels (QEMU's parameter range).
    level_range: ClassVar[range] = range(0, 1)
    #: QEMU's default level.
    default_level: ClassVar[int] = 0

    def resolve_level(self, level: int | None) -> int:
        """``level`` checked against QEMU's range, or the default when None.

        Raises :class:`~engine.errors.InvalidParameterError` when out of range.
        """
        if level is None:
            return self.default_level
        if self.level_parameter is None:
            return self.default_level
        if isinstance(level, bool) or not isinstance(level, int) \
                or level not in self.level_range:
            raise InvalidParameterError(
                self.level_parameter, level,
                f"must be an integer in {self.level_range.start}.."
                f"{self.level_range.stop - 1}")
        return level

    @abstractmethod
    def new_encoder(self, level: int | None = None) -> PageEncoder:
        """A fresh encoder (one per sending channel) at ``level`` (None: default)."""

    @abstractmethod
    def new_decoder(self) -> PageDecoder:
        """A fresh decoder (one per receiving channel)."""

    @abstractmethod
    def send_setup(self, level: int | None = None) -> SendMethods:
        """A sending channel's methods, at ``level`` (None: the default)."""

    @abstractmethod
    def recv_setup(self) -> RecvMethods:
        """A receiving channel's methods."""

    def __repr__(self) -> str:
        return f"<Codec {self.name!r} flag={self.flag:#04x}>"


class StreamPageEncoder(PageEncoder):
    """Base for codecs with one long-lived compression stream per channel.

    Pages are first copied into a reusable staging array: guest vCPUs keep
    writing shared memory while we compress, and neither zlib nor zstd
    promises anything if its input changes during a call (QEMU's zlib copies
    each page for the same reason).  The snapshot is then compressed as one
    input and the stream is flushed so the packet decodes on its own, given
    every earlier packet of the channel.
    """

    def __init__(self) -> None:
        self._staging = np.empty((0, 0), dtype=np.uint8)

    def _stage(self, n: int, page_size: int) -> np.ndarray:
        if self._staging.shape[1] != page_size or self._staging.shape[0] < n:
            # Grow geometrically so a worker settles on one allocation.
            rows = max(n, 2 * self._staging.shape[0]) \
                if self._staging.shape[1] == page_size else n
            self._staging = np.empty((rows, page_size), dtype=np.uint8)
        return self._staging[:n]

    def encode(self, pages: Pages) -> list[Buffer]:
        if isinstance(pages, np.ndarray):
            _check_rows(pages)
            if pages.shape[0] == 0:
                return []
            snap = self._stage(*pages.shape)
            np.copyto(snap, pages)
        else:
            if len(pages) == 0:
                return []
            page_size = memoryview(pages[0]).nbytes
            snap = self._stage(len(pages), page_size)
            for row, page in zip(snap, pages):
                src = _flat_bytes(page)
                if src.nbytes != page_size:
                    raise CodecError(
                        f"page of {src.nbytes} bytes in a packet of "
                        f"{page_size}-byte pages")
                row.data[:] = src
        return self._compress(snap.reshape(-1).data)

    def encode_gather(self, ram: np.ndarray, indexes: np.ndarray) -> list[Buffer]:
        idx = _check_indexes(ram, indexes)
        if idx.size == 0:
            return []
        snap = self._stage(idx.size, ram.shape[1])
        # mode='clip' skips numpy's buffered bounds check; indexes are checked.
        np.take(ram, idx, axis=0, out=snap, mode="clip")
        return self._compress(snap.reshape(-1).data)

    @abstractmethod
    def _compress(self, data: memoryview) -> list[Buffer]:
        """Feed the staged bytes to the stream and flush; return what it produced."""


class StreamPageDecoder(PageDecoder):
    """Base for decoders of one long-lived stream per channel."""

    #: Codec name that prefixes error messages.
    _what: ClassVar[str] = "codec"

    def decode(self, payload: Payload, out: Pages) -> None:
        n, page_size = _out_geometry(out)
        data = self._decompress_checked(payload, n * page_size)
        if n:
            _scatter(np.frombuffer(data, dtype=np.uint8).reshape(n, page_size), out)

    def decode_scatter(self, payload: Payload, ram: np.ndarray,
                       indexes: np.ndarray) -> None:
        idx = _check_indexes(ram, indexes)
        if not ram.flags.writeable:
            raise CodecError("destination RAM array is read-only")
        data = self._decompress_checked(payload, idx.size * ram.shape[1])
        if idx.size:
            ram[idx] = np.frombuffer(data, dtype=np.uint8).reshape(idx.size, -1)

    def decode_bytes(self, payload: Payload, npages: int, page_size: int) -> Buffer:
        """The packet's ``npages`` pages, decoded, as one contiguous buffer.

        For a caller that lands the pages itself (the receiver writes runs
        to the block's file): no copy into an array first.  The buffer is
        valid until the next call.
        """
        return self._decompress_checked(payload, npages * page_size)

    def _decompress_checked(self, payload: Payload, expected: int) -> bytes:
        buf = _joined(payload)
        if expected == 0:
            # QEMU never runs the codec for a packet without normal pages.
            if memoryview(buf).nbytes:
                raise CodecError(
                    f"{self._what}: {memoryview(buf).nbytes} bytes of payload "
                    "in a packet without normal pages")
            return b""
        data = self._decompress(buf, expected)
        if len(data) != expected:
            raise CodecError(
                f"{self._what}: packet decompressed to {len(data)} bytes, "
                f"expected {expected}")
        return data

    @abstractmethod
    def _decompress(self, payload: Buffer, expected: int) -> bytes:
        """Run ``payload`` through the stream.

        Returns the output (at most ``expected + 1`` bytes need be produced to
        prove an overrun); raises :class:`CodecError` on corrupt input.
        """


class StreamSendMethods(SendMethods):
    """Packet by packet: each packet's normal pages through the channel's one
    encoder, then its header (now knowing the payload size) and the output."""

    def __init__(self, encoder: StreamPageEncoder) -> None:
        self.encoder: StreamPageEncoder | None = encoder

    def send_prepare(self, batch: PacketBatch, block, idx: np.ndarray,
                     zero: np.ndarray) -> Iterator[list[Buffer]]:
        encoder = self.encoder
        assert encoder is not None  # until send_cleanup()
        ram = block.pages
        for k in range(len(batch)):
            if batch.normal[k]:
                payload = encoder.encode_gather(ram, idx[batch.normal_positions(k)])
                batch.set_payload_size(k, payload_nbytes(payload))
                # An encoder's output is valid until its next call: one send each.
                yield [batch.header(k), *payload]
            else:
                batch.set_payload_size(k, 0)
                yield [batch.header(k)]

    def send_cleanup(self) -> None:
        self.encoder = None


class StreamRecvMethods(RecvMethods):
    """The payload into a scratch buffer, through the channel's one decoder, and
    the plain pages to where they land."""

    def __init__(self, decoder: StreamPageDecoder) -> None:
        self.decoder: StreamPageDecoder | None = decoder

    def recv(self, source: PayloadSource, landing: PageLanding, idx: np.ndarray,
             size: int, page_size: int) -> None:
        payload = source.recv_payload(size, "compressed page data")
        assert self.decoder is not None     # until recv_cleanup()
        landing.write(idx, self.decoder.decode_bytes(payload, len(idx), page_size))

    def recv_cleanup(self) -> None:
        self.decoder = None


class StreamCodec(Codec):
    """A codec with one long-lived compression stream per channel (zlib, zstd)."""

    @abstractmethod
    def new_encoder(self, level: int | None = None) -> StreamPageEncoder: ...

    @abstractmethod
    def new_decoder(self) -> StreamPageDecoder: ...

    def send_setup(self, level: int | None = None) -> StreamSendMethods:
        return StreamSendMethods(self.new_encoder(level))

    def recv_setup(self) -> StreamRecvMethods:
        return StreamRecvMethods(self.new_decoder())
