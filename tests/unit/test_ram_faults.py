"""Postcopy faults on the vCPU side: real vCPU processes, a handler thread here.

The handler below is a stand-in for engine.postcopy.handler: it accepts
REGISTER (with the vCPU's userfaultfd in userfaultfd mode), answers
REGISTERED with "received" bitmaps the test owns, and serves faults from a
source image: userfaultfd faults with UFFDIO_COPY, software FAULTs by writing
the page, setting its received bit and sending WAKE.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time

import numpy as np
import psutil
import pytest

from engine.errors import ConfigError, PostcopyError
from engine.ram import faultproto
from engine.ram.faultproto import (MAX_MESSAGE, MODE_SOFTWARE, MODE_USERFAULTFD,
                                        Fault, Register, Registered, Wake)
from engine.uffd import Userfaultfd, buffer_address, probe, punch_hole
from engine.ram import Guest, WorkloadSpec, check_ab
from engine.ram.abcheck import ab_slices
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog
from engine.ram.faults import (STAGE_CONNECT, describe_error, error_code, missing_runs)
from engine.ram.shm import SHM_DIR
from engine.ram.workloads import (FLAG_INITIALISED, NREGS, REG_FLAGS, REG_PAGES, REG_PASSES,
                                  REG_PC, make_workload)

MiB = 1 << 20
PAGE = 4096
AB = WorkloadSpec("ab")
PASSES = 7

needs_uffd = pytest.mark.skipif(not probe()[0], reason=f"no userfaultfd: {probe()[1]}")
MODES = [pytest.param("userfaultfd", marks=needs_uffd), "software"]


def wait_until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Handler:
    """A fault handler thread serving pages of *source* (one array per block)."""

    def __init__(self, path: str, blocks: list[RamBlock], source: list[np.ndarray]):
        self.path = path
        self.blocks = blocks
        self.source = source
        self.received = [DirtyLog.create(b.npages) for b in blocks]
        self.registrations: list[Register] = []
        self.faults = 0
        self.serving = True
        self.errors: list[BaseException] = []
        self._conns: dict[int, socket.socket] = {}
        self._uffds: dict[int, tuple[Userfaultfd, tuple[int, ...], int]] = {}
        self._pids: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(16)
        self._poll = select.poll()
        self._poll.register(self.listener, select.POLLIN)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for fd, _ in self._poll.poll(10):
                    with self._lock:
                        if fd == self.listener.fileno():
                            conn, _ = self.listener.accept()
                            self._conns[conn.fileno()] = conn
                            self._poll.register(conn, select.POLLIN)
                        elif fd in self._uffds:
                            self._serve_uffd(fd)
                        elif fd in self._conns:
                            self._on_message(fd)
        except BaseException as exc:   # surfaced by close()
            self.errors.append(exc)

    def _drop(self, fd: int) -> None:
        self._poll.unregister(fd)
        self._conns.pop(fd).close()
        for ufd, (uffd, _, owner) in list(self._uffds.items()):
            if owner == fd:
                self._poll.unregister(ufd)
                del self._uffds[ufd]
                uffd.close()

    def _on_message(self, fd: int) -> None:
        conn = self._conns[fd]
        try:
            data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 4)
        except ConnectionResetError:
            data = b""      # the vCPU hung up with WAKEs it never read
        if not data:
            self._drop(fd)
            return
        msg = faultproto.unpack(data)
        if isinstance(msg, Register):
            self.registrations.append(msg)
            if msg.mode == MODE_USERFAULTFD:
                assert len(fds) == 1, "REGISTER in userfaultfd mode carries the uffd"
                uffd = Userfaultfd.from_fd(fds[0])
                self._uffds[uffd.fd] = (uffd, msg.bases, fd)
                self._pids[uffd.fd] = msg.pid
                self._poll.register(uffd.fd, select.POLLIN)
            else:
                assert not fds
            conn.send(faultproto.pack(Registered(tuple(
                (log.handle.shm_name, log.npages) for log in self.received))))
        elif isinstance(msg, Fault):
            self.faults += 1
            if self.serving:
                b, lo, hi = msg.block, msg.page, msg.page + msg.count
                # The page first, its received bit second: the vCPU reads them
                # in the other order.
                self.blocks[b].pages[lo:hi] = self.source[b][lo:hi]
                self.received[b].log[lo:hi] = 1
                try:
                    conn.send(faultproto.pack(Wake()))
                except (BrokenPipeError, ConnectionResetError):
                    self._drop(fd)

    def _serve_uffd(self, fd: int) -> None:
        uffd, bases, _ = self._uffds[fd]
        for event in uffd.read_events():
            self.faults += 1
            if not self.serving:
                continue
            for b, base in enumerate(bases):
                if base <= event.address < base + self.blocks[b].used_length:
                    page = (event.address - base) // PAGE
                    try:
                        uffd.copy(base + page * PAGE, buffer_address(self.source[b][page]),
                                  PAGE)
                    except PostcopyError:
                        if psutil.pid_exists(owner_pid := self._pids[fd]) and \
                                psutil.Process(owner_pid).status() != psutil.STATUS_ZOMBIE:
                            raise
                        return      # the vCPU is gone (guest closed meanwhile)
                    self.received[b].log[page] = 1
                    break
            else:
                raise AssertionError(f"fault at {event.address:#x} outside every block")

    def die(self) -> None:
        """Stop serving and close every connection and descriptor, as a crash would."""
        with self._lock:
            self.serving = False
            for fd in list(self._conns):
                self._drop(fd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for fd in list(self._conns):
                self._drop(fd)
        self.listener.close()
        for log in self.received:
            log.close()
            log.unlink()
        assert not self.errors, self.errors


def ab_image(npages: int, nvcpus: int, pcs) -> tuple[np.ndarray, np.ndarray]:
    """A source's memory and registers for an ab guest PASSES passes in.

    Byte 0 follows the ab loop; the other bytes are random, so a page that
    did not come from the handler shows.
    """
    image = np.random.default_rng(5).integers(0, 256, (npages, PAGE), dtype=np.uint8)
    regs = np.zeros((nvcpus, NREGS), dtype=np.uint64)
    bounds = ab_slices(npages, nvcpus)
    for k, pc in enumerate(pcs):
        lo, hi = bounds[k], bounds[k + 1]
        image[lo:lo + pc, 0] = PASSES + 1
        image[lo + pc:hi, 0] = PASSES
        regs[k, REG_PC], regs[k, REG_PASSES], regs[k, REG_FLAGS] = pc, PASSES, FLAG_INITIALISED
    assert check_ab(image, slices=nvcpus).ok
    return image, regs


def assert_ab_matches_registers(guest: Guest) -> None:
    col = guest.blocks[0].pages[:, 0]
    bounds = ab_slices(guest.blocks[0].npages, guest.nvcpus)
    for k, regs in enumerate(guest.registers.copy()):
        lo, hi = bounds[k], bounds[k + 1]
        pc, passes = int(regs[REG_PC]), int(regs[REG_PASSES])
        assert (col[lo:lo + pc] == (passes + 1) % 256).all(), f"vCPU {k} before pc"
        assert (col[lo + pc:hi] == passes % 256).all(), f"vCPU {k} after pc"


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def postcopy_guest(tmp_path):
    """A paused 2-vCPU ab destination whose RAM is all missing, and a handler."""
    guest = Guest.create([("pc.ram", 4 * MiB, None)], vcpus=2, workload=AB, start=False)
    handler = None
    try:
        block = guest.blocks[0]
        image, regs = ab_image(block.npages, 2, [100, 300])
        guest.set_cpu_state({"registers": regs.tolist(), "counter": 0})
        # RamBlock.create reserved every page; a hole is what userfaultfd
        # calls missing.  Nothing here reads the block until the vCPUs ran.
        punch_hole(block.fd, 0, block.used_length)
        handler = Handler(str(tmp_path / "handler.sock"), guest.blocks, [image])
        yield guest, handler, image
    finally:
        names = [guest.blocks[0].handle.shm_name] + [l.handle.shm_name for l in guest.dirty_logs]
        pids = guest.pids
        guest.close()
        if handler is not None:
            names += [log.handle.shm_name for log in handler.received]
            handler.close()
        assert not set(pids) & children()
        assert not any(os.path.exists(os.path.join(SHM_DIR, n)) for n in names)


@pytest.mark.parametrize("mode", MODES)
def test_vcpus_fault_in_missing_pages_and_run_on(postcopy_guest, mode):
    guest, handler, image = postcopy_guest
    pages_before = guest.registers[:, REG_PAGES].copy()
    guest.attach_faults(handler.path, mode)          # the vCPUs are paused
    code = MODE_USERFAULTFD if mode == "userfaultfd" else MODE_SOFTWARE
    assert sorted(r.vcpu for r in handler.registrations) == [0, 1]
    assert {r.pid for r in handler.registrations} == set(guest.pids)
    assert all(r.mode == code and len(r.bases) == 1 and r.bases[0] % PAGE == 0
               for r in handler.registrations)
    assert handler.faults == 0
    guest.start()
    # Two more passes: every vCPU walked its whole slice, faulting it in.
    wait_until(lambda: (guest.registers[:, REG_PASSES] >= PASSES + 2).all(),
               what="the vCPUs to run on faulted-in memory")
    guest.stop()
    assert (guest.registers[:, REG_PAGES] > pages_before).all()
    assert handler.faults > 0
    assert all((log.log == 1).all() for log in handler.received)
    block = guest.blocks[0]
    # Every page is the source's (not a zero page), then advanced by the loop.
    assert np.array_equal(block.pages[:, 1:], image[:, 1:])
    result = guest.check_ab()
    assert result.ok, result.report()
    assert_ab_matches_registers(guest)

    guest.detach_faults()
    wait_until(lambda: handler.connections == 0, what="the vCPUs to hang up")
    faults = handler.faults
    before = guest.registers[:, REG_PAGES].copy()
    guest.start()
    wait_until(lambda: (guest.registers[:, REG_PAGES] > before).all(), what="run after detach")
    guest.stop()
    assert handler.faults == faults
    assert guest.check_ab().ok
    guest.detach_faults()                            # idempotent


@pytest.mark.parametrize("mode", MODES)
def test_random_writers_touch_only_pages_they_were_given(tmp_path, mode):
    sizes = [1 * MiB, 256 * 1024]
    blocks = [("pc.ram", sizes[0], None), ("vga.vram", sizes[1], None)]
    with Guest.create(blocks, vcpus=2, workload=WorkloadSpec("random", seed=9),
                      start=False) as guest:
        rng = np.random.default_rng(1)
        source = [rng.integers(1, 256, (b.npages, PAGE), dtype=np.uint8) for b in guest.blocks]
        for block in guest.blocks:
            punch_hole(block.fd, 0, block.used_length)
        handler = Handler(str(tmp_path / "h.sock"), guest.blocks, source)
        try:
            guest.attach_faults(handler.path, mode)
            guest.start()
            wait_until(lambda: (guest.registers[:, REG_PAGES] >= 2000).all(),
                       what="random writes")
            guest.stop()
            guest.detach_faults()
            for b, block in enumerate(guest.blocks):
                received = handler.received[b].log != 0
                written = guest.sync_dirty(block.idstr)
                assert written.size and received[written].all()
                # A page nobody gave the vCPUs is untouched (still a hole).
                assert not block.pages[~received].any()
                # Given pages came from the source, which has no zero byte: a
                # word is the source's or a random write, never zero.
                assert (block.pages[received].view(np.uint64) != 0).all()
        finally:
            handler.close()


@pytest.mark.parametrize("mode", MODES)
def test_running_vcpus_attach_at_a_chunk_boundary(tmp_path, mode):
    with Guest.create([("pc.ram", 2 * MiB, None)], vcpus=2, workload=AB) as guest:
        wait_until(lambda: (guest.registers[:, REG_PASSES] >= 2).all())
        handler = Handler(str(tmp_path / "h.sock"), guest.blocks, [guest.blocks[0].pages])
        try:
            for log in handler.received:
                log.log[:] = 1                       # precopy delivered everything
            guest.attach_faults(handler.path, mode)
            assert guest.running and len(handler.registrations) == 2
            before = guest.registers[:, REG_PAGES].copy()
            wait_until(lambda: (guest.registers[:, REG_PAGES] > before).all(),
                       what="the vCPUs to keep running")
            guest.detach_faults()
            guest.stop()
            assert handler.faults == 0
            assert guest.check_ab().ok
        finally:
            handler.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_bad_handler_path_names_the_vcpus(tmp_path, mode):
    with Guest.create([("pc.ram", 1 * MiB, None)], vcpus=2, workload=AB) as guest:
        path = str(tmp_path / "nobody-listens.sock")
        with pytest.raises(PostcopyError) as info:
            guest.attach_faults(path, mode)
        text = str(info.value)
        assert "vCPU 0" in text and "vCPU 1" in text
        assert "cannot connect to the fault handler" in text and "ENOENT" in text
        assert path in text
        # Nothing stays registered: the guest runs and stops as before.
        before = guest.registers[:, REG_PAGES].copy()
        wait_until(lambda: (guest.registers[:, REG_PAGES] > before).all())
        guest.stop()
        assert guest.check_ab().ok
        with pytest.raises(ConfigError):
            guest.attach_faults(path, "telepathy")


def test_dead_or_stuck_vcpus_are_postcopy_errors(tmp_path):
    with Guest.create([("pc.ram", 1 * MiB, None)], vcpus=2, workload=AB,
                      start=False) as guest:
        path = str(tmp_path / "h.sock")
        os.kill(guest.pids[1], signal.SIGSTOP)
        try:
            with pytest.raises(PostcopyError, match=r"vCPU 1 \(pid \d+\) did not finish"):
                guest.attach_faults(path, "software", timeout=0.3)
        finally:
            os.kill(guest.pids[1], signal.SIGCONT)
        os.kill(guest.pids[1], signal.SIGKILL)
        with pytest.raises(PostcopyError, match=r"vCPU 1 .* died with exit code -9"):
            guest.detach_faults()
    with Guest.create([("pc.ram", 1 * MiB, None)], vcpus=0) as guest:
        guest.attach_faults(str(tmp_path / "none.sock"), "software")    # no vCPUs: no-op
        guest.detach_faults()


def test_software_waiters_block_on_a_dead_handler_and_still_detach(postcopy_guest):
    guest, handler, image = postcopy_guest
    handler.serving = False
    guest.attach_faults(handler.path, "software")
    before = guest.registers.copy()
    guest.start()
    wait_until(lambda: handler.faults >= 2, what="both vCPUs to fault")
    handler.die()
    time.sleep(0.2)
    # Blocked, not running on zeros: no store, no register moved.
    assert np.array_equal(guest.registers, before)
    assert not guest.blocks[0].array.any()
    # A newer request cancels the wait, so detaching never hangs on a page.
    guest.detach_faults()
    guest.stop()


@needs_uffd
def test_uffd_vcpus_stay_blocked_when_the_handler_dies(postcopy_guest):
    guest, handler, image = postcopy_guest
    handler.serving = False
    guest.attach_faults(handler.path, "userfaultfd")
    before = guest.registers.copy()
    guest.start()
    wait_until(lambda: handler.faults >= 2, what="both vCPUs to fault")
    handler.die()          # closes the handler's copies of the uffds
    time.sleep(0.2)
    assert np.array_equal(guest.registers, before)
    for pid in guest.pids:
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    # The fixture's close() must still reap them (they block in the kernel).


# -- single process ---------------------------------------------------------------


def test_missing_runs():
    present = np.ones(20, dtype=np.uint8)
    present[[3, 4, 5, 9, 15, 16]] = 0
    starts, counts = missing_runs(present, np.arange(2, 17))
    assert starts.tolist() == [3, 9, 15] and counts.tolist() == [3, 1, 2]
    starts, counts = missing_runs(present, np.array([16, 4, 1, 4, 3, 15]))
    assert starts.tolist() == [3, 15] and counts.tolist() == [2, 2]
    assert missing_runs(present, np.array([0, 1]))[0].size == 0


def test_error_codes_describe_themselves():
    code = error_code(STAGE_CONNECT, 2)
    assert code == (STAGE_CONNECT << 16) | 2
    assert describe_error(code) == \
        "cannot connect to the fault handler: ENOENT (No such file or directory)"


class FakeFaults:
    """Records what a workload asks for; answers *ok*."""

    def __init__(self, ok: bool):
        self.ok = ok
        self.calls = []

    def touch(self, block, first, count):
        self.calls.append((block, first, count))
        return self.ok

    def touch_pages(self, block, pages):
        self.calls.append((block, sorted(set(pages.tolist()))))
        return self.ok


@pytest.fixture
def memory():
    blocks = [RamBlock.create("ram", 200 * PAGE), RamBlock.create("rom", 56 * PAGE)]
    logs = [DirtyLog.create(b.npages) for b in blocks]
    regs = np.zeros((2, NREGS), dtype=np.uint64)
    yield blocks, logs, regs
    for obj in (*logs, *blocks):
        obj.close()
        obj.unlink()


def test_ab_asks_before_touching_and_gives_up_cleanly(memory):
    blocks, logs, regs = memory
    cpu = make_workload(WorkloadSpec("ab"), 1, 2, blocks[:1], logs[:1], regs[1])
    cpu.faults = FakeFaults(False)
    assert cpu.resume() is False                       # initialising needs the slice
    assert cpu.faults.calls == [(0, 100, 100)] and regs[1, REG_FLAGS] == 0
    cpu.faults = FakeFaults(True)
    assert cpu.resume() is True
    assert cpu.faults.calls == [(0, 100, 100)]
    cpu.faults.ok = False
    snapshot, saved = blocks[0].array.copy(), regs.copy()
    assert cpu.step() == 0
    assert cpu.faults.calls[-1] == (0, 100, 64)
    assert np.array_equal(snapshot, blocks[0].array) and np.array_equal(saved, regs)
    cpu.faults.ok = True
    assert cpu.step() == 64 and cpu.step() == 36
    assert cpu.faults.calls[-2:] == [(0, 100, 64), (0, 164, 36)]
    assert regs[1, REG_PASSES] == 1
    cpu.faults = None
    assert cpu.step() == 64
    del cpu


def test_random_asks_for_every_picked_page_before_the_first_store(memory):
    blocks, logs, regs = memory
    cpu = make_workload(WorkloadSpec("random", seed=3), 0, 1, blocks, logs, regs[0])
    cpu.resume()
    cpu.faults = FakeFaults(False)
    assert cpu.step() == 0
    assert len(cpu.faults.calls) == 1                  # gave up at the first block
    assert not any(b.array.any() for b in blocks) and regs[0, REG_PAGES] == 0
    cpu.faults = FakeFaults(True)
    assert cpu.step() == cpu.chunk
    asked = {b: set(pages) for b, pages in cpu.faults.calls}
    assert set(asked) == {0, 1}
    for b, block in enumerate(blocks):
        written = set(np.flatnonzero(block.pages.any(axis=1)).tolist())
        assert written <= asked[b]
        assert set(logs[b].harvest().tolist()) == asked[b]
    del cpu


@needs_uffd
def test_a_failed_unregister_reports_the_detach_stage():
    """An UFFDIO_UNREGISTER that fails (here: an unaligned range, EINVAL)
    ends detach() with the detach stage's code and text, like every other
    stage's failure (it used to put the stage number where the code goes)."""
    from engine.errors import FaultSetupError
    from engine.ram.faults import STAGE_DETACH, FaultClient
    client = FaultClient(0, [], lambda: False)
    client.uffd = Userfaultfd.open()
    client._registered = [(1, PAGE)]
    with pytest.raises(FaultSetupError) as info:
        client.detach()
    assert info.value.code == error_code(STAGE_DETACH)
    assert str(info.value).startswith("cannot unregister from userfaultfd: UFFDIO_UNREGISTER")
    assert client.uffd is None      # released all the same
