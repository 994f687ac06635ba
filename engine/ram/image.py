"""Deterministic guest-memory images for tests and benchmarks.

A "mixed" image approximates a real guest: about half the pages are zero
(never touched), 40% look like text (lowercase letters: compressible), 10%
are random (incompressible) -- the mix of ../shared's QEMU 7.2 captures.
"""
from __future__ import annotations

import os

import numpy as np

PAGE_SIZE = 4096
#: fractions of zero, text-like and random pages
MIXED = (0.5, 0.4, 0.1)
_CHUNK_PAGES = 16384  # 64 MiB at a time keeps memory use flat for big images


def fill_mixed(out: np.ndarray, seed: int = 0, mix=MIXED) -> None:
    """Fill a (npages, PAGE_SIZE) uint8 array in place."""
    rng = np.random.default_rng(seed)
    npages = out.shape[0]
    for start in range(0, npages, _CHUNK_PAGES):
        chunk = out[start:start + _CHUNK_PAGES]
        kinds = rng.choice(3, size=len(chunk), p=mix)
        chunk[kinds == 0] = 0
        text = np.flatnonzero(kinds == 1)
        chunk[text] = rng.integers(ord("a"), ord("z") + 1, size=(len(text), PAGE_SIZE),
                                   dtype=np.uint8)
        rand = np.flatnonzero(kinds == 2)
        chunk[rand] = rng.integers(0, 256, size=(len(rand), PAGE_SIZE), dtype=np.uint8)


def write_mixed_image(path: str, size: int, seed: int = 0) -> None:
    """Create (or overwrite) a file of ``size`` bytes holding a mixed image."""
    if size % PAGE_SIZE:
        raise ValueError("image size must be a multiple of 4096")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(size // PAGE_SIZE, PAGE_SIZE))
        fill_mixed(mm, seed)
        mm.flush()
        del mm
    finally:
        os.close(fd)
