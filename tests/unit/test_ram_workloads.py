"""Workload specs, pacing and the workloads' chunk logic, in one process."""
from __future__ import annotations

import numpy as np
import pytest

from engine.errors import ConfigError
from engine.ram.abcheck import check_ab
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog
from engine.ram.workloads import (
    FLAG_INITIALISED, NREGS, REG_CHUNKS, REG_FLAGS, REG_PAGES, REG_PASSES, REG_PC,
    Pacer, WorkloadSpec, make_workload)


@pytest.mark.parametrize("kwargs", [
    {"name": "nope"}, {"name": "random", "dirty_rate_mbps": -1},
    {"name": "random", "dirty_rate_mbps": float("nan")},
    {"name": "random", "hot_set": 0}, {"name": "random", "hot_set": 1.5},
    {"name": "random", "seed": -1},
])
def test_spec_validation(kwargs):
    with pytest.raises(ConfigError):
        WorkloadSpec(**kwargs)


def test_spec_parse():
    assert WorkloadSpec.parse("ab") == WorkloadSpec("ab")
    assert WorkloadSpec.parse("random:100") == WorkloadSpec("random", 100.0)
    assert WorkloadSpec.parse("random:dirty_rate_mbps=5,hot_set=0.25,seed=3") == \
        WorkloadSpec("random", 5.0, 0.25, 3)
    with pytest.raises(ConfigError):
        WorkloadSpec.parse("random:colour=red")
    with pytest.raises(ConfigError):
        WorkloadSpec.parse("random:fast")


def test_pages_per_second_counts_4k_pages_in_mib():
    assert WorkloadSpec("random", 4).pages_per_second(2) == 512
    assert WorkloadSpec("random").pages_per_second(2) == 0


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_pacer_spaces_chunks():
    clock = FakeClock()
    pacer = Pacer(1000, clock)
    pacer.reset()
    assert pacer.delay() <= 0
    pacer.account(100)                   # 100 pages at 1000/s: next at +0.1 s
    assert pacer.delay() == pytest.approx(0.1)
    clock.now += 0.1
    assert pacer.delay() <= 0
    unpaced = Pacer(0, clock)
    unpaced.account(10 ** 6)
    assert unpaced.delay() == 0


@pytest.fixture
def memory():
    block = RamBlock.create("ram", 300 * 4096)
    log = DirtyLog.create(block.npages)
    regs = np.zeros((3, NREGS), dtype=np.uint64)
    yield block, log, regs
    log.close()
    log.unlink()
    block.close()
    block.unlink()


def test_ab_chunks_walk_the_slices_and_resume_from_registers(memory):
    block, log, regs = memory
    block.pages[:, 0] = 0xEE                      # ab zeroes byte 0 on first start
    cpus = [make_workload(WorkloadSpec("ab"), i, 3, [block], [log], regs[i])
            for i in range(3)]
    for cpu in cpus:
        cpu.resume()
    assert (block.pages[:, 0] == 0).all()
    assert log.harvest().size == 300
    for _ in range(5):              # chunks stop at the slice end: 64, 36, 64, 36, 64
        for cpu in cpus:
            cpu.step()
    assert regs[:, REG_PASSES].tolist() == [2, 2, 2]
    assert regs[:, REG_PC].tolist() == [64, 64, 64]
    assert regs[0, REG_FLAGS] == FLAG_INITIALISED
    assert regs[:, REG_CHUNKS].tolist() == [5, 5, 5]
    assert regs[0, REG_PAGES] == 264
    assert check_ab(block.pages, slices=3).edges == [64, 164, 264]
    # A fresh workload object on the same registers carries on, no re-zeroing.
    again = make_workload(WorkloadSpec("ab"), 1, 3, [block], [log], regs[1])
    again.resume()
    assert block.pages[100, 0] == 3 and block.pages[170, 0] == 2
    again.step()
    assert block.pages[170, 0] == 3
    assert regs[1, REG_PC] == 0 and regs[1, REG_PASSES] == 3
    result = check_ab(block.pages, slices=3)
    assert result.ok and result.edges == [64, 264]
    del cpus, again


def test_random_hot_set_gets_most_writes(memory):
    block, log, regs = memory
    cpu = make_workload(WorkloadSpec("random", hot_set=0.1, seed=1), 0, 1,
                        [block], [log], regs[0])
    cpu.resume()
    writes = np.zeros(block.npages, dtype=np.int64)
    for _ in range(20):
        before = block.pages.copy()
        cpu.step()
        changed = np.flatnonzero((before != block.pages).any(axis=1))
        assert set(changed.tolist()) <= set(log.harvest().tolist())
        writes[changed] += 1
    hot = 30
    assert writes[:hot].mean() > 5 * writes[hot:].mean()
    assert regs[0, REG_PAGES] == 20 * cpu.chunk
    del cpu
