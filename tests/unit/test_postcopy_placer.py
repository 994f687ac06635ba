"""Atomic page placement: software (lock + bitmap), userfaultfd, plain.

The contenders are real processes: a spawned "fault handler" placing the
same pages under the same lock, a spawned "vCPU" reading pages as soon as
their received bit shows, and a spawned vCPU whose userfaultfd the placer
uses.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import select
import socket

import numpy as np
import pytest

from engine.errors import PostcopyError
from engine.postcopy.placer import Placer
from engine.uffd import Userfaultfd, buffer_address, probe, punch_hole
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog

PS = 4096
WAIT_S = 10.0
CTX = multiprocessing.get_context("spawn")

needs_uffd = pytest.mark.skipif(not probe()[0], reason=f"no userfaultfd here: {probe()[1]}")


def _page(seed: int, page: int) -> bytes:
    return np.random.default_rng((seed, page)).integers(1, 256, PS, dtype=np.uint8).tobytes()


@pytest.fixture
def ram():
    """Two blocks (fresh, all holes) and their received bitmaps."""
    blocks, logs = [], []
    try:
        for name, npages in (("pc.ram", 64), ("vga.vram", 16)):
            b = RamBlock.create(name, npages * PS)
            blocks.append(b)
            punch_hole(b.fd, 0, b.used_length)
            logs.append(DirtyLog.create(npages))
        yield blocks, logs
    finally:
        for log in logs:
            log.close()
            log.unlink()
        for b in blocks:
            b.close()
            b.unlink()


def _allocated(block: RamBlock) -> int:
    """Bytes of the block's file that hold memory (holes excluded)."""
    return os.fstat(block.fd).st_blocks * 512


def _join(proc) -> int:
    proc.join(WAIT_S)
    if proc.is_alive():
        proc.kill()
        proc.join(WAIT_S)
    code = proc.exitcode
    proc.close()
    return code


# ---------------------------------------------------------------------------
# plain mode (nobody runs)

def test_plain_place_once(ram):
    blocks, logs = ram
    placer = Placer(blocks, [log.log for log in logs])
    assert placer.mode == "plain"
    data = _page(1, 3)
    assert placer.place(1, 3, data) is True
    assert logs[1].log[3] == 1 and logs[0].log[3] == 0
    assert bytes(blocks[1].pages[3]) == data
    assert placer.place(1, 3, _page(2, 3)) is False
    assert bytes(blocks[1].pages[3]) == data
    # every kind of page buffer
    assert placer.place(0, 0, memoryview(_page(1, 0)))
    assert placer.place(0, 1, np.frombuffer(_page(1, 1), dtype=np.uint8))
    assert placer.place(0, 2, np.frombuffer(_page(1, 2), dtype=np.int8))
    assert placer.place(0, 5, blocks[1].pages[3])
    for p in range(3):
        assert bytes(blocks[0].pages[p]) == _page(1, p)
    assert bytes(blocks[0].pages[5]) == data
    with pytest.raises(PostcopyError, match="4096"):
        placer.place(0, 6, b"short")
    assert logs[0].log[6] == 0


def test_place_zero_leaves_fresh_memory_alone(ram):
    blocks, logs = ram
    placer = Placer(blocks, [log.log for log in logs])
    assert _allocated(blocks[0]) == 0
    assert placer.place_zero(0, 7) is True
    assert logs[0].log[7] == 1
    assert _allocated(blocks[0]) == 0          # nothing was written or read
    assert placer.place_zero(0, 7) is False


def test_place_zero_clears_memory_not_known_zero(ram):
    blocks, logs = ram
    blocks[0].pages[4] = 0x77                 # old contents (say, of a memory file)
    other = RamBlock.attach(blocks[0].handle)  # not fresh: contents unknown
    try:
        placer = Placer([other, blocks[1]], [log.log for log in logs])
        assert placer.place_zero(0, 4) is True
        assert not blocks[0].pages[4].any()
        assert logs[0].log[4] == 1
    finally:
        del placer
        other.close()


def test_discard_clears_bits_and_punches_holes(ram):
    blocks, logs = ram
    placer = Placer(blocks, [log.log for log in logs])
    for p in range(8):
        placer.place(0, p, _page(3, p))
    assert _allocated(blocks[0]) == 8 * PS
    placer.discard(0, 2 * PS, 3 * PS)
    assert list(logs[0].log[:8]) == [1, 1, 0, 0, 0, 1, 1, 1]
    assert _allocated(blocks[0]) == 5 * PS
    assert not blocks[0].pages[2:5].any()
    assert bytes(blocks[0].pages[1]) == _page(3, 1)
    assert bytes(blocks[0].pages[5]) == _page(3, 5)
    # discarded pages may be placed again
    assert placer.place(0, 3, _page(4, 3)) is True
    assert bytes(blocks[0].pages[3]) == _page(4, 3)
    placer.discard(0, 0, 0)
    for start, length in ((1, PS), (0, PS + 1), (60 * PS, 8 * PS), (-PS, PS)):
        with pytest.raises(PostcopyError, match="discard"):
            placer.discard(0, start, length)


