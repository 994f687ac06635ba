"""The ``ab`` consistency check (QEMU migration-test's ``check_guests_ram``).

The ``ab`` workload walks its pages in ascending order adding one to byte 0
of each.  Stopped at any instant, a slice therefore reads ``v+1`` up to the
page it was about to increment and ``v`` from there on.  Walking the slice and
comparing each page's byte 0 with the previous page's:

* equal - fine;
* one less (mod 256), the first time in this slice - the point where the loop
  was interrupted (the "edge");
* anything else, including a second step-down - a bad page.

It catches lost pages (a stale value), pages applied out of order, a torn last
iteration and zero pages that were not zero.  Like QEMU, it never compares the
last page with the first and ignores every byte but byte 0.  With several
vCPUs each owns one contiguous slice (:func:`ab_slices`), and each slice is
checked on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.errors import ConfigError

__all__ = ["ABResult", "ab_region", "ab_slices", "check_ab", "MAX_REPORTED"]

#: QEMU prints the first ten inconsistencies.
MAX_REPORTED = 10
#: QEMU's test loop walks guest-physical [1 MiB, 100 MiB); its first MiB
#: holds the boot code, which this guest does not have, so ours starts at 0.
AB_REGION_END = 100 << 20


def ab_region(npages: int, page_size: int = 4096) -> tuple[int, int]:
    """Pages ``[lo, hi)`` of the first block that the ``ab`` loop walks.

    Bounding the region as QEMU does keeps the loop's working set (and so
    what each pass dirties) at ~100 MiB whatever the guest's size, which is
    what lets a live `ab` guest of any size converge.
    """
    return 0, min(npages, AB_REGION_END // page_size)


def ab_slices(npages: int, nslices: int) -> np.ndarray:
    """Slice boundaries: slice *k* is pages ``[b[k], b[k+1])``.

    Returns ``nslices + 1`` ascending ``int64`` boundaries; slices differ in
    length by at most one page (a slice may be empty when there are more
    slices than pages).
    """
    if nslices < 1:
        raise ConfigError(f"ab needs at least one slice, not {nslices}")
    return (np.arange(nslices + 1, dtype=np.int64) * npages) // nslices


@dataclass(frozen=True)
class ABResult:
    """Outcome of :func:`check_ab`.

    ``bad_pages`` counts inconsistent pages; ``first_bad`` lists the first
    ten as ``(page, previous page's byte 0, this page's byte 0)``; ``edges``
    are the pages where a slice's single allowed step-down was found.
    """

    ok: bool
    bad_pages: int
    first_bad: list[tuple[int, int, int]] = field(default_factory=list)
    edges: list[int] = field(default_factory=list)

    def report(self) -> str:
        """Human-readable summary, one line per reported page."""
        if self.ok:
            return f"ab check passed (edges at pages {self.edges})"
        lines = [f"ab check failed: {self.bad_pages} bad pages"]
        lines += [f"  memory content inconsistency at page {page}: previous "
                  f"{prev:#04x} current {cur:#04x}"
                  for page, prev, cur in self.first_bad]
        return "\n".join(lines)


def _first_bytes(pages: np.ndarray, page_size: int) -> np.ndarray:
    pages = np.asarray(pages)
    if pages.dtype != np.uint8:
        raise ConfigError(f"ab check needs uint8 memory, not {pages.dtype}")
    if pages.ndim == 2:
        return pages[:, 0]
    if pages.ndim == 1:
        if pages.size % page_size:
            raise ConfigError(
                f"{pages.size} bytes is not a whole number of {page_size}-byte pages")
        return pages[::page_size]
    raise ConfigError(f"ab check needs a flat or (npages, page_size) array, not {pages.ndim}-d")


def check_ab(pages: np.ndarray, page_size: int = 4096, slices: int = 1) -> ABResult:
    """Check memory written by the ``ab`` workload; see the module docstring.

    *pages* is ``(npages, page_size)`` or a flat ``uint8`` array of whole
    pages; *slices* is the number of vCPUs that ran the workload.  Reads only
    byte 0 of each page, so checking a 1 GiB block costs one strided pass.
    """
    col = _first_bytes(pages, page_size)
    n = col.size
    if n < 2:
        return ABResult(True, 0, [], [])
    bounds = ab_slices(n, slices)
    # step[k] compares page k+1 with page k: (previous - current) mod 256.
    step = (col[:-1].astype(np.int16) - col[1:]) & 0xFF
    compared = np.ones(n - 1, dtype=bool)
    starts = bounds[1:-1]
    starts = starts[(starts >= 1) & (starts < n)]
    compared[starts - 1] = False            # never compare across slices

    jumps = np.flatnonzero(compared & (step > 1)) + 1
    downs = np.flatnonzero(compared & (step == 1)) + 1
    slice_of = np.searchsorted(bounds, downs, side="right") - 1
    _, first = np.unique(slice_of, return_index=True)
    edges = downs[first]
    second_downs = np.delete(downs, first)
    bad = np.union1d(jumps, second_downs)

    first_bad = [(int(p), int(col[p - 1]), int(col[p])) for p in bad[:MAX_REPORTED]]
    return ABResult(bad.size == 0, int(bad.size), first_bad, [int(e) for e in edges])
