"""What a guest vCPU executes: ``none``, ``ab`` and ``random``.

A workload runs inside a vCPU process (:mod:`engine.ram.vcpu`) as a series of
short *chunks*; between chunks the vCPU checks whether it must pause, so a
stop takes effect at a chunk boundary, after the chunk's stores *and* dirty
marks.  All state that must survive a migration lives in the vCPU's sixteen
64-bit registers, kept in shared memory: a workload loads them every time it
resumes and writes them back after every chunk.  A destination guest whose
registers were loaded from the source therefore continues where the source
stopped.

During postcopy with software faults the vCPU sets :attr:`Workload.faults`
to its :class:`~engine.ram.faults.FaultClient`; a workload then asks it
(``touch``/``touch_pages``) for the pages it is about to access before it
stores anything, and gives up the chunk without writing if the wait was
cancelled.  Without faults the check costs one attribute test per chunk.

Register map (per vCPU, ``uint64``):

====  ===========  =======================================================
reg   name         meaning
====  ===========  =======================================================
0     REG_PC       ``ab``: next page to increment, relative to the slice
1     REG_PASSES   ``ab``: completed passes over the slice
2     REG_CHUNKS   chunks executed (every workload); seeds ``random``
3     REG_FLAGS    ``FLAG_INITIALISED`` once ``ab`` zeroed its slice
4     REG_PAGES    pages written so far (every workload)
5-15  -            free
====  ===========  =======================================================
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from engine.errors import ConfigError, InvalidParameterError
from engine.ram.abcheck import ab_region, ab_slices

__all__ = [
    "WorkloadSpec", "Workload", "Pacer", "make_workload", "WORKLOADS",
    "NREGS", "REG_PC", "REG_PASSES", "REG_CHUNKS", "REG_FLAGS", "REG_PAGES",
    "FLAG_INITIALISED", "AB_CHUNK_PAGES", "RANDOM_CHUNK_PAGES", "DIRTY_RATE_PAGE",
]

NREGS = 16
REG_PC = 0
REG_PASSES = 1
REG_CHUNKS = 2
REG_FLAGS = 3
REG_PAGES = 4

FLAG_INITIALISED = 1

#: Pages per ``ab`` chunk (the granularity of a stop).
AB_CHUNK_PAGES = 64
#: Most writes per ``random`` chunk.
RANDOM_CHUNK_PAGES = 256
#: Dirty rates count 4 KiB pages, in MiB/s like QEMU's calc-dirty-rate.
DIRTY_RATE_PAGE = 4096
#: A paced workload aims at about this many chunks per second.
_CHUNKS_PER_SECOND = 100
#: Share of ``random`` writes that go to the hot set.
HOT_WRITE_SHARE = 0.9


@dataclass(frozen=True)
class WorkloadSpec:
    """Which workload the vCPUs run, and how hard.

    *dirty_rate_mbps* is the guest-wide target in MiB/s of dirtied 4 KiB
    pages, shared evenly by the vCPUs; 0 means as fast as the vCPUs can go.
    It paces ``random`` and ``ab`` alike.  *hot_set* (``random`` only) is the
    fraction of pages, from the start of the guest's RAM, that receives 90 %
    of the writes; 1.0 spreads them uniformly.  *seed* makes ``random``
    reproducible.
    """

    name: str
    dirty_rate_mbps: float = 0
    hot_set: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise InvalidParameterError(
                "workload", self.name, f"unknown; choose one of {sorted(WORKLOADS)}")
        rate = self.dirty_rate_mbps
        if not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
            raise InvalidParameterError("dirty_rate_mbps", rate, "must be a finite number >= 0")
        hot = self.hot_set
        if not isinstance(hot, (int, float)) or not 0 < hot <= 1:
            raise InvalidParameterError("hot_set", hot, "must be in (0, 1]")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidParameterError("seed", self.seed, "must be an integer >= 0")

    @classmethod
    def parse(cls, text: str) -> "WorkloadSpec":
        """Parse ``name[:key=value,...]``, e.g. ``random:dirty_rate_mbps=100,hot_set=0.1``.

        A bare number after the colon is the dirty rate (``random:100``).
        """
        name, _, rest = text.partition(":")
        kwargs: dict[str, Any] = {}     # float or int, as each field wants
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                key, value = "dirty_rate_mbps", key
            key = key.strip()
            try:
                if key == "dirty_rate_mbps" or key == "hot_set":
                    kwargs[key] = float(value)
                elif key == "seed":
                    kwargs[key] = int(value)
                else:
                    raise InvalidParameterError("workload", text, f"unknown option {key!r}")
            except ValueError as exc:
                raise InvalidParameterError(key, value, "not a number") from exc
        return cls(name.strip(), **kwargs)

    def pages_per_second(self, nvcpus: int) -> float:
        """One vCPU's share of the dirty rate, in pages/s (0 = unpaced)."""
        if self.dirty_rate_mbps == 0 or nvcpus == 0:
            return 0.0
        return self.dirty_rate_mbps * (1 << 20) / DIRTY_RATE_PAGE / nvcpus


