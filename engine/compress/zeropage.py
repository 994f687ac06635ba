"""Zero-page detection, vectorised (QEMU's ``multifd-zero-page.c``).

A zero page travels as an offset with no payload, so the sender tests every
page of a batch before handing the rest to the codec.  The test reads each
page as 64-bit words and OR-reduces a row: numpy's ``bitwise_or.reduce`` runs
SIMD over a row and allocates nothing but the one-word-per-page result, so it
streams through memory at close to bandwidth (chunking a plain 2-D array
bought nothing when measured).  Gathers from scattered offsets go through a
small reusable block instead, so the copy stays in cache.

Pages may live in shared memory that a guest is writing: the answer for such a
page is whatever the reads saw, which is fine because a write after the read
also marks the page dirty and it is sent again.
"""
from __future__ import annotations

import numpy as np

from engine.compress.base import Buffer
from engine.errors import ConfigError
from engine.ram.holes import HoleMap

__all__ = ["find_zero_pages", "zero_page_mask_from_buffer", "block_zero_page_mask"]

# Pages gathered per step in zero_page_mask_from_buffer: 64 x 4 KiB = 256 KiB,
# which stays in L2 and measured fastest among 64..1024.
_GATHER_PAGES = 64


def _word_rows(pages: np.ndarray) -> np.ndarray:
    """``pages`` as (n, words) of the widest integer the row layout allows."""
    page_size = pages.shape[1]
    if page_size and page_size % 8 == 0 and pages.strides[1] == 1:
        try:
            return pages.view(np.uint64)
        except ValueError:  # e.g. a row stride that is not a multiple of 8
            pass
    return pages


def _rows_are_zero(rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return np.logical_not(np.bitwise_or.reduce(rows, axis=1), out=out)


def _adjacent(rows: np.ndarray) -> bool:
    """Whether ``rows`` is a run of consecutive page numbers."""
    return int(rows[-1]) - int(rows[0]) == rows.size - 1 \
        and (rows.size == 1 or bool((np.diff(rows) == 1).all()))


def find_zero_pages(pages: np.ndarray) -> np.ndarray:
    """Boolean mask, True where a page is all zero bytes.

    ``pages`` is an ``(n, page_size)`` uint8 array, typically a view of guest
    shared memory (rows need not be adjacent).  Returns a new ``(n,)`` bool
    array.  No copy of the pages is made.
    """
    if not isinstance(pages, np.ndarray) or pages.ndim != 2 \
            or pages.dtype != np.uint8:
        raise ConfigError("find_zero_pages wants an (n, page_size) uint8 array")
    return _rows_are_zero(_word_rows(pages))


def zero_page_mask_from_buffer(buf: Buffer, offsets: np.ndarray,
                               page_size: int = 4096,
                               known_zero: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask, True where the page at ``buf[offset:offset+page_size]`` is zero.

    ``buf`` is a RAM block (any buffer: ``SharedMemory.buf``, mmap, ndarray);
    ``offsets`` are byte offsets in it, multiples of ``page_size``, in any
    order.  Runs of adjacent pages are read in place; scattered ones are
    gathered a few at a time into a small scratch block.  Pages marked in
    ``known_zero`` (a mask over ``offsets``: holes of the block's file, see
    :mod:`engine.ram.holes`) are reported zero without being read.
    """
    if known_zero is not None:
        known = np.asarray(known_zero, dtype=bool)
        offs = np.asarray(offsets)
        if known.shape != offs.shape:
            raise ConfigError("known_zero must have one entry per offset")
        result = known.copy()
        rest = ~known
        if rest.any():
            result[rest] = zero_page_mask_from_buffer(buf, offs[rest], page_size)
        return result
    if page_size <= 0:
        raise ConfigError(f"page size must be positive, got {page_size}")
    base = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) \
        else buf.reshape(-1)
    if base.dtype != np.uint8:
        base = base.view(np.uint8)
    npages = base.size // page_size
    offs = np.asarray(offsets)
    if offs.ndim != 1 or (offs.size and not np.issubdtype(offs.dtype, np.integer)):
        raise ConfigError("offsets must be a 1-D integer array")
    result = np.empty(offs.size, dtype=bool)
    if offs.size == 0:
        return result
    offs = offs.astype(np.int64, copy=False)
    if (offs % page_size).any():
        raise ConfigError(f"offsets must be multiples of the page size {page_size}")
    rows = offs // page_size
    if int(rows.min()) < 0 or int(rows.max()) >= npages:
        raise ConfigError(
            f"offset out of range: the buffer holds {npages} pages of {page_size} bytes")

    table = _word_rows(base[:npages * page_size].reshape(npages, page_size))
    if _adjacent(rows):
        return _rows_are_zero(table[int(rows[0]):int(rows[0]) + rows.size], out=result)
    scratch = np.empty((min(_GATHER_PAGES, rows.size), table.shape[1]),
                       dtype=table.dtype)
    for start in range(0, rows.size, _GATHER_PAGES):
        chunk = rows[start:start + _GATHER_PAGES]
        k = chunk.size
        if _adjacent(chunk):
            # Adjacent pages: read them where they are.
            first = int(chunk[0])
            _rows_are_zero(table[first:first + k], out=result[start:start + k])
        else:
            np.take(table, chunk, axis=0, out=scratch[:k], mode="clip")
            _rows_are_zero(scratch[:k], out=result[start:start + k])
    return result


def block_zero_page_mask(block, pages: np.ndarray, page_size: int,
                         holes: HoleMap | None = None) -> np.ndarray:
    """Boolean mask over ``pages`` (ascending page indexes of a RAM block):
    True where the page is zero.

    Pages in holes of the block's file are zero without a read, which on
    tmpfs would also allocate them (:mod:`engine.ram.holes`); the rest are
    read from the block's memory.  A caller that scans the block batch by
    batch passes its :class:`~engine.ram.holes.HoleMap` of the block's file.
    """
    if holes is None:
        holes = HoleMap(block.fd, page_size)
    offsets = np.asarray(pages).astype(np.uint64) * np.uint64(page_size)
    return zero_page_mask_from_buffer(block.buf, offsets, page_size,
                                      known_zero=holes.mask(pages))
