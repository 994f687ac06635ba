"""userfaultfd through ctypes: real faults in a real child process.

A spawned "vCPU" child maps a shared-memory RAM block, registers its mapping
with its own userfaultfd and sends the descriptor (SCM_RIGHTS) plus its base
address and thread id to the test, which plays the fault handler: it reads
the fault, places the page with UFFDIO_COPY, and the child reports what it
then read.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import multiprocessing
import os
import pickle
import select
import socket
import threading

import numpy as np
import pytest

from engine.errors import PostcopyError
from engine import uffd as U
from engine.uffd import (FaultEvent, Userfaultfd, buffer_address, probe,
                                  punch_hole)
from engine.ram.block import RamBlock

PS = 4096
NPAGES = 8
# A fault the test has not resolved keeps the child blocked; every wait is
# bounded so that a broken kernel interface fails the test instead of hanging.
WAIT_S = 10.0

needs_uffd = pytest.mark.skipif(not probe()[0], reason=f"no userfaultfd here: {probe()[1]}")


# ---------------------------------------------------------------------------
# The child ("vCPU")

def _vcpu(handle, sock: socket.socket, ops: list) -> None:
    """Map the block, register it, hand the uffd over, then run *ops*.

    ops: ("read", page) -> sends ("read", page, bytes);
         ("write", page, byte) -> fills the page, sends ("wrote", page);
         ("sync",) -> waits for any message from the parent;
         ("unregister",) -> unregisters the whole block, sends ("unregistered",).
    """
    block = RamBlock.attach(handle)
    try:
        uffd = Userfaultfd.open()
        base = buffer_address(block.pages)
        uffd.register(base, block.used_length)
        socket.send_fds(sock, [pickle.dumps(("hello", base, threading.get_native_id(),
                                             uffd.features))], [uffd.fd])
        pages = block.pages
        for op in ops:
            if op[0] == "read":
                sock.send(pickle.dumps(("read", op[1], pages[op[1]].tobytes())))
            elif op[0] == "write":
                pages[op[1]][:] = op[2]
                sock.send(pickle.dumps(("wrote", op[1])))
            elif op[0] == "sync":
                sock.recv(64)
            elif op[0] == "unregister":
                uffd.unregister(base, block.used_length)
                sock.send(pickle.dumps(("unregistered",)))
        uffd.close()
    finally:
        del pages
        block.close()
        sock.close()


class Child:
    """A running vCPU child and the parent's end of its socket."""

    def __init__(self, block: RamBlock, ops: list):
        ctx = multiprocessing.get_context("spawn")
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = ctx.Process(target=_vcpu, args=(block.handle, theirs, ops), daemon=True)
        self.uffd: Userfaultfd | None = None
        try:
            self.proc.start()
        finally:
            theirs.close()
        self.sock.settimeout(WAIT_S)
        msg, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 1)
        assert msg, "child died before registering"
        assert len(fds) == 1, "no userfaultfd came with the hello"
        self.uffd = Userfaultfd.from_fd(fds[0])
        _, self.base, self.tid, self.features = pickle.loads(msg)

    def recv(self):
        data = self.sock.recv(2 * PS)
        assert data, "child hung up"
        return pickle.loads(data)

    def pending(self, timeout: float) -> bool:
        """Whether the child sent something within *timeout* seconds."""
        return bool(select.select([self.sock], [], [], timeout)[0])

    def fault(self) -> FaultEvent:
        """Wait for exactly one fault message."""
        assert select.select([self.uffd.fd], [], [], WAIT_S)[0], "no fault arrived"
        events = self.uffd.read_events()
        assert len(events) == 1, events
        return events[0]

    def finish(self) -> int:
        self.proc.join(WAIT_S)
        return self.proc.exitcode

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(WAIT_S)
        self.proc.close()
        if self.uffd is not None:
            self.uffd.close()
        self.sock.close()


@pytest.fixture
def block():
    b = RamBlock.create("pc.ram", NPAGES * PS)
    try:
        # create() reserves every page (fallocate): present pages never
        # fault, so start from holes as a postcopy destination's discards do.
        punch_hole(b.fd, 0, b.used_length)
        yield b
    finally:
        b.close()
        b.unlink()


@contextlib.contextmanager
def child(block: RamBlock, ops: list):
    c = Child(block, ops)
    try:
        yield c
    finally:
        c.close()


def _pattern(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, PS, dtype=np.uint8)


# ---------------------------------------------------------------------------
# Constants: the request numbers the kernel's header defines

def test_ioctl_numbers_match_linux_header():
    assert U.UFFDIO_API == 0xC018AA3F
    assert U.UFFDIO_REGISTER == 0xC020AA00
    assert U.UFFDIO_UNREGISTER == 0x8010AA01
    assert U.UFFDIO_WAKE == 0x8010AA02
    assert U.UFFDIO_COPY == 0xC028AA03
    assert U.UFFDIO_ZEROPAGE == 0xC020AA04
    assert U.USERFAULTFD_IOC_NEW == 0xAA00
    assert U.UFFD_MSG_SIZE == 32


