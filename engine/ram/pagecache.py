"""The XBZRLE page cache: the copy of each page last sent (QEMU's page_cache.c).

A direct-mapped cache of ``cache_size / page_size`` slots (rounded down to a
power of two, as QEMU sizes it), a page's slot being its page number modulo
the slot count.  Each slot remembers the address it holds and the dirty-sync
generation that last used it; a slot still *fresh* (used within
:data:`CACHED_PAGE_LIFETIME` generations) is not taken by another address,
so pages that keep being re-dirtied keep their place.

Everything is per batch of pages (numpy arrays of addresses), which is how the
source sends: the cache is one ``(slots, page_size)`` array and a lookup or an
insert is a handful of array operations, whatever the batch's size.
"""
from __future__ import annotations

import numpy as np

__all__ = ["CACHED_PAGE_LIFETIME", "PageCache", "cache_slots"]

#: generations a slot stays reserved for its page (QEMU's CACHED_PAGE_LIFETIME)
CACHED_PAGE_LIFETIME = 2

_EMPTY = -1


def cache_slots(cache_size: int, page_size: int) -> int:
    """The slots a cache of *cache_size* bytes has: a power of two, at least one."""
    if cache_size < page_size:
        raise ValueError(f"xbzrle-cache-size {cache_size} is smaller than a page ({page_size})")
    n = cache_size // page_size
    return 1 << (n.bit_length() - 1)


class PageCache:
    """Previous copies of pages, keyed by their address in RAM (``ram_addr``)."""

    def __init__(self, cache_size: int, page_size: int):
        self.page_size = page_size
        self.slots = cache_slots(cache_size, page_size)
        self.addr = np.full(self.slots, _EMPTY, dtype=np.int64)
        self.age = np.zeros(self.slots, dtype=np.int64)
        self.data = np.zeros((self.slots, page_size), dtype=np.uint8)

    @property
    def size(self) -> int:
        return self.slots * self.page_size

    def slot_of(self, addrs: np.ndarray) -> np.ndarray:
        return (addrs // self.page_size) & (self.slots - 1)

    def lookup(self, addrs: np.ndarray, generation: int) -> tuple[np.ndarray, np.ndarray]:
        """Which of *addrs* are cached (a bool array) and their slots; a hit renews its slot."""
        slots = self.slot_of(addrs)
        hit = self.addr[slots] == addrs
        self.age[slots[hit]] = generation
        return hit, slots

    def insert(self, addrs: np.ndarray, pages: np.ndarray, generation: int) -> np.ndarray:
        """Store *pages* (``(n, page_size)``) for *addrs*; which of them were stored.

        A slot holding another page that is still fresh is left alone (that
        page is a miss, as in QEMU).  Where two of *addrs* share a slot the
        last one wins, as inserting them one by one would leave it.
        """
        slots = self.slot_of(addrs)
        held = self.addr[slots]
        fresh_other = (held != _EMPTY) & (held != addrs) & \
            (self.age[slots] + CACHED_PAGE_LIFETIME > generation)
        ok = ~fresh_other
        self.data[slots[ok]] = pages[ok]
        self.addr[slots[ok]] = addrs[ok]
        self.age[slots[ok]] = generation
        return ok

    def pages(self, slots: np.ndarray) -> np.ndarray:
        return self.data[slots]

    def resize(self, cache_size: int) -> "PageCache":
        """A cache of the new size keeping what fits, the newest page where two collide.

        QEMU's cache_resize moves every cached page to its slot in the new
        cache and keeps the more recently used one of two that meet there.
        """
        new = PageCache(cache_size, self.page_size)
        used = np.flatnonzero(self.addr != _EMPTY)
        if len(used):
            # Newest first, so np.unique's first occurrence per slot is the newest.
            used = used[np.argsort(-self.age[used], kind="stable")]
            slots = new.slot_of(self.addr[used])
            _, first = np.unique(slots, return_index=True)
            keep, dest = used[first], slots[first]
            new.addr[dest] = self.addr[keep]
            new.age[dest] = self.age[keep]
            new.data[dest] = self.data[keep]
        return new
