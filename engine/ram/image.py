"""Deterministic guest-memory images for tests and benchmarks.

A "mixed" image approximates a real guest: about half the pages are zero
(never touched), 40% look like text (lowercase letters: compressible), 10%
are random (incompressible) -- the mix of ../shared's QEMU 7.2 captures.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

PAGE_SIZE = 4096
#: fractions of zero, text-like and random pages
MIXED = (0.5, 0.4, 0.1)
# 64 MiB at a time keeps memory use flat for big images.  Part of the
# seed -> bytes mapping: changing it changes every image.
_CHUNK_PAGES = 16384


@dataclasses.dataclass(frozen=True, slots=True)
class ImageStats:
    """How many pages of each kind an image got, in pages of :data:`PAGE_SIZE` bytes."""
    pages: int
    zero_pages: int
    text_pages: int
    random_pages: int


def fill_mixed(out: np.ndarray, seed: int = 0, mix=MIXED) -> ImageStats:
    """Fill a (npages, PAGE_SIZE) uint8 array in place; return the page counts.

    Every page is written, zero pages included, so *out* need not start zeroed.
    """
    rng = np.random.default_rng(seed)
    npages = out.shape[0]
    text_pages = random_pages = 0
    for start in range(0, npages, _CHUNK_PAGES):
        chunk = out[start:start + _CHUNK_PAGES]
        kinds = rng.choice(3, size=len(chunk), p=mix)
        chunk[kinds == 0] = 0
        text = np.flatnonzero(kinds == 1)
        chunk[text] = rng.integers(ord("a"), ord("z") + 1, size=(len(text), PAGE_SIZE),
                                   dtype=np.uint8)
        rand = np.flatnonzero(kinds == 2)
        chunk[rand] = rng.integers(0, 256, size=(len(rand), PAGE_SIZE), dtype=np.uint8)
        text_pages += len(text)
        random_pages += len(rand)
    return ImageStats(pages=npages, zero_pages=npages - text_pages - random_pages,
                      text_pages=text_pages, random_pages=random_pages)


def write_mixed_image(path: str | os.PathLike, size: int, seed: int = 0) -> ImageStats:
    """Make ``path`` a file of ``size`` bytes holding a mixed image; return its page counts.

    An existing file is overwritten in place, never truncated first: a
    process that maps it (a paused QEMU with ``share=on``) must not see it
    shrink under its mapping and fault.  It is then cut to ``size``.
    """
    if size % PAGE_SIZE:
        raise ValueError(f"image size {size} is not a multiple of {PAGE_SIZE}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        if size == 0:
            stats = ImageStats(0, 0, 0, 0)
        else:
            mm = np.memmap(path, dtype=np.uint8, mode="r+",
                           shape=(size // PAGE_SIZE, PAGE_SIZE))
            try:
                stats = fill_mixed(mm, seed)
                mm.flush()
            finally:
                del mm
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return stats
