"""XBZRLE on the source's main channel (QEMU's ram.c: save_xbzrle_page and
xbzrle_cache_zero_page), a batch of pages at a time.

Once the first complete round over RAM is done (QEMU's ``xbzrle_started``),
every dirty page the main channel sends in precopy goes through the page
cache (:class:`~engine.ram.pagecache.PageCache`, keyed by the page's
``ram_addr``, the blocks laid end to end):

* a miss is counted and sent whole; the page goes into the cache unless it
  is the last stage or a fresh page of another address holds its slot;
* a hit is counted in ``pages`` and encoded against the cached copy
  (:func:`~engine.compress.xbzrle.encode_pages`, the whole batch at once):
  unchanged, it is not sent at all; overflowing, it is sent whole
  (``overflow``, and a page's worth in ``bytes``); otherwise it goes as an
  XBZRLE record: the address word with ``RAM_SAVE_FLAG_XBZRLE``, the
  ``ENCODING_FLAG_XBZRLE`` byte, a be16 length and the encoding.  Except in
  the last stage the cached copy becomes what was sent;
* a zero page puts a zero page in the cache, so that a stale copy does not
  outlive it.

What is sent is a snapshot of the batch taken once (QEMU's ``current_buf``):
the cache, the encoding and a page sent whole all come from the same bytes,
so the destination ends up holding exactly the cached copy even while the
guest writes on.  The batch is sent as up to three buffers (whole pages,
XBZRLE records, zero records), each laid out with array operations.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from engine.compress.xbzrle import ENCODING_FLAG_XBZRLE, encode_pages
from engine.compress.zeropage import find_zero_pages
from engine.ram.pagecache import PageCache
from engine.stream.constants import RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_XBZRLE

__all__ = ["XbzrleCounts", "XbzrleSaver", "XBZRLE_HEADER"]

#: bytes of an XBZRLE record before its encoding: address word, flag, be16 length
XBZRLE_HEADER = 8 + 1 + 2


@dataclass
class XbzrleCounts:
    """One batch's share of QEMU's xbzrle_counters, plus what went as records."""

    pages: int = 0          # cache hits (encoded, overflowed or skipped)
    bytes: int = 0          # QEMU's xbzrle bytes: records less their 8-byte word
    cache_miss: int = 0
    overflow: int = 0
    sent: int = 0           # XBZRLE records sent (QEMU counts them as target pages)
    wire_bytes: int = 0     # what those records cost on the channel


class XbzrleSaver:
    """The page cache of one outgoing migration and the batch encoder using it.

    ``blocks`` are the guest's migratable blocks in stream order.  The cache
    may be resized from another thread (migrate-set-parameters) while the
    migration thread encodes: :attr:`lock` covers both.
    """

    def __init__(self, blocks, cache_size: int, page_size: int):
        self.page_size = page_size
        self.lock = threading.Lock()
        self.cache = PageCache(cache_size, page_size)
        # QEMU's ram_addr: each block's offset in one address space.
        self.base: dict[str, int] = {}
        addr = 0
        for b in blocks:
            self.base[b.idstr] = addr
            addr += -(-b.used_length // page_size) * page_size
        #: QEMU's xbzrle_started: set once the first round over RAM is complete
        self.started = False
        #: QEMU's last_stage: the guest is stopped, the cache is not updated
        self.last_stage = False
        #: cleared when postcopy starts (QEMU: no XBZRLE in postcopy)
        self.enabled = True
        self._zero_page = np.zeros((1, page_size), np.uint8)

    @property
    def active(self) -> bool:
        return self.started and self.enabled

    def resize(self, cache_size: int) -> int:
        """xbzrle-cache-size changed: a cache of the new size keeping what fits;
        returns the new size."""
        with self.lock:
            if cache_size != self.cache.size:
                self.cache = self.cache.resize(cache_size)
            return self.cache.size

    def encode_batch(self, idstr: str, pages: np.ndarray, idx: np.ndarray, detect_zero: bool,
                     encoder, generation: int):
        """The records for pages ``idx`` of block ``idstr``: ``(buffers, normal,
        zero, wire_bytes, counts)``; ``generation`` is the dirty-sync count."""
        ps = self.page_size
        cur = pages[idx]                    # the snapshot everything below uses
        offsets = idx.astype(np.uint64) * np.uint64(ps)
        zero = find_zero_pages(cur) if detect_zero else np.zeros(len(idx), bool)
        counts = XbzrleCounts()
        buffers: list = []
        with self.lock:
            cache = self.cache
            addrs = offsets.astype(np.int64) + self.base[idstr]
            if zero.any():
                zaddr = addrs[zero]
                cache.insert(zaddr, np.broadcast_to(self._zero_page, (len(zaddr), ps)),
                             generation)
                keep = ~zero
                cur, offsets, addrs, zoff = cur[keep], offsets[keep], addrs[keep], offsets[zero]
            else:
                zoff = offsets[:0]
            hit, slots = cache.lookup(addrs, generation)
            miss = ~hit
            counts.cache_miss = int(np.count_nonzero(miss))
            counts.pages = len(addrs) - counts.cache_miss
            if counts.cache_miss and not self.last_stage:
                cache.insert(addrs[miss], cur[miss], generation)
            hslots, hcur = slots[hit], cur[hit]
            enc = encode_pages(cache.pages(hslots), hcur)
            if not self.last_stage:
                changed = enc.lengths != 0
                cache.data[hslots[changed]] = hcur[changed]
        whole = miss.copy()
        whole[hit] = enc.lengths < 0
        counts.overflow = int(np.count_nonzero(enc.lengths < 0))
        records = enc.lengths > 0
        hoffsets = offsets[hit]
        if whole.any():
            buffers += _page_records(encoder, idstr, offsets[whole], cur[whole])
        if records.any():
            bufs = _xbzrle_records(encoder, idstr, hoffsets[records], enc.lengths[records],
                                   enc.data)
            counts.sent = int(np.count_nonzero(records))
            counts.wire_bytes = sum(len(b) for b in bufs)
            counts.bytes = counts.wire_bytes - 8 * counts.sent
            buffers += bufs
        counts.bytes += counts.overflow * ps
        nz = len(zoff)
        if nz:
            buffers.append(encoder.zero_pages(idstr, zoff))
        wire = sum(len(b) for b in buffers)
        return buffers, int(np.count_nonzero(whole)), nz, wire, counts


def _named(flat: memoryview, name: bytes) -> list:
    """A group's bytes with the block name after its first address word."""
    if not name:
        return [flat]
    return [bytes(flat[:8]) + name, flat[8:]]