class Pacer:
    """Spaces chunks so that pages/s stays at or below a target.

    After ``reset()`` at time t0, the next chunk may start once
    ``t0 + pages_so_far / rate`` has passed; a chunk may overshoot by its own
    size, never more.  A rate of 0 never waits.
    """

    def __init__(self, pages_per_second: float, clock=time.monotonic):
        self.rate = pages_per_second
        self._clock = clock
        self._due = 0.0

    def reset(self) -> None:
        self._due = self._clock()

    def delay(self) -> float:
        """Seconds to wait before the next chunk may run."""
        if not self.rate:
            return 0.0
        return self._due - self._clock()

    def account(self, pages: int) -> None:
        if self.rate:
            self._due += pages / self.rate


def chunk_pages(rate: float, most: int) -> int:
    """Pages per chunk: about 1/100 s of work at *rate*, between 1 and *most*."""
    if not rate:
        return most
    return max(1, min(most, int(rate / _CHUNKS_PER_SECOND)))


class Workload:
    """Base of the workloads.  ``regs`` is this vCPU's 16-register row.

    ``idle`` workloads have nothing to run; the vCPU just waits.  ``resume()``
    reloads state from the registers (called on every pause -> run
    transition) and returns True, or False if it gave up waiting for a
    missing page (call it again); ``step()`` runs one chunk, marks what it
    wrote and saves the registers, returning the number of pages written (0
    if it gave up waiting for a page and wrote nothing).  ``faults`` is the
    vCPU's software-fault client while postcopy needs one, else None.
    """

    idle = False
    faults = None

    def __init__(self, spec: WorkloadSpec, index: int, nvcpus: int,
                 blocks: Sequence, logs: Sequence, regs: np.ndarray):
        self.spec = spec
        self.index = index
        self.nvcpus = nvcpus
        self.blocks = blocks
        self.logs = logs
        self.regs = regs
        self.rate = spec.pages_per_second(nvcpus)

    def resume(self) -> bool:
        return True

    def step(self) -> int:
        return 0


class IdleWorkload(Workload):
    """``none``: the vCPU executes nothing (QEMU started with ``-S``)."""

    idle = True


