"""Measuring a guest's dirty rate (QEMU's migration/dirtyrate.c), three ways.

* ``page-sampling``: per RAM block of at least 128 KiB, ``sample-pages``
  random pages per GiB are hashed, hashed again after ``calc-time``, and the
  share that changed, times the blocks' size, over the time, is the rate
  (QEMU's update_dirtyrate: ``dirty * total_MB * 1000 / (samples * ms)``).
  It reads guest memory only: no dirty log is involved at all.
* ``dirty-bitmap``: the pages dirtied during ``calc-time``, counted in the
  *measurement logs*.  Each block has one besides its migration dirty log
  (:class:`~engine.ram.dirty.DirtyLog` both); a vCPU marks a page in both
  while a measurement is under way (:class:`TeeLog`, one more vectorised
  store per chunk then, one word read otherwise).  A measurement
  clears and counts only its own logs, so a migration's harvests (which clear
  the migration log) neither disturb a measurement nor are disturbed by one;
  a page written twice in the window counts once, as in QEMU's bitmap.
* ``dirty-ring``: per vCPU, the pages each vCPU marked during ``calc-time``,
  from its own counter in the dirty area (:mod:`engine.ram.dirtylimit`), as
  QEMU reads each vCPU's KVM dirty ring; the VM's rate is their sum.  A page
  a vCPU writes twice counts twice (a ring pushes a page again once it has
  been reaped, which QEMU does continually).

Rates are MB/s of 4 KiB pages (QEMU's unit, MiB).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from engine.errors import InvalidParameterError
from engine.ram.dirtylimit import MEASURING, pages_to_mbps

__all__ = ["TeeLog", "DirtyRateResult", "measure_dirty_rate", "MODES",
           "MIN_CALC_TIME_MS", "MAX_CALC_TIME_MS", "MIN_SAMPLE_PAGES", "MAX_SAMPLE_PAGES",
           "DEFAULT_SAMPLE_PAGES"]

MODES = ("page-sampling", "dirty-bitmap", "dirty-ring")
#: QEMU's MIN_CALC_TIME_MS / MAX_CALC_TIME_MS
MIN_CALC_TIME_MS, MAX_CALC_TIME_MS = 50, 60000
#: QEMU's MIN_SAMPLE_PAGE_COUNT / MAX_SAMPLE_PAGE_COUNT / DIRTYRATE_DEFAULT_SAMPLE_PAGES
MIN_SAMPLE_PAGES, MAX_SAMPLE_PAGES, DEFAULT_SAMPLE_PAGES = 128, 16384, 512
#: QEMU's MIN_RAMBLOCK_SIZE (KiB): smaller blocks are not sampled
_MIN_SAMPLED_BLOCK = 128 << 10
_GIB_SHIFT = 30


class TeeLog:
    """A vCPU's view of one block's logs: every mark goes to the migration
    log, then, while a dirty-bitmap measurement is under way (the dirty
    area's MEASURING word), to the measurement log.  A measurement raises
    the word *before* it clears the logs, so a mark it misses was made before
    the clear and would have been cleared anyway.  Everything else is the
    migration log's."""

    def __init__(self, log, measure, area_words: np.ndarray):
        self._log = log
        self._measure = measure
        self._words = area_words

    def mark(self, first_page: int, count: int = 1) -> None:
        self._log.mark(first_page, count)
        if self._words[MEASURING]:
            self._measure.mark(first_page, count)

    def mark_pages(self, indexes: np.ndarray) -> None:
        self._log.mark_pages(indexes)
        if self._words[MEASURING]:
            self._measure.mark_pages(indexes)

    def __getattr__(self, name: str):
        return getattr(self._log, name)


@dataclass
class DirtyRateResult:
    """One measurement: the VM's rate and, for ``dirty-ring``, each vCPU's."""

    dirty_rate: int
    calc_time_ms: int
    vcpu_rates: list[int] = field(default_factory=list)


def _check(calc_time_ms: int, sample_pages: int, mode: str) -> None:
    if mode not in MODES:
        raise InvalidParameterError("mode", mode, f"must be one of {list(MODES)}")
    if not MIN_CALC_TIME_MS <= calc_time_ms <= MAX_CALC_TIME_MS:
        raise InvalidParameterError("calc-time", calc_time_ms,
                                    f"out of range [{MIN_CALC_TIME_MS}ms, {MAX_CALC_TIME_MS}ms]")
    if not MIN_SAMPLE_PAGES <= sample_pages <= MAX_SAMPLE_PAGES:
        raise InvalidParameterError("sample-pages", sample_pages,
                                    f"out of range [{MIN_SAMPLE_PAGES}, {MAX_SAMPLE_PAGES}]")


def _wait(start: float, calc_time_ms: int, cancel: threading.Event | None) -> float:
    """Wait until *calc_time_ms* after *start*; the seconds that really passed."""
    remaining = start + calc_time_ms / 1000 - time.monotonic()
    if remaining > 0:
        if cancel is not None:
            cancel.wait(remaining)
        else:
            time.sleep(remaining)
    return time.monotonic() - start


class _PageHasher:
    """Hashes whole pages with array operations: the sum of the page's 64-bit
    words times fixed odd random weights, mod 2**64.  A change confined to
    one word always changes the hash (an odd weight is invertible mod 2**64);
    wider changes collide with probability about 2**-64."""

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        self._weights: dict[int, np.ndarray] = {}

    def __call__(self, block, indexes: np.ndarray) -> np.ndarray:
        words = block.page_size // 8
        weights = self._weights.get(words)
        if weights is None:
            weights = self._rng.integers(0, 2**63, words, dtype=np.uint64) * np.uint64(2) \
                + np.uint64(1)
            self._weights[words] = weights
        pages = block.pages[indexes].view(np.uint64)      # a copy: fancy indexing
        with np.errstate(over="ignore"):
            return (pages * weights).sum(axis=1, dtype=np.uint64)


def _page_sampling(blocks: Sequence, calc_time_ms: int, sample_pages: int,
                   cancel, rng: np.random.Generator) -> DirtyRateResult:
    hasher = _PageHasher(rng)
    sampled = []
    start = time.monotonic()
    for block in blocks:
        size = block.npages * block.page_size
        count = (size * sample_pages) >> _GIB_SHIFT
        if size < _MIN_SAMPLED_BLOCK or count == 0:
            continue
        indexes = rng.integers(0, block.npages, count)
        sampled.append((block, indexes, hasher(block, indexes)))
    elapsed = _wait(start, calc_time_ms, cancel)
    dirty = samples = total_mb = 0
    for block, indexes, before in sampled:
        dirty += int(np.count_nonzero(hasher(block, indexes) != before))
        samples += indexes.size
        total_mb += (block.npages * block.page_size) >> 20
    ms = max(1, round(elapsed * 1000))
    rate = dirty * total_mb * 1000 // (samples * ms) if samples else 0
    return DirtyRateResult(rate, ms)


#: guards the MEASURING counts (a coordinator's threads may measure at once)
_MEASURING_LOCK = threading.Lock()


def _dirty_bitmap(area, measure_logs: Sequence, page_sizes: Sequence[int],
                  calc_time_ms: int, cancel) -> DirtyRateResult:
    with _MEASURING_LOCK:
        area.words[MEASURING] += 1
    try:
        for log in measure_logs:
            log.log[:] = 0
        start = time.monotonic()
        elapsed = _wait(start, calc_time_ms, cancel)
        pages = sum(log.count() * size // 4096 for log, size in zip(measure_logs, page_sizes))
    finally:
        with _MEASURING_LOCK:
            if area.words is not None:
                area.words[MEASURING] -= 1
    return DirtyRateResult(int(pages_to_mbps(pages, elapsed)), round(elapsed * 1000))


def _dirty_ring(area, calc_time_ms: int, cancel) -> DirtyRateResult:
    before = area.dirtied()
    start = time.monotonic()
    elapsed = _wait(start, calc_time_ms, cancel)
    delta = area.dirtied() - before
    rates = [int(pages_to_mbps(int(n), elapsed)) for n in delta]
    return DirtyRateResult(sum(rates), round(elapsed * 1000), rates)


def measure_dirty_rate(guest, mode: str = "page-sampling", calc_time_ms: int = 1000,
                       sample_pages: int = DEFAULT_SAMPLE_PAGES, *,
                       cancel: threading.Event | None = None,
                       seed: int | None = None) -> DirtyRateResult:
    """Measure *guest*'s dirty rate for *calc_time_ms* (blocks the caller).

    *guest* is a :class:`~engine.ram.guest.Guest`; *cancel*, when set, ends
    the wait early (the rate is then over the time that did pass).
    """
    _check(calc_time_ms, sample_pages, mode)
    if mode == "page-sampling":
        return _page_sampling(guest.blocks, calc_time_ms, sample_pages, cancel,
                              np.random.default_rng(seed))
    if mode == "dirty-bitmap":
        return _dirty_bitmap(guest.dirty_area, guest.measure_logs,
                             [b.page_size for b in guest.blocks], calc_time_ms, cancel)
    return _dirty_ring(guest.dirty_area, calc_time_ms, cancel)