def _page_records(encoder, idstr: str, offsets: np.ndarray, data: np.ndarray) -> list:
    """PAGE records of the snapshot rows ``data``, laid out in one array."""
    words, name = encoder.record_words(idstr, offsets, RAM_SAVE_FLAG_PAGE)
    n, ps = data.shape
    rec = np.empty((n, 8 + ps), np.uint8)
    rec[:, :8] = words.view(np.uint8).reshape(n, 8)
    rec[:, 8:] = data
    return _named(rec.data.cast("B"), name)


def _xbzrle_records(encoder, idstr: str, offsets: np.ndarray, lengths: np.ndarray,
                    data: np.ndarray) -> list:
    """XBZRLE records of encodings that lie back to back in ``data``.

    Each record is its header and then its encoding, so the encodings keep
    their order and only the header bytes have to be placed between them.
    """
    words, name = encoder.record_words(idstr, offsets, RAM_SAVE_FLAG_XBZRLE)
    n = len(lengths)
    head = np.empty((n, XBZRLE_HEADER), np.uint8)
    head[:, :8] = words.view(np.uint8).reshape(n, 8)
    head[:, 8] = ENCODING_FLAG_XBZRLE
    head[:, 9] = lengths >> 8
    head[:, 10] = lengths & 0xFF
    sizes = lengths + XBZRLE_HEADER
    starts = np.cumsum(sizes) - sizes
    out = np.empty(int(sizes.sum()), np.uint8)
    at = (starts[:, None] + np.arange(XBZRLE_HEADER)).reshape(-1)
    body = np.ones(len(out), bool)
    body[at] = False
    out[at] = head.reshape(-1)
    out[body] = data[:int(lengths.sum())]
    return _named(out.data.cast("B"), name)