def test_constructor_checks(ram):
    blocks, logs = ram
    with pytest.raises(PostcopyError, match="bitmaps"):
        Placer(blocks, [logs[0].log])
    with pytest.raises(PostcopyError, match="entries"):
        Placer(blocks, [logs[1].log, logs[1].log])
    with Userfaultfd.open() if probe()[0] else contextlib.nullcontext() as f:
        if f is not None:
            with pytest.raises(PostcopyError, match="base address"):
                Placer(blocks, [log.log for log in logs], uffd=f, bases=(0,))


# ---------------------------------------------------------------------------
# software mode: a lock shared with another process

def _rival(handle, log_handle, lock, barrier, seed, conn) -> None:
    """Place every page of the block with its own Placer; report which won."""
    block = RamBlock.attach(handle)
    log = DirtyLog.attach(log_handle)
    try:
        placer = Placer([block], [log.log], lock=lock)
        pages = [_page(seed, p) for p in range(block.npages)]
        barrier.wait(WAIT_S)
        won = [p for p in range(block.npages) if placer.place(0, p, pages[p])]
        del placer
        conn.send(won)
    finally:
        log.close()
        block.close()
        conn.close()


def test_software_each_page_placed_exactly_once():
    # Both placers walk the same pages at the same time: without the lock
    # both would find many pages missing and both write them.
    npages = 2048
    lock, barrier = CTX.Lock(), CTX.Barrier(2)
    ours, theirs = CTX.Pipe()
    with RamBlock.create("pc.ram", npages * PS) as block, DirtyLog.create(npages) as log:
        proc = CTX.Process(target=_rival, args=(block.handle, log.handle, lock, barrier, 6,
                                                theirs), daemon=True)
        try:
            proc.start()
        finally:
            theirs.close()
        try:
            placer = Placer([block], [log.log], lock=lock)
            assert placer.mode == "software"
            pages = [_page(5, p) for p in range(npages)]
            barrier.wait(WAIT_S)
            mine = [p for p in range(npages) if placer.place(0, p, pages[p])]
            assert ours.poll(WAIT_S)
            rival = ours.recv()
        finally:
            ours.close()
            assert _join(proc) == 0
        assert sorted(mine + rival) == list(range(npages))     # once, and only once
        for p in mine:
            assert bytes(block.pages[p]) == pages[p]
        for p in rival:
            assert bytes(block.pages[p]) == _page(6, p)
        assert log.log.all()
        del placer


def _reader(handle, log_handle, npages, seed, conn) -> None:
    """A software-mode vCPU: wait for each received bit, then read the page."""
    block = RamBlock.attach(handle)
    log = DirtyLog.attach(log_handle)
    try:
        bits, pages = log.log, block.pages
        conn.send("ready")
        bad = []
        for p in range(npages):
            while not bits[p]:
                pass
            if pages[p].tobytes() != _page(seed, p):
                bad.append(p)
        conn.send(bad)
    finally:
        del bits, pages
        log.close()
        block.close()
        conn.close()


def test_software_bit_is_set_after_the_data(ram):
    blocks, logs = ram
    npages = blocks[0].npages
    ours, theirs = CTX.Pipe()
    proc = CTX.Process(target=_reader, args=(blocks[0].handle, logs[0].handle, npages, 7,
                                             theirs), daemon=True)
    proc.start()
    theirs.close()
    try:
        assert ours.poll(WAIT_S) and ours.recv() == "ready"
        placer = Placer(blocks, [log.log for log in logs], lock=CTX.Lock())
        for p in range(npages):
            assert placer.place(0, p, _page(7, p))
        assert ours.poll(WAIT_S)
        assert ours.recv() == []        # no page seen before its data
    finally:
        ours.close()
        assert _join(proc) == 0


def test_software_discard_and_zero(ram):
    blocks, logs = ram
    placer = Placer(blocks, [log.log for log in logs], lock=CTX.Lock())
    assert placer.place(1, 0, _page(8, 0))
    placer.discard(1, 0, PS)
    assert logs[1].log[0] == 0 and _allocated(blocks[1]) == 0
    assert placer.place_zero(1, 0) is True
    assert _allocated(blocks[1]) == 0 and logs[1].log[0] == 1
    assert placer.place(1, 0, _page(8, 0)) is False


# ---------------------------------------------------------------------------
# userfaultfd mode: pages go into a vCPU's registered mapping

def _vcpu(handles, sock) -> None:
    """Register every block with one uffd, hand it over, then read pages on
    request: ("read", block, page) -> (block, page, bytes)."""
    blocks = [RamBlock.attach(h) for h in handles]
    try:
        uffd = Userfaultfd.open()
        bases = tuple(buffer_address(b.pages) for b in blocks)
        for b, base in zip(blocks, bases):
            uffd.register(base, b.used_length)
        socket.send_fds(sock, [pickle.dumps(bases)], [uffd.fd])
        while True:
            msg = sock.recv(256)
            if not msg:
                break
            _, block, page = pickle.loads(msg)
            sock.send(pickle.dumps((block, page, blocks[block].pages[page].tobytes())))
        uffd.close()
    finally:
        for b in blocks:
            b.close()
        sock.close()