@needs_uffd
def test_probe_and_open():
    assert probe() == (True, "userfaultfd")
    with Userfaultfd.open() as f:
        assert f.fileno() >= 0
        assert f.features & U.UFFD_FEATURE_THREAD_ID
        assert not os.get_blocking(f.fd)
        assert f.read_events() == []
    assert f.fd == -1
    f.close()   # idempotent


# ---------------------------------------------------------------------------
# Real faults

@needs_uffd
def test_read_fault_resolved_by_copy(block):
    data = _pattern(1)
    with child(block, [("read", 3), ("sync",)]) as c:
        ev = c.fault()
        assert ev == FaultEvent(c.base + 3 * PS, False, c.tid)
        assert c.uffd.copy(ev.address, buffer_address(data), PS) is True
        assert c.recv() == ("read", 3, data.tobytes())
        # The page went into the shared file: our own mapping sees it too.
        assert bytes(block.pages[3]) == data.tobytes()
        # A second placement finds it there and leaves it alone.
        assert c.uffd.copy(ev.address, buffer_address(_pattern(2)), PS) is False
        assert bytes(block.pages[3]) == data.tobytes()
        c.sock.send(b"go")
        assert c.finish() == 0


@needs_uffd
def test_write_fault_resolved_by_zeropage(block):
    with child(block, [("write", 5, 0x5A), ("read", 5), ("sync",)]) as c:
        ev = c.fault()
        assert ev.address == c.base + 5 * PS and ev.write and ev.tid == c.tid
        assert c.uffd.zeropage(ev.address, PS) is True
        assert c.recv() == ("wrote", 5)
        assert c.recv() == ("read", 5, b"\x5a" * PS)
        assert c.uffd.zeropage(ev.address, PS) is False
        c.sock.send(b"go")
        assert c.finish() == 0
        assert bytes(block.pages[5]) == b"\x5a" * PS


@needs_uffd
def test_pages_placed_ahead_do_not_fault(block):
    a, b = _pattern(3), _pattern(4)
    with child(block, [("sync",), ("read", 0), ("read", 1)]) as c:
        # Two pages in one call, before anyone touched them.
        both = np.concatenate([a, b])
        assert c.uffd.copy(c.base, buffer_address(both), 2 * PS, wake=False) is True
        c.sock.send(b"go")
        assert c.recv() == ("read", 0, a.tobytes())
        assert c.recv() == ("read", 1, b.tobytes())
        assert c.finish() == 0
        assert c.uffd.read_events() == []


@needs_uffd
def test_copy_over_partly_present_range(block):
    present = _pattern(5)
    block.pages[1] = present        # page 1 exists, pages 0 and 2 are holes
    with child(block, [("sync",), ("read", 0), ("read", 1), ("read", 2)]) as c:
        src = np.concatenate([_pattern(6), _pattern(7), _pattern(8)])
        assert c.uffd.copy(c.base, buffer_address(src), 3 * PS) is False
        c.sock.send(b"go")
        assert c.recv()[2] == src[:PS].tobytes()
        assert c.recv()[2] == present.tobytes()         # not overwritten
        assert c.recv()[2] == src[2 * PS:].tobytes()    # placed past the existing page
        assert c.finish() == 0


@needs_uffd
def test_punch_hole_makes_a_page_fault_again(block):
    first, second = _pattern(9), _pattern(10)
    with child(block, [("read", 2), ("sync",), ("read", 2)]) as c:
        ev = c.fault()
        assert c.uffd.copy(ev.address, buffer_address(first), PS)
        assert c.recv() == ("read", 2, first.tobytes())
        punch_hole(block.fd, 2 * PS, PS)
        assert not block.pages[2].any()     # our (unregistered) view: zeros
        # ... which allocated the page again here; punch once more so the
        # child finds a hole.
        punch_hole(block.fd, 2 * PS, PS)
        c.sock.send(b"go")
        ev = c.fault()
        assert ev.address == c.base + 2 * PS
        assert c.uffd.copy(ev.address, buffer_address(second), PS)
        assert c.recv() == ("read", 2, second.tobytes())
        assert c.finish() == 0


@needs_uffd
def test_reserved_pages_are_present_not_missing():
    # Documents why destinations punch holes: fallocate'd shm never faults.
    with RamBlock.create("pc.ram", 2 * PS) as b:
        with child(b, [("read", 0), ("sync",)]) as c:
            assert c.recv() == ("read", 0, bytes(PS))
            assert c.uffd.read_events() == []
            assert c.uffd.copy(c.base + PS, buffer_address(_pattern(11)), PS) is False
            c.sock.send(b"go")
            assert c.finish() == 0


