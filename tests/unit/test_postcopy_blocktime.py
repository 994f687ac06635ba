"""Postcopy blocktime: per-vCPU blocked time, all-blocked time, fault latencies (QEMU's)."""
from __future__ import annotations

from engine.postcopy.blocktime import Blocktime, empty_figures

MS = 1_000_000


def test_blocktime_per_vcpu_and_all_blocked():
    bt = Blocktime(2, "software")
    bt.set_online(2, 0)
    bt.block(0, 0)                 # vCPU 0 waits 0..30 ms
    bt.block(1, 10 * MS)           # vCPU 1 waits 10..20 ms: all blocked 10..20
    bt.latency(1, 10 * MS)
    bt.unblock(1, 20 * MS)
    bt.latency(0, 30 * MS)
    bt.unblock(0, 30 * MS)
    bt.block(1, 40 * MS)           # still waiting at 45 ms
    fig = bt.figures(45 * MS)
    assert fig["postcopy-vcpu-blocktime"] == [30, 15]
    assert fig["postcopy-blocktime"] == 10
    assert fig["postcopy-latency"] == 20 * MS
    assert fig["postcopy-vcpu-latency"] == [30 * MS, 10 * MS]
    # 10 ms = 10000 us is in [2^13, 2^14), 30 ms in [2^14, 2^15)
    dist = fig["postcopy-latency-dist"]
    assert dist[13] == 1 and dist[14] == 1 and sum(dist) == 2
    assert fig["postcopy-faults"] == "software"


def test_a_vcpu_that_leaves_ends_the_all_blocked_spell_and_keeps_its_time():
    bt = Blocktime(1, "userfaultfd")
    bt.set_online(1, 0)
    bt.block(0, 5 * MS)            # the only vCPU: all blocked from 5 ms
    bt.unblock(0, 9 * MS)          # it left while waiting
    bt.set_online(0, 9 * MS)
    fig = bt.figures(100 * MS)
    assert fig["postcopy-vcpu-blocktime"] == [4] and fig["postcopy-blocktime"] == 4
    assert not bt.blocked(0)


def test_latencies_grow_past_the_first_array():
    bt = Blocktime(1, "software")
    for i in range(3000):
        bt.latency(0, 1000 * (i + 1))
    fig = bt.figures(0)
    assert fig["postcopy-latency"] == 1000 * 3001 // 2
    assert sum(fig["postcopy-latency-dist"]) == 3000
    assert empty_figures("software", 1).keys() == fig.keys()
