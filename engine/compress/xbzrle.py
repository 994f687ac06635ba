"""XBZRLE: a page re-sent as its difference from the copy sent before (QEMU's xbzrle.c).

The encoding of a page against its previous copy is a sequence of pairs::

    page  = zrun nzrun | zrun nzrun page
    zrun  = length                 (bytes equal to the old copy: skipped)
    nzrun = length byte...         (bytes that differ: sent as they are now)

each length a ULEB128 number of at most 14 bits (one or two bytes).  A
trailing run of equal bytes is not encoded; only the first zrun may be 0 and
no nzrun is.  An unchanged page encodes to nothing (QEMU then sends no
record); a page whose encoding would not fit in ``dlen`` bytes *overflows*
and goes as a normal page.

The encoder works on many pages at once with numpy: where bytes differ, where
runs start and end, the length of every run and of every page's encoding and
the position of every output byte are array operations, so the cost per page
is a few array passes and not a Python loop over bytes or runs.  The decoder
applies one record to the page it patches in place, one slice assignment per
run: a destination receives XBZRLE records one at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import XbzrleError
from engine.stream.constants import ENCODING_FLAG_XBZRLE

__all__ = [
    "ENCODING_FLAG_XBZRLE",
    "XbzrleError",
    "Encoded",
    "encode_pages",
    "encode_page",
    "decode_into",
    "uleb128_encode_small",
    "uleb128_decode_small",
]


#: the largest length a run may have: ULEB128 in two bytes
_MAX_SMALL = 0x3FFF


def uleb128_encode_small(n: int) -> bytes:
    """*n* (at most 14 bits) as one or two ULEB128 bytes."""
    if not 0 <= n <= _MAX_SMALL:
        raise ValueError(f"{n} does not fit a small ULEB128 (14 bits)")
    if n < 0x80:
        return bytes((n,))
    return bytes(((n & 0x7F) | 0x80, n >> 7))


def uleb128_decode_small(data, pos: int) -> tuple[int, int]:
    """The number at ``data[pos:]`` and the bytes it took; ``(-1, 0)`` if not small."""
    first = data[pos]
    if not first & 0x80:
        return first, 1
    if pos + 1 >= len(data):
        return -1, 0
    second = data[pos + 1]
    if second & 0x80:
        return -1, 0  # a third byte: more than 14 bits
    return (first & 0x7F) | (second << 7), 2


@dataclass(frozen=True)
class Encoded:
    """The encodings of a batch of pages.

    ``lengths[i]`` is page *i*'s encoded size: 0 for an unchanged page, -1 for
    one that overflowed; ``data[offsets[i]:offsets[i] + lengths[i]]`` is its
    encoding when positive.
    """

    lengths: np.ndarray
    offsets: np.ndarray
    data: np.ndarray

    def page(self, i: int) -> memoryview:
        n = int(self.lengths[i])
        start = int(self.offsets[i])
        return self.data.data[start:start + max(n, 0)]


def _uleb_size(n: np.ndarray) -> np.ndarray:
    return np.where(n < 0x80, 1, 2)


def encode_pages(old: np.ndarray, new: np.ndarray, dlen: int | None = None) -> Encoded:
    """Encode each row of *new* against the same row of *old* (both ``(n, page)`` uint8).

    A page whose encoding needs more than ``dlen`` bytes (default: a page)
    overflows.  The overflow rule is QEMU's exactly: its encoder gives up
    where it would have fewer than two bytes left after a run's data, or
    before a further run, so an encoding that ends near ``dlen`` may
    overflow although it would fit.
    """
    if old.shape != new.shape or old.ndim != 2:
        raise ValueError(f"pages of different shapes: {old.shape} and {new.shape}")
    npages, size = new.shape
    if size > _MAX_SMALL:
        raise ValueError(f"a {size}-byte page has runs longer than XBZRLE's 14-bit lengths")
    limit = size if dlen is None else dlen
    lengths = np.zeros(npages, dtype=np.int64)
    offsets = np.zeros(npages, dtype=np.int64)
    if npages == 0:
        return Encoded(lengths, offsets, np.zeros(0, dtype=np.uint8))

    # Each page gets one equal byte after it, so that in the flattened batch
    # no run of differing bytes crosses from one page into the next; runs then
    # start and end where the flattened bytes change from equal to differing
    # and back, alternately (the batch starts "equal").
    width = size + 1
    padded = np.zeros((npages, width), dtype=bool)
    np.not_equal(old, new, out=padded[:, :size])
    flat = padded.reshape(-1)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat[0]:
        edges = np.concatenate(([0], edges))
    starts, ends = edges[0::2], edges[1::2]
    srow, scol = np.divmod(starts, width)
    ecol = ends - srow * width
    nz = ecol - scol
    # The equal bytes before each run: from the previous run's end in the same
    # page, or from the page's start for a page's first run.
    first = np.ones(len(srow), dtype=bool)
    first[1:] = srow[1:] != srow[:-1]
    prev_end = np.empty_like(ecol)
    prev_end[0:1] = 0
    prev_end[1:] = ecol[:-1]
    z = scol - np.where(first, 0, prev_end)

    if len(srow) == 0:      # nothing changed anywhere
        return Encoded(lengths, offsets, np.zeros(0, dtype=np.uint8))
    run_bytes = _uleb_size(z) + _uleb_size(nz) + nz
    per_page = np.bincount(srow, weights=run_bytes, minlength=npages).astype(np.int64)
    changed = np.bincount(srow, minlength=npages) > 0
    # QEMU's encoder checks for room as it goes: before a changed run's data
    # it wants the data plus two bytes, and before each further run (a
    # trailing unchanged one included) two bytes.  For a whole page that
    # comes to: the last changed run's end, less its length bytes, plus two;
    # and with unchanged bytes after it, the whole encoding plus two.
    last = np.flatnonzero(np.r_[srow[1:] != srow[:-1], True])   # each page's last run
    last_rows = srow[last]
    end_check = np.zeros(npages, dtype=np.int64)
    end_check[last_rows] = per_page[last_rows] - _uleb_size(nz[last]) + 2
    trailing = np.zeros(npages, dtype=bool)
    trailing[last_rows] = ecol[last] < size
    overflow = changed & ((end_check > limit) | (trailing & (per_page + 2 > limit)))
    lengths = np.where(overflow, -1, per_page)

    keep = ~overflow[srow]
    srow, scol, ecol, z, nz, run_bytes = (a[keep] for a in (srow, scol, ecol, z, nz, run_bytes))
    good = np.maximum(lengths, 0)
    offsets = np.concatenate(([0], np.cumsum(good)[:-1])).astype(np.int64)
    out = np.zeros(int(good.sum()), dtype=np.uint8)
    if len(srow) == 0:
        return Encoded(lengths, offsets, out)

    # Where each run's encoding starts: its page's offset plus the runs before
    # it in that page.
    run_start = np.cumsum(run_bytes) - run_bytes
    page_first_run = np.searchsorted(srow, srow, side="left")
    run_start = run_start - run_start[page_first_run] + offsets[srow]

    zsize = _uleb_size(z)
    _put_uleb(out, run_start, z)
    nz_at = run_start + zsize
    _put_uleb(out, nz_at, nz)
    data_at = nz_at + _uleb_size(nz)
    # Every differing byte, in page order, lands at its run's data offset.
    counts = nz
    src_rows = np.repeat(srow, counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    src_cols = np.repeat(scol, counts) + within
    out[np.repeat(data_at, counts) + within] = new[src_rows, src_cols]
    return Encoded(lengths, offsets, out)


def _put_uleb(out: np.ndarray, at: np.ndarray, n: np.ndarray) -> None:
    small = n < 0x80
    out[at[small]] = n[small]
    big = ~small
    out[at[big]] = (n[big] & 0x7F) | 0x80
    out[at[big] + 1] = n[big] >> 7


def encode_page(old, new, dlen: int | None = None) -> bytes | None:
    """One page's encoding: ``b""`` if unchanged, ``None`` if it overflows."""
    o = np.frombuffer(old, dtype=np.uint8)[None, :]
    n = np.frombuffer(new, dtype=np.uint8)[None, :]
    enc = encode_pages(o, n, dlen)
    if enc.lengths[0] < 0:
        return None
    return bytes(enc.page(0))


