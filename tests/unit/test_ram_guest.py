"""Guests with real vCPU processes: stop/start, resume, workloads, cleanup."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from engine.errors import ConfigError, GuestError
from engine.ram import Guest, RamBlock, WorkloadSpec, check_ab
from engine.ram.abcheck import ab_slices
from engine.ram.shm import SHM_DIR
from engine.ram.workloads import (
    FLAG_INITIALISED, REG_FLAGS, REG_PAGES, REG_PASSES, REG_PC)

MiB = 1 << 20
AB = WorkloadSpec("ab")


def segment_names(guest: Guest) -> list[str]:
    names = [b.handle.shm_name for b in guest.blocks if b.handle.shm_name]
    names += [log.handle.shm_name for log in guest.dirty_logs]
    names.append(guest._res.control.handle.shm_name)
    return names


def shm_exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


def wait_until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def assert_ab_matches_registers(guest: Guest) -> None:
    """Byte 0 of every page is what the registers say the loop has done."""
    col = guest.blocks[0].pages[:, 0]
    bounds = ab_slices(guest.blocks[0].npages, guest.nvcpus)
    for k, regs in enumerate(guest.registers.copy()):
        lo, hi = bounds[k], bounds[k + 1]
        pc, passes = int(regs[REG_PC]), int(regs[REG_PASSES])
        assert (col[lo:lo + pc] == (passes + 1) % 256).all(), f"vCPU {k} before pc"
        assert (col[lo + pc:hi] == passes % 256).all(), f"vCPU {k} after pc"


def min_passes(guest: Guest) -> int:
    """Passes of the slowest vCPU (each must have run for the tests to mean much)."""
    return int(guest.registers[:, REG_PASSES].min())


@pytest.fixture
def ab_guest():
    guest = Guest.create([("pc.ram", 4 * MiB, None)], vcpus=3, workload=AB)
    yield guest
    guest.close()


def test_ab_runs_and_stop_really_stops(ab_guest):
    guest = ab_guest
    assert guest.running
    wait_until(lambda: min_passes(guest) >= 3, what="ab passes")
    guest.stop()
    assert not guest.running
    snapshot = guest.blocks[0].array.copy()
    registers = guest.registers.copy()
    counter = guest.counter
    time.sleep(0.2)
    assert np.array_equal(snapshot, guest.blocks[0].array)
    assert np.array_equal(registers, guest.registers)
    assert guest.counter == counter > 0
    assert (guest.registers[:, REG_FLAGS] & FLAG_INITIALISED).all()
    assert_ab_matches_registers(guest)
    result = guest.check_ab()
    assert result.ok, result.report()
    assert check_ab(guest.blocks[0].pages, slices=3).ok
    # Every page was written, so every page is dirty; then the log is clean.
    assert guest.sync_dirty("pc.ram").size == guest.blocks[0].npages
    assert guest.sync_dirty("pc.ram").size == 0


def test_start_resumes_from_registers(ab_guest):
    guest = ab_guest
    wait_until(lambda: min_passes(guest) >= 3)
    guest.stop()
    before = guest.registers.copy()
    counter = guest.counter
    guest.start()
    wait_until(lambda: (guest.registers[:, REG_PAGES] > before[:, REG_PAGES]).all(),
               what="every vCPU to run again")
    guest.stop()
    after = guest.registers.copy()
    assert guest.counter > counter
    assert (after[:, REG_PAGES] > before[:, REG_PAGES]).all()
    assert (after[:, REG_PASSES] >= before[:, REG_PASSES]).all()
    assert_ab_matches_registers(guest)
    assert guest.check_ab().ok


def test_planted_corruption_is_caught(ab_guest):
    guest = ab_guest
    wait_until(lambda: min_passes(guest) >= 3)
    guest.stop()
    pages = guest.blocks[0].pages
    assert guest.check_ab().ok
    page = guest.blocks[0].npages // 6             # inside vCPU 0's slice
    pages[page, 0] -= 3
    result = guest.check_ab()
    assert not result.ok and result.first_bad[0][0] == page


def test_state_carries_over_to_a_second_guest(ab_guest):
    source = ab_guest
    wait_until(lambda: min_passes(source) >= 3)
    source.stop()
    state = source.get_cpu_state()
    # Make the state unmistakable: 1000 more passes, consistently in the
    # registers and in memory.  A destination that re-zeroed its memory or
    # reset its registers could not end up agreeing with both.
    for regs in state["registers"]:
        regs[REG_PASSES] += 1000
    pages = np.array(state["registers"], dtype=np.uint64)[:, REG_PAGES]
    with Guest.create([("pc.ram", 4 * MiB, None)], vcpus=3, workload=AB,
                      start=False) as dest:
        assert not dest.running
        dest.blocks[0].array[:] = source.blocks[0].array
        dest.blocks[0].pages[:, 0] += 1000 % 256
        dest.set_cpu_state(state)
        assert dest.counter == state["counter"]
        assert dest.check_ab().ok
        dest.start()
        wait_until(lambda: dest.counter > state["counter"] + 200
                   and (dest.registers[:, REG_PAGES] > pages).all(), what="dest to run")
        dest.stop()
        passes = np.array(state["registers"], dtype=np.uint64)[:, REG_PASSES]
        assert (dest.registers[:, REG_PASSES] >= passes).all()
        assert (dest.registers[:, REG_PASSES] < passes + 10 ** 6).all()
        assert_ab_matches_registers(dest)
        result = dest.check_ab()
        assert result.ok, result.report()


def test_cpu_state_needs_a_stopped_guest_of_the_same_shape(ab_guest):
    state = ab_guest.get_cpu_state()
    assert len(state["registers"]) == 3 and len(state["registers"][0]) == 16
    with pytest.raises(GuestError, match="stop"):
        ab_guest.set_cpu_state(state)
    with pytest.raises(GuestError, match="stop"):
        ab_guest.counter = 5
    ab_guest.stop()
    with pytest.raises(GuestError, match="shape"):
        ab_guest.set_cpu_state({"registers": state["registers"][:2], "counter": 0})
    ab_guest.counter = 5
    assert ab_guest.counter == 5


def test_random_workload_dirties_pages_within_its_rate():
    rate = 20    # MiB/s, 5120 pages/s over both vCPUs
    blocks = [("pc.ram", 2 * MiB, None), ("vga.vram", 1 * MiB, None)]
    t0 = time.monotonic()
    with Guest.create(blocks, vcpus=2, workload=WorkloadSpec("random", rate)) as guest:
        wait_until(lambda: guest.registers[:, REG_PAGES].sum() >= 200, what="writes")
        guest.stop()
        elapsed = time.monotonic() - t0
        written = int(guest.registers[:, REG_PAGES].sum())
        dirty = sum(guest.sync_dirty(b.idstr).size for b in guest.blocks)
        assert 0 < dirty <= written
        assert guest.blocks[0].array.any()
        # Pacing never runs ahead (it can only fall behind on a slow machine);
        # one chunk per vCPU of slack.
        assert written <= rate * MiB / 4096 * elapsed + 2 * 64


def test_none_workload_leaves_memory_alone():
    with Guest.create([("pc.ram", 1 * MiB, None)], vcpus=2) as guest:
        guest.blocks[0].pages[:, 0] = 7
        time.sleep(0.05)
        guest.stop()
        guest.start()
        guest.stop()
        assert (guest.blocks[0].pages[:, 0] == 7).all()
        assert guest.counter == 0
        assert guest.sync_dirty("pc.ram").size == 0


def test_guest_without_vcpus():
    with Guest.create([("pc.ram", 64 * 1024), ("rom", 4096, None)], vcpus=0,
                      workload=AB) as guest:
        assert guest.pids == [] and guest.registers.shape == (0, 16)
        guest.start()
        assert guest.running
        guest.stop()
        guest.counter = 3
        assert guest.get_cpu_state() == {"registers": [], "counter": 3}
        assert guest.block("rom").npages == 1
        with pytest.raises(GuestError):
            guest.block("nope")


def test_bad_guest_configurations():
    with pytest.raises(ConfigError):
        Guest.create([("a", 4096), ("a", 4096)], vcpus=0)
    with pytest.raises(ConfigError):
        Guest.create([("a", 4096)], vcpus=-1)
    with pytest.raises(ConfigError):
        Guest.create([], vcpus=1, workload=AB)
    with pytest.raises(ConfigError):
        Guest.create([("a", 4097)], vcpus=0)


def test_from_blocks_leaves_the_callers_blocks_open(tmp_path):
    with RamBlock.create("pc.ram", 1 * MiB) as ram, \
            RamBlock.create("file.ram", 256 * 1024, mem_path=str(tmp_path / "m")) as fram:
        with Guest.from_blocks([ram, fram], vcpus=1, workload=AB) as guest:
            wait_until(lambda: min_passes(guest) >= 2)
            guest.stop()
            assert guest.check_ab().ok
            names = segment_names(guest)[2:]      # the guest's own segments
        assert not ram.closed and not fram.closed
        assert shm_exists(ram.handle.shm_name)
        assert not any(shm_exists(n) for n in names)
        assert check_ab(ram.pages).ok


def test_close_leaves_no_segments_and_no_processes(tmp_path):
    guest = Guest.create([("pc.ram", 1 * MiB, None),
                          ("file.ram", 64 * 1024, str(tmp_path / "f"))],
                         vcpus=2, workload=AB)
    names, pids = segment_names(guest), guest.pids
    assert len(names) == 4 and all(shm_exists(n) for n in names)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    assert set(pids) <= children
    guest.close()                                  # while running
    guest.close()
    assert guest.closed and not guest.running
    assert not any(shm_exists(n) for n in names)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    assert not set(pids) & children
    assert (tmp_path / "f").exists()
    with pytest.raises(GuestError):
        guest.start()


def test_vcpus_ignore_sigint_and_a_dead_vcpu_is_reported():
    with Guest.create([("pc.ram", 1 * MiB, None)], vcpus=2, workload=AB) as guest:
        os.kill(guest.pids[0], signal.SIGINT)
        wait_until(lambda: min_passes(guest) >= 2)
        guest.stop()
        assert guest.check_ab().ok
        guest.start()
        os.kill(guest.pids[1], signal.SIGKILL)
        with pytest.raises(GuestError, match=r"vCPU 1 .* exit code -9"):
            guest.stop()
        names = segment_names(guest)
    assert not any(shm_exists(n) for n in names)


def test_a_vcpu_that_does_not_pause_is_a_timeout_error():
    with Guest.create([("pc.ram", 1 * MiB, None)], vcpus=2, workload=AB) as guest:
        wait_until(lambda: min_passes(guest) >= 1)
        os.kill(guest.pids[1], signal.SIGSTOP)
        try:
            with pytest.raises(GuestError, match="vCPU 1 .* did not pause"):
                guest.stop(timeout=0.3)
        finally:
            os.kill(guest.pids[1], signal.SIGCONT)
        guest.stop()
        assert guest.check_ab().ok


def _run_python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_full_lifecycle_in_a_fresh_process_is_silent():
    # The resource tracker would complain at exit about leaked or doubly
    # unregistered segments; stderr must stay empty.
    proc = _run_python("""
        import json, time
        from engine.ram import Guest, WorkloadSpec
        with Guest.create([("pc.ram", 1 << 20, None)], vcpus=2,
                          workload=WorkloadSpec("ab")) as g:
            time.sleep(0.1)
            g.stop()
            assert g.check_ab().ok
            names = [b.handle.shm_name for b in g.blocks]
            names += [l.handle.shm_name for l in g.dirty_logs]
        print(json.dumps(names))
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err == ""
    assert not any(shm_exists(n) for n in json.loads(out))


def test_killed_coordinator_takes_vcpus_and_segments_with_it():
    proc = _run_python("""
        import json, sys, time
        from engine.ram import Guest, WorkloadSpec
        g = Guest.create([("pc.ram", 1 << 20, None)], vcpus=2,
                         workload=WorkloadSpec("ab"))
        names = [b.handle.shm_name for b in g.blocks]
        names += [l.handle.shm_name for l in g.dirty_logs]
        print(json.dumps({"pids": g.pids, "names": names}), flush=True)
        time.sleep(600)
    """)
    try:
        info = json.loads(proc.stdout.readline())
        assert all(shm_exists(n) for n in info["names"])
        proc.kill()
        # The tracker (its child) sees EOF once the coordinator and the vCPUs
        # are gone and unlinks what they left; its stderr closes after that.
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def vcpus_gone():
        for pid in info["pids"]:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                pass
        return True

    wait_until(vcpus_gone, what="vCPUs to die with their parent")
    wait_until(lambda: not any(shm_exists(n) for n in info["names"]),
               what="the tracker to unlink the segments")