@needs_uffd
def test_dontwake_then_wake(block):
    data = _pattern(12)
    with child(block, [("read", 4)]) as c:
        ev = c.fault()
        assert c.uffd.copy(ev.address, buffer_address(data), PS, wake=False) is True
        # Placed but not woken: the child stays blocked in its fault.
        assert not c.pending(0.3)
        c.uffd.wake(ev.address, PS)
        assert c.recv() == ("read", 4, data.tobytes())
        assert c.finish() == 0


@needs_uffd
def test_copy_on_existing_page_wakes_the_waiter(block):
    data = _pattern(13)
    with child(block, [("read", 6)]) as c:
        ev = c.fault()
        # Someone else (another vCPU's descriptor, or a plain write here)
        # installed the page; the waiter must still be released.
        block.pages[6] = data
        assert c.uffd.copy(ev.address, buffer_address(_pattern(14)), PS) is False
        assert c.recv() == ("read", 6, data.tobytes())
        assert c.finish() == 0


@needs_uffd
def test_unregister_releases_the_range(block):
    with child(block, [("unregister",), ("read", 7)]) as c:
        assert c.recv() == ("unregistered",)
        assert c.recv() == ("read", 7, bytes(PS))      # a hole, no fault
        assert c.finish() == 0
        assert c.uffd.read_events() == []


@needs_uffd
def test_copy_after_the_vcpu_exited_is_an_error(block):
    with child(block, []) as c:
        assert c.finish() == 0
        with pytest.raises(PostcopyError, match="gone"):
            c.uffd.copy(c.base, buffer_address(_pattern(15)), PS)
        with pytest.raises(PostcopyError):
            c.uffd.zeropage(c.base, PS)


# ---------------------------------------------------------------------------
# Error paths in this process

@needs_uffd
def test_register_errors():
    m = mmap.mmap(-1, 2 * PS)
    try:
        addr = buffer_address(m)
        with Userfaultfd.open() as f:
            with pytest.raises(PostcopyError, match="UFFDIO_REGISTER"):
                f.register(addr + 1, PS)            # not page aligned
            # An address nothing maps any more.
            hole = mmap.mmap(-1, PS)
            gone = buffer_address(hole)
            hole.close()
            with pytest.raises(PostcopyError, match="UFFDIO_REGISTER"):
                f.register(gone, PS)
            with pytest.raises(PostcopyError, match="UFFDIO_UNREGISTER"):
                f.unregister(addr + 1, PS)
            with pytest.raises(PostcopyError, match="UFFDIO_WAKE"):
                f.wake(addr + 1, PS)
            f.register(addr, 2 * PS)
            f.unregister(addr, 2 * PS)
        with pytest.raises(PostcopyError, match="closed"):
            f.register(addr, PS)
        with pytest.raises(PostcopyError, match="closed"):
            f.read_events()
    finally:
        m.close()


def test_from_fd_rejects_bad_descriptor():
    with pytest.raises(PostcopyError):
        Userfaultfd.from_fd(-1)


def test_open_reports_every_failure(monkeypatch):
    def refuse(*args):
        ctypes.set_errno(errno.EPERM)
        return -1
    monkeypatch.setattr(U, "_syscall", refuse)
    monkeypatch.setattr(U, "_ioctl", refuse)
    with pytest.raises(PostcopyError) as info:
        Userfaultfd.open()
    msg = str(info.value)
    assert "userfaultfd(2)" in msg and "UFFD_USER_MODE_ONLY" in msg
    assert "vm.unprivileged_userfaultfd" in msg and "/dev/userfaultfd" in msg


def test_punch_hole_errors_and_effect(tmp_path):
    with pytest.raises(PostcopyError, match="punching"):
        punch_hole(-1, 0, PS)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"\x01" * 3 * PS)
        punch_hole(fd, PS, PS)
        assert os.fstat(fd).st_size == 3 * PS           # KEEP_SIZE
        assert os.pread(fd, 3 * PS, 0) == b"\x01" * PS + bytes(PS) + b"\x01" * PS
        punch_hole(fd, 0, 0)                            # nothing to do
    finally:
        os.close(fd)


def test_buffer_address_of_every_kind():
    arr = np.zeros(2 * PS, dtype=np.uint8)
    assert buffer_address(arr) == arr.ctypes.data
    assert buffer_address(arr[PS:]) == arr.ctypes.data + PS
    mv = memoryview(arr)
    assert buffer_address(mv) == arr.ctypes.data
    assert buffer_address(mv[PS:]) == arr.ctypes.data + PS
    ba = bytearray(PS)
    addr = buffer_address(ba)
    ba.extend(b"x")     # would raise BufferError if an export were left behind
    m = mmap.mmap(-1, PS)
    addr = buffer_address(m)
    ctypes.memset(addr, 0x42, 1)
    assert m[0] == 0x42
    m.close()           # no "cannot close exported pointers"
    with pytest.raises(PostcopyError):
        buffer_address(bytearray())