@contextlib.contextmanager
def vcpu(blocks):
    sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = CTX.Process(target=_vcpu, args=([b.handle for b in blocks], theirs), daemon=True)
    uffd = None
    try:
        try:
            proc.start()
        finally:
            theirs.close()
        sock.settimeout(WAIT_S)
        msg, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        assert msg and len(fds) == 1, "the vCPU did not register"
        uffd = Userfaultfd.from_fd(fds[0])
        yield sock, uffd, pickle.loads(msg), proc
        sock.shutdown(socket.SHUT_RDWR)     # the vCPU's cue to exit
        proc.join(WAIT_S)
        assert proc.exitcode == 0
    finally:
        if proc.pid is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(WAIT_S)
        proc.close()
        if uffd is not None:
            uffd.close()
        sock.close()


def _read(sock, block, page) -> bytes:
    sock.send(pickle.dumps(("read", block, page)))
    b, p, data = pickle.loads(sock.recv(2 * PS))
    assert (b, p) == (block, page)
    return data


def _fault(uffd):
    assert select.select([uffd.fd], [], [], WAIT_S)[0], "no fault arrived"
    events = uffd.read_events()
    assert len(events) == 1
    return events[0]


@needs_uffd
def test_uffd_place_before_and_after_a_fault(ram):
    blocks, logs = ram
    with vcpu(blocks) as (sock, uffd, bases, _):
        placer = Placer(blocks, [log.log for log in logs], uffd=uffd, bases=bases)
        assert placer.mode == "userfaultfd"
        # ahead of any access
        assert placer.place(1, 2, _page(9, 2)) is True
        assert logs[1].log[2] == 1
        assert _read(sock, 1, 2) == _page(9, 2)
        assert placer.place(1, 2, _page(10, 2)) is False
        # the vCPU blocks on a missing page until it is placed
        sock.send(pickle.dumps(("read", 0, 9)))
        ev = _fault(uffd)
        assert ev.address == bases[0] + 9 * PS
        assert logs[0].log[9] == 0
        assert placer.place(0, 9, _page(9, 9)) is True
        assert pickle.loads(sock.recv(2 * PS)) == (0, 9, _page(9, 9))
        assert logs[0].log[9] == 1
        assert bytes(blocks[0].pages[9]) == _page(9, 9)     # the shared file has it
        assert uffd.read_events() == []


@needs_uffd
def test_uffd_zero_and_existing_pages(ram):
    blocks, logs = ram
    with vcpu(blocks) as (sock, uffd, bases, _):
        placer = Placer(blocks, [log.log for log in logs], uffd=uffd, bases=bases)
        sock.send(pickle.dumps(("read", 0, 1)))
        _fault(uffd)
        assert placer.place_zero(0, 1) is True
        assert pickle.loads(sock.recv(2 * PS)) == (0, 1, bytes(PS))
        assert placer.place_zero(0, 1) is False and placer.place(0, 1, _page(11, 1)) is False
        # a page someone else installed (received not yet set): not overwritten
        blocks[0].pages[20] = 0x33
        assert placer.place(0, 20, _page(11, 20)) is False
        assert logs[0].log[20] == 1
        assert _read(sock, 0, 20) == b"\x33" * PS


@needs_uffd
def test_uffd_discard_makes_pages_fault_again(ram):
    blocks, logs = ram
    with vcpu(blocks) as (sock, uffd, bases, _):
        placer = Placer(blocks, [log.log for log in logs], uffd=uffd, bases=bases)
        for p in range(4):
            assert placer.place(0, p, _page(12, p))
        assert _read(sock, 0, 1) == _page(12, 1)
        placer.discard(0, PS, 2 * PS)
        assert list(logs[0].log[:4]) == [1, 0, 0, 1]
        assert _read(sock, 0, 0) == _page(12, 0)        # untouched by the discard
        sock.send(pickle.dumps(("read", 0, 2)))
        assert _fault(uffd).address == bases[0] + 2 * PS
        assert placer.place(0, 2, _page(13, 2)) is True
        assert pickle.loads(sock.recv(2 * PS)) == (0, 2, _page(13, 2))


@needs_uffd
def test_uffd_vcpu_gone_is_an_error(ram):
    blocks, logs = ram
    with vcpu(blocks) as (sock, uffd, bases, proc):
        placer = Placer(blocks, [log.log for log in logs], uffd=uffd, bases=bases)
        sock.shutdown(socket.SHUT_RDWR)
        proc.join(WAIT_S)
        assert proc.exitcode == 0
        with pytest.raises(PostcopyError, match="gone"):
            placer.place(0, 0, _page(14, 0))
        with pytest.raises(PostcopyError, match="gone"):
            placer.place_zero(0, 1)
        assert logs[0].log[0] == 0 and logs[0].log[1] == 0