def decode_into(src, dst) -> int:
    """Apply the encoding *src* to the page *dst* (a writable buffer); the bytes covered.

    Raises :class:`XbzrleError` where QEMU's decoder returns -1: a length that
    is not small ULEB128, a zero-length run where none may be, a run beyond
    the page or beyond the encoding.
    """
    src = memoryview(src).cast("B") if not isinstance(src, (bytes, bytearray)) else src
    dst = memoryview(dst).cast("B")
    slen, dlen = len(src), len(dst)
    i = d = 0
    while i < slen:
        if slen - i < 2:
            raise XbzrleError(f"XBZRLE: truncated run length at byte {i} of {slen}")
        count, used = uleb128_decode_small(src, i)
        if used == 0 or (i and not count):
            raise XbzrleError(f"XBZRLE: bad unchanged-run length at byte {i} of {slen}")
        i += used
        d += count
        if d > dlen:
            raise XbzrleError(f"XBZRLE: unchanged run past the page's {dlen} bytes at byte {i}")
        if slen - i < 2:
            raise XbzrleError(f"XBZRLE: truncated run length at byte {i} of {slen}")
        count, used = uleb128_decode_small(src, i)
        if used == 0 or not count:
            raise XbzrleError(f"XBZRLE: bad changed-run length at byte {i} of {slen}")
        i += used
        if d + count > dlen or i + count > slen:
            raise XbzrleError(f"XBZRLE: changed run of {count} bytes at byte {i} overruns "
                              f"the page ({dlen}) or the encoding ({slen})")
        dst[d:d + count] = src[i:i + count]
        d += count
        i += count
    return d