class ABWorkload(Workload):
    """``ab``: QEMU's A-B boot code on this vCPU's slice of the test region.

    The region is QEMU's, [1 MiB, 100 MiB) of the first block
    (:func:`~engine.ram.abcheck.ab_region`), split into one slice per vCPU.

    On first start (``FLAG_INITIALISED`` clear) it zeroes byte 0 of every page
    of its slice; then it increments byte 0 of each page in ascending order,
    pass after pass, ``AB_CHUNK_PAGES`` pages a chunk.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.blocks:
            raise ConfigError("the ab workload needs at least one RAM block")
        block = self.blocks[0]
        region_lo, region_hi = ab_region(block.npages, block.page_size)
        bounds = region_lo + ab_slices(region_hi - region_lo, self.nvcpus)
        self.lo, self.hi = int(bounds[self.index]), int(bounds[self.index + 1])
        self.pages = block.pages
        self.log = self.logs[0]
        self.chunk = chunk_pages(self.rate, AB_CHUNK_PAGES)
        self.idle = self.hi == self.lo
        self.pc = 0

    def resume(self) -> bool:
        regs = self.regs
        if not int(regs[REG_FLAGS]) & FLAG_INITIALISED:
            if self.faults is not None and not self.faults.touch(0, self.lo, self.hi - self.lo):
                return False
            self.pages[self.lo:self.hi, 0] = 0
            self.log.mark(self.lo, self.hi - self.lo)
            regs[REG_PC] = 0
            regs[REG_PASSES] = 0
            regs[REG_FLAGS] = int(regs[REG_FLAGS]) | FLAG_INITIALISED
        self.pc = int(regs[REG_PC])
        if not 0 <= self.pc < self.hi - self.lo:
            self.pc = 0
        return True

    def step(self) -> int:
        first = self.lo + self.pc
        end = min(first + self.chunk, self.hi)
        if self.faults is not None and not self.faults.touch(0, first, end - first):
            return 0
        self.pages[first:end, 0] += 1
        self.log.mark(first, end - first)
        regs = self.regs
        self.pc = end - self.lo
        if end == self.hi:
            self.pc = 0
            regs[REG_PASSES] += 1
        regs[REG_PC] = self.pc
        regs[REG_CHUNKS] += 1
        regs[REG_PAGES] += end - first
        return end - first


class RandomWorkload(Workload):
    """``random``: 8-byte random words at random offsets of random pages.

    Pages are drawn over all blocks (as one concatenated range); with
    ``hot_set < 1`` the first ``hot_set`` fraction of that range receives 90 %
    of the writes and the rest 10 %.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.words = [b.array.view(np.uint64) for b in self.blocks]
        self.words_per_page = [b.page_size // 8 for b in self.blocks]
        sizes = np.array([b.npages for b in self.blocks], dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(sizes)))
        self.total = int(self.starts[-1])
        self.hot = max(1, min(self.total, round(self.total * self.spec.hot_set)))
        self.chunk = chunk_pages(self.rate, RANDOM_CHUNK_PAGES)
        self.idle = self.total == 0
        self.rng = np.random.default_rng()

    def resume(self) -> bool:
        # Seeded from the registers, so a migrated vCPU carries on with a
        # fresh stream rather than replaying the source's.
        self.rng = np.random.default_rng(
            [self.spec.seed, self.index, int(self.regs[REG_CHUNKS])])
        return True

    def _pick(self, n: int) -> np.ndarray:
        rng = self.rng
        if self.hot >= self.total:
            return rng.integers(0, self.total, n)
        hot = rng.random(n) < HOT_WRITE_SHARE
        return np.where(hot, rng.integers(0, self.hot, n),
                        rng.integers(self.hot, self.total, n))

    def step(self) -> int:
        n = self.chunk
        rng = self.rng
        pages = self._pick(n)
        values = rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64,
                              endpoint=True)
        targets = []
        for b in range(len(self.words)):
            lo, hi = self.starts[b], self.starts[b + 1]
            mine = (pages >= lo) & (pages < hi)
            if not mine.any():
                continue
            local = pages[mine] - lo
            # Every page of the chunk is present before the first store.
            if self.faults is not None and not self.faults.touch_pages(b, local):
                return 0
            targets.append((b, mine, local))
        for b, mine, local in targets:
            words = self.words[b]
            wpp = self.words_per_page[b]
            offsets = rng.integers(0, wpp, local.size)
            words[local * wpp + offsets] = values[mine]
            self.logs[b].mark_pages(local)
        self.regs[REG_CHUNKS] += 1
        self.regs[REG_PAGES] += n
        return n


#: Workload classes by name (the ``WorkloadSpec.name`` values).
WORKLOADS: dict[str, type[Workload]] = {
    "none": IdleWorkload,
    "ab": ABWorkload,
    "random": RandomWorkload,
}


def make_workload(spec: WorkloadSpec, index: int, nvcpus: int, blocks: Sequence,
                  logs: Sequence, regs: np.ndarray) -> Workload:
    """Instantiate *spec* for vCPU *index* of *nvcpus*.

    *blocks* and *logs* are the guest's :class:`RamBlock` and
    :class:`DirtyLog` objects in order; *regs* is the vCPU's register row.
    """
    return WORKLOADS[spec.name](spec, index, nvcpus, blocks, logs, regs)
