"""Postcopy blocktime: how long vCPUs wait for pages (QEMU's PostcopyBlocktimeContext).

QEMU's destination measures, with the postcopy-blocktime capability, the time
each vCPU spent blocked on missing pages and the time *all* vCPUs were
blocked at once (the guest made no progress at all), and since 10.1 the
remote fault latency: from a fault to the arrival of its page, overall, per
vCPU and as a distribution of power-of-two microsecond buckets.  The fault
handler keeps these here; :meth:`Blocktime.figures` gives them under
query-migrate's names (:func:`empty_figures` before anything happened),
with the pages the handler placed from the preempt channel, which the
destination adds to what its main channel received.

The handler calls, per fault and per arrival, :meth:`block`,
:meth:`unblock` and :meth:`latency`: a few integer operations each, no
system call.  Times are :func:`time.monotonic_ns`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["Blocktime", "empty_figures", "LATENCY_BUCKETS"]

#: QEMU 10.1's latency distribution: bucket N counts [2^N, 2^(N+1)) us, the
#: first also everything under 1 us, the last everything from 2^23 us
LATENCY_BUCKETS = 24


def empty_figures(mode: str, nvcpus: int) -> dict:
    """The figures of a handler that never saw a fault."""
    return {"postcopy-requests": 0, "postcopy-latency": 0, "postcopy-latency-p50": 0,
            "postcopy-latency-p99": 0,
            "postcopy-blocktime": 0, "postcopy-vcpu-blocktime": [0] * nvcpus,
            "postcopy-vcpu-latency": [0] * nvcpus,
            "postcopy-latency-dist": [0] * LATENCY_BUCKETS,
            "postcopy-faults": mode, "faults": 0,
            "preempt-pages": 0, "preempt-zero-pages": 0}


class Blocktime:
    """Blocked time per vCPU, all-blocked time and remote fault latencies.

    *nvcpus* is how many vCPUs are expected (the per-vCPU lists have at
    least that many entries), *mode* the fault mode the figures name.  The
    fault handler also counts :attr:`faults` (read) and :attr:`requests`
    (pages asked of the source) here.  One thread uses it.
    """

    def __init__(self, nvcpus: int, mode: str):
        self.nvcpus = nvcpus
        self.mode = mode
        self.faults = 0
        self.requests = 0
        #: vCPU index -> when its current spell of waiting began (ns)
        self.since: dict[int, int] = {}
        #: vCPU index -> ns blocked in finished spells
        self.total: dict[int, int] = {}
        #: vCPUs registered now (all of them blocked = the guest stands still)
        self.online = 0
        self.all_since: int | None = None
        self.all_blocked_ns = 0
        # Remote fault latencies (ns), the first nlatencies, and whose each was.
        self.latencies = np.zeros(1024, dtype=np.int64)
        self.latency_vcpus = np.zeros(1024, dtype=np.int32)
        self.nlatencies = 0

    # -- events ---------------------------------------------------------------------

    def block(self, vcpu: int, now: int) -> None:
        """*vcpu* began waiting for a page (it was not waiting before)."""
        self.since[vcpu] = now
        self._all_blocked(now)

    def unblock(self, vcpu: int, now: int) -> None:
        """*vcpu* waits for nothing more (its pages arrived, or it left)."""
        t0 = self.since.pop(vcpu, None)
        if t0 is not None:
            self.total[vcpu] = self.total.get(vcpu, 0) + now - t0
            self._all_blocked(now)

    def blocked(self, vcpu: int) -> bool:
        return vcpu in self.since

    def set_online(self, count: int, now: int) -> None:
        """*count* vCPUs are registered now."""
        self.online = count
        self._all_blocked(now)

    def latency(self, vcpu: int, ns: int) -> None:
        """A page *vcpu* faulted on arrived *ns* after the fault."""
        n = self.nlatencies
        if n == len(self.latencies):
            self.latencies = np.concatenate([self.latencies, np.zeros_like(self.latencies)])
            self.latency_vcpus = np.concatenate([self.latency_vcpus,
                                                 np.zeros_like(self.latency_vcpus)])
        self.latencies[n] = ns
        self.latency_vcpus[n] = vcpu
        self.nlatencies = n + 1

    def _all_blocked(self, now: int) -> None:
        """Keep the all-vCPUs-blocked interval (QEMU's total blocktime)."""
        every = self.online > 0 and len(self.since) >= self.online
        if every and self.all_since is None:
            self.all_since = now
        elif not every and self.all_since is not None:
            self.all_blocked_ns += now - self.all_since
            self.all_since = None

    # -- the figures ------------------------------------------------------------------

    def figures(self, now: int, preempt: tuple[int, int] = (0, 0)) -> dict:
        """query-migrate's postcopy figures at *now* (spells still going count
        up to *now*): latencies and blocktime per vCPU in ns / ms as QEMU;
        *preempt* is (pages, zero pages) that arrived on the preempt channel."""
        lat = self.latencies[:self.nlatencies]
        per = dict(self.total)
        for i, t0 in self.since.items():
            per[i] = per.get(i, 0) + now - t0
        n = max([self.nvcpus, *(i + 1 for i in per)])
        total = self.all_blocked_ns + (now - self.all_since if self.all_since else 0)
        whose = self.latency_vcpus[:self.nlatencies]
        us = lat // 1000
        buckets = np.where(us > 0, np.frexp(np.maximum(us, 1))[1] - 1, 0)
        dist = np.bincount(np.minimum(buckets, LATENCY_BUCKETS - 1),
                           minlength=LATENCY_BUCKETS)
        return {
            "postcopy-requests": self.requests,
            "postcopy-latency": int(lat.mean()) if lat.size else 0,
            "postcopy-latency-p50": int(np.median(lat)) if lat.size else 0,
            "postcopy-latency-p99": int(np.percentile(lat, 99)) if lat.size else 0,
            "postcopy-blocktime": total // 1_000_000,
            "postcopy-vcpu-blocktime": [per.get(i, 0) // 1_000_000 for i in range(n)],
            "postcopy-vcpu-latency": [int(lat[whose == i].mean()) if (whose == i).any() else 0
                                      for i in range(n)],
            "postcopy-latency-dist": [int(c) for c in dist],
            "postcopy-faults": self.mode,
            "faults": self.faults,
            "preempt-pages": preempt[0],
            "preempt-zero-pages": preempt[1],
        }
