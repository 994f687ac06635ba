"""The postcopy fault handler with real processes, sockets, userfaultfd and shared memory.

The vCPUs here are small spawned processes that register with the handler
exactly as the guest's vCPUs do (userfaultfd: their own descriptor over
their own mapping; software: REGISTER, then FAULT and wait for WAKE), touch
pages on command and send back what they read.  The test plays the source
(a thread answering REQ_PAGES on the return path, on the preempt channel or
through its own placer as the coordinator would) and checks what went over
the wire.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import socket
import threading
import time

import numpy as np
import psutil
import pytest

from engine.errors import PostcopyError, RemoteProtocolError
from engine.ram import faultproto as fp
from engine import uffd as uffd_mod
from engine.postcopy.handler import FaultHandler
from engine.postcopy.placer import Placer
from engine.procs import child_setup, spawn
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog, DirtyLogHandle
from engine.stream.encoder import RamRecordEncoder, ram_block_list
from engine.stream.events import NEED_DATA
from engine.stream.returnpath import ReqPages, ReturnPathDecoder

PS = 4096
WAIT = 20.0          # seconds any single step may take before the test fails
BLOCKS = (("pc.ram", 32), ("vga.ram", 8))

HAVE_UFFD, UFFD_REASON = uffd_mod.probe()
MODES = [pytest.param("userfaultfd", marks=pytest.mark.skipif(
    not HAVE_UFFD, reason=f"userfaultfd: {UFFD_REASON}")), "software"]


# -- a vCPU, as section 3 of the postcopy contract describes it -------------------------


def _vcpu_main(vcpu: int, path: str, mode: str, handles, conn, parent_pid: int,
               base_shift: int = 0) -> None:
    """Register with the handler, then touch pages on command."""
    child_setup(parent_pid)
    blocks = [RamBlock.attach(h) for h in handles]
    bases = tuple(uffd_mod.buffer_address(b.buf) for b in blocks)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    uffd = None
    received = []
    if mode == "userfaultfd":
        uffd = uffd_mod.Userfaultfd.open()
        for b, base in zip(blocks, bases):
            uffd.register(base, b.used_length)
        reg = fp.Register(vcpu, os.getpid(), fp.MODE_USERFAULTFD,
                          tuple(b + base_shift for b in bases))
        socket.send_fds(sock, [fp.pack(reg)], [uffd.fd])
    else:
        sock.send(fp.pack(fp.Register(vcpu, os.getpid(), fp.MODE_SOFTWARE, bases)))
    reply = fp.unpack(sock.recv(fp.MAX_MESSAGE))
    assert isinstance(reply, fp.Registered), reply
    if mode == "software":
        received = [DirtyLog.attach(DirtyLogHandle(name, n)) for name, n in reply.received]
    conn.send(("ready",))
    while True:
        cmd = conn.recv()
        if cmd[0] == "exit":
            break
        pages = cmd[1]
        if mode == "software":
            _software_touch(sock, received, pages)
        conn.send(("read", [bytes(blocks[b].pages[p]) for b, p in pages]))
    if uffd is not None:
        for b, base in zip(blocks, bases):
            uffd.unregister(base, b.used_length)
        uffd.close()
    sock.close()
    for log in received:
        log.close()
    for b in blocks:
        b.close()


def _software_touch(sock, received, pages) -> None:
    """The software-fault hook: FAULT per contiguous missing run, wait for WAKE."""
    missing = sorted((b, p) for b, p in pages if not received[b].log[p])
    runs: list[list[int]] = []
    for b, p in missing:
        if runs and runs[-1][0] == b and runs[-1][1] + runs[-1][2] == p:
            runs[-1][2] += 1
        else:
            runs.append([b, p, 1])
    for b, p, n in runs:
        sock.send(fp.pack(fp.Fault(b, p, n)))
    sock.settimeout(0.01)
    while any(not received[b].log[p] for b, p in missing):
        try:
            msg = fp.unpack(sock.recv(fp.MAX_MESSAGE))
            assert isinstance(msg, fp.Wake), msg
        except TimeoutError:
            pass
    sock.settimeout(None)


class Vcpu:
    """The test's handle on one vCPU process."""

    def __init__(self, vcpu: int, handler: FaultHandler, blocks, base_shift: int = 0):
        self.conn, theirs = multiprocessing.get_context("spawn").Pipe()
        self.proc = spawn(_vcpu_main, (vcpu, handler.socket_path, handler.mode,
                                       tuple(b.handle for b in blocks), theirs,
                                       os.getpid(), base_shift), f"test-vcpu-{vcpu}")
        theirs.close()

    def expect(self, kind: str, timeout: float = WAIT):
        if not self.conn.poll(timeout):
            raise AssertionError(f"vCPU process: no {kind!r} within {timeout} s "
                                 f"(alive: {self.proc.is_alive()})")
        msg = self.conn.recv()
        assert msg[0] == kind, msg
        return msg[1:]

    def touch(self, pages) -> None:
        self.conn.send(("touch", list(pages)))

    def read(self, pages) -> list[bytes]:
        self.touch(pages)
        return self.expect("read")[0]

    def close(self) -> None:
        if self.proc.exitcode is None:
            with contextlib.suppress(OSError):
                self.conn.send(("exit",))
            self.proc.join(5)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
        self.conn.close()


# -- the source -----------------------------------------------------------------------


class Source(threading.Thread):
    """Reads page requests from the return path and answers them.

    With a preempt socket the pages go there as records; without, they are
    placed with ``placer`` and the handler is told, as the destination
    coordinator does for pages from the main channel.  ``hold`` keeps the
    answers back until :meth:`release`.
    """

    def __init__(self, rp: socket.socket, src_blocks, *, preempt=None, placer=None,
                 handler=None, hold=False):
        super().__init__(daemon=True)
        self.rp, self.src, self.preempt = rp, src_blocks, preempt
        self.placer, self.handler = placer, handler
        self.index = {b.idstr: i for i, b in enumerate(src_blocks)}
        self.encoder = RamRecordEncoder(PS)
        self.requests: list[ReqPages] = []      # as decoded, short form block None
        self.resolved: list[tuple[str, int]] = []
        self.error: BaseException | None = None
        self._release = threading.Event()
        if not hold:
            self._release.set()
        self._cv = threading.Condition()
        self._stopped = False

    def release(self) -> None:
        self._release.set()

    def wait_requests(self, n: int, timeout: float = WAIT) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: len(self.requests) >= n or self.error,
                                     timeout):
                raise AssertionError(f"{len(self.requests)} of {n} requests arrived: "
                                     f"{self.requests}")
        if self.error:
            raise self.error

    def stop(self) -> None:
        """End the thread; what is held back stays unanswered."""
        self._stopped = True
        with contextlib.suppress(OSError):
            self.rp.shutdown(socket.SHUT_RDWR)
        if self.is_alive():
            self.join(WAIT)

    def run(self) -> None:
        dec = ReturnPathDecoder()
        block = None
        backlog: list[tuple[str, int, int]] = []
        try:
            while not self._stopped:
                if backlog and self._release.is_set():
                    for req in backlog:
                        self.answer(*req)
                    backlog.clear()
                ready, _, _ = select.select([self.rp], [], [], 0.01)
                if not ready or self._stopped:
                    continue
                data = self.rp.recv(65536)
                if not data:
                    return
                dec.feed(data)
                while (ev := dec.next_event()) is not NEED_DATA:
                    assert isinstance(ev, ReqPages), ev
                    block = ev.block or block
                    backlog.append((block, ev.start, ev.length))
                    with self._cv:
                        self.requests.append(ev)
                        self.resolved.append((block, ev.start // PS))
                        self._cv.notify_all()
        except OSError:
            return
        except BaseException as exc:
            self.error = exc
            with self._cv:
                self._cv.notify_all()

    def answer(self, block: str, start: int, length: int) -> None:
        i = self.index[block]
        for page in range(start // PS, (start + length) // PS):
            data = self.src[i].pages[page]
            if self.preempt is not None:
                if data.any():
                    rec = self.encoder.page(block, page * PS, data)
                else:
                    rec = self.encoder.zero_page(block, page * PS)
                self.preempt.sendall(rec)
            else:
                self.placer.place(i, page, data)
                if self.handler.requested_logs[i].log[page]:
                    self.handler.placed(i, page)


# -- the whole rig --------------------------------------------------------------------


class Rig:
    """Source and destination blocks, a handler, vCPUs, channels, a source.

    Destination state as postcopy finds it: block 0 pages 0-7 arrived in
    precopy (written), page 8 arrived as a zero page (never written: a hole),
    everything else is missing (a hole).  Source page 8 and 9 are zero.
    """

    def __init__(self, stack: contextlib.ExitStack, mode: str, nvcpus: int, *,
                 preempt: bool = True, hold: bool = False, base_shift: int = 0,
                 start_source: bool = True):
        rng = np.random.default_rng(7)
        self.src = [stack.enter_context(RamBlock.create(n, pages * PS)) for n, pages in BLOCKS]
        self.dst = [stack.enter_context(RamBlock.create(n, pages * PS)) for n, pages in BLOCKS]
        for s in self.src:
            s.pages[:] = rng.integers(1, 256, size=s.pages.shape, dtype=np.uint8)
        self.src[0].pages[8:10] = 0
        for d in self.dst:
            # RamBlock.create reserves every page; postcopy's missing pages are holes.
            uffd_mod.punch_hole(d.fd, 0, d.used_length)
        self.dst[0].pages[0:8] = self.src[0].pages[0:8]
        self.handler = FaultHandler(self.dst, mode, page_size=PS, nvcpus=nvcpus)
        stack.callback(self.handler.close)
        self.handler.received_logs[0].log[0:9] = 1
        self.vcpus = []
        for i in range(nvcpus):
            v = Vcpu(i, self.handler, self.dst, base_shift)
            stack.callback(v.close)
            self.vcpus.append(v)
        for v in self.vcpus:
            v.expect("ready")
        self.uffd, self.bases = self.handler.wait_registered(WAIT)
        self.rp_dst, rp_src = socket.socketpair()
        stack.callback(self.rp_dst.close)
        stack.callback(rp_src.close)
        self.handler.set_return_path(self.rp_dst)
        received = [log.log for log in self.handler.received_logs]
        placer = None
        pre_src = None
        if preempt:
            pre_dst, pre_src = socket.socketpair()
            stack.callback(pre_src.close)
            with pre_dst:
                self.handler.set_preempt(pre_dst)
        elif self.uffd is not None:
            placer = Placer(self.dst, received, uffd=self.uffd, bases=self.bases)
        else:
            placer = Placer(self.dst, received, lock=self.handler.lock)
        self.preempt = pre_src
        self.source = Source(rp_src, self.src, preempt=pre_src, placer=placer,
                             handler=self.handler, hold=hold)
        if start_source:
            self.source.start()
        stack.callback(self.source.stop)

    def expected(self, pages) -> list[bytes]:
        return [self.src[b].pages[p].tobytes() for b, p in pages]

    def wait_stats(self, cond, timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.handler.stats()
            if cond(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"statistics never got there: {st}")
            time.sleep(0.005)


def _assert_forms(requests: list[ReqPages]) -> None:
    """The ID form exactly when the block differs from the previous request's."""
    last = None
    for i, r in enumerate(requests):
        if i == 0:
            assert r.block is not None, "the first request must name its block"
        if r.block is None:
            continue
        assert r.block != last, f"request {i} names the block of the previous one: {r}"
        last = r.block


# -- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("preempt", [True, False], ids=["preempt", "main-channel"])
@pytest.mark.parametrize("mode", MODES)
def test_missing_pages_are_requested_placed_and_read_right(mode, preempt):
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, mode, 2, preempt=preempt)
        v0, v1 = rig.vcpus
        # vCPU 0: a precopy page (no fault), missing pages of both blocks, and
        # a page that is zero on the source (it comes as a ZERO record).
        first = [(0, 1), (0, 9), (0, 10), (0, 11), (1, 2)]
        assert v0.read(first) == rig.expected(first)
        # vCPU 1: the page received as zero in precopy is served locally.
        second = [(0, 8), (0, 12), (1, 3)]
        assert v1.read(second) == rig.expected(second)
        # Pages either vCPU already faulted in read right from the other one.
        again = [(0, 10), (1, 2), (0, 12)]
        assert v1.read(again) == rig.expected(again)
        assert v0.read(again) == rig.expected(again)

        src = rig.source
        assert src.resolved == [("pc.ram", 9), ("pc.ram", 10), ("pc.ram", 11),
                                ("vga.ram", 2), ("pc.ram", 12), ("vga.ram", 3)]
        # The ID form names the block when it changes, REQ_PAGES continues it.
        assert [r.block for r in src.requests] == ["pc.ram", None, None, "vga.ram",
                                                   "pc.ram", "vga.ram"]
        assert all(r.length == PS for r in src.requests)
        st = rig.handler.stats()
        assert st["postcopy-requests"] == 6
        assert st["postcopy-faults"] == mode
        assert st["postcopy-latency"] > 0
        assert st["postcopy-latency-p99"] > 0
        assert len(st["postcopy-vcpu-blocktime"]) == 2
        assert all(t >= 0 for t in st["postcopy-vcpu-blocktime"])
        # userfaultfd: every first touch of a hole faults, the local zero page
        # too; software: the vCPU asks only for pages whose bit is clear.
        assert st["faults"] == (7 if mode == "userfaultfd" else 6)
        # Placed pages are received, and nothing stays requested.
        rec = rig.handler.received_logs
        for b, p in first + second:
            assert rec[b].log[p] == 1
        assert not any(log.log.any() for log in rig.handler.requested_logs)
        rig.handler.check()
        assert src.error is None


@pytest.mark.parametrize("mode", MODES)
def test_two_vcpus_on_one_page_make_one_request_and_both_count_as_blocked(mode):
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, mode, 2, hold=True)
        v0, v1 = rig.vcpus
        page = [(0, 20)]
        v0.touch(page)
        v1.touch(page)
        rig.source.wait_requests(1)
        rig.wait_stats(lambda st: st["faults"] >= 2)
        # Both are blocked now and stay so until the source answers.
        hold_s = 0.05
        time.sleep(hold_s)
        assert len(rig.source.requests) == 1
        rig.source.release()
        assert v0.expect("read")[0] == rig.expected(page)
        assert v1.expect("read")[0] == rig.expected(page)
        st = rig.handler.stats()
        assert st["postcopy-requests"] == 1
        hold_ms = int(hold_s * 1000)
        assert all(t >= hold_ms for t in st["postcopy-vcpu-blocktime"]), st
        assert st["postcopy-blocktime"] >= hold_ms, st
        assert st["postcopy-latency"] >= hold_s * 1e9, st
        assert len(rig.source.requests) == 1


@pytest.mark.parametrize("mode", MODES)
def test_received_zero_pages_are_served_without_a_request(mode):
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, mode, 1)
        (v,) = rig.vcpus
        pages = [(0, 8), (0, 3)]      # received as zero (a hole); precopy data
        assert v.read(pages) == [bytes(PS), rig.src[0].pages[3].tobytes()]
        st = rig.handler.stats()
        assert st["postcopy-requests"] == 0
        assert st["faults"] == (1 if mode == "userfaultfd" else 0)
        assert rig.source.requests == []


@pytest.mark.parametrize("mode", MODES)
def test_pause_then_resend_requests_names_the_block_again(mode):
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, mode, 2, hold=True)
        v0, v1 = rig.vcpus
        v0.touch([(0, 14)])
        rig.source.wait_requests(1)
        # The channels break: the source goes, the handler stops writing.
        rig.handler.pause()
        rig.source.stop()
        # A fault while paused is recorded and requested, not written anywhere.
        v1.touch([(0, 15)])
        rig.wait_stats(lambda st: st["faults"] >= 2 and st["postcopy-requests"] == 2)
        # Recovery: a new return path and preempt channel, then RESUME.
        rp_dst, rp_src = socket.socketpair()
        pre_dst, pre_src = socket.socketpair()
        for s in (rp_dst, rp_src, pre_src):
            stack.callback(s.close)
        rig.handler.set_return_path(rp_dst)
        with pre_dst:
            rig.handler.set_preempt(pre_dst)
        new = Source(rp_src, rig.src, preempt=pre_src, hold=True)
        new.start()
        stack.callback(new.stop)
        rig.handler.check()
        rig.handler.resend_requests()
        new.wait_requests(2)
        # Had anything gone out before RESUME, it would come first here.
        assert [(r.block, r.start) for r in new.requests] == [("pc.ram", 14 * PS),
                                                              (None, 15 * PS)]
        new.release()
        assert v0.expect("read")[0] == rig.expected([(0, 14)])
        assert v1.expect("read")[0] == rig.expected([(0, 15)])
        st = rig.handler.stats()
        assert st["postcopy-requests"] == 2     # a resend is not a new request
        assert len(new.requests) == 2
        _assert_forms(new.requests)


@pytest.mark.parametrize("mode", MODES)
def test_a_vcpu_that_dies_while_waiting_is_dropped_and_the_rest_go_on(mode):
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, mode, 2, hold=True)
        v0, v1 = rig.vcpus
        page = [(0, 25)]
        v0.touch(page)
        rig.source.wait_requests(1)
        v0.proc.kill()                  # it owned the handler's placer descriptor
        v0.proc.join(WAIT)
        v1.touch(page)
        rig.wait_stats(lambda st: st["faults"] >= 2)
        rig.source.release()
        assert v1.expect("read")[0] == rig.expected(page)
        assert len(rig.source.requests) == 1    # still pending: not asked twice
        rig.handler.check()


def test_coordinator_gets_a_working_userfaultfd_and_placed_wakes_other_vcpus():
    if not HAVE_UFFD:
        pytest.skip(f"userfaultfd: {UFFD_REASON}")
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, "userfaultfd", 2, preempt=False)
        assert rig.uffd is not None and len(rig.bases) == len(BLOCKS)
        # The coordinator's placer goes through one vCPU's descriptor; the
        # other vCPU must be woken by the handler (placed()).
        pages = [(1, 5), (1, 6)]
        assert rig.vcpus[1].read(pages) == rig.expected(pages)
        assert rig.vcpus[0].read(pages) == rig.expected(pages)
        assert rig.handler.stats()["postcopy-requests"] == 2


def test_no_vcpus_means_no_registration_and_preempt_pages_still_land():
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, "software", 0, start_source=False)
        assert (rig.uffd, rig.bases) == (None, None)
        enc = RamRecordEncoder(PS)
        rig.preempt.sendall(enc.page("vga.ram", 4 * PS, rig.src[1].pages[4]))
        rig.preempt.sendall(enc.zero_page("vga.ram", 5 * PS))
        deadline = time.monotonic() + WAIT
        while not (rig.handler.received_logs[1].log[4] and rig.handler.received_logs[1].log[5]):
            assert time.monotonic() < deadline, "preempt pages never placed"
            rig.handler.check()
            time.sleep(0.005)
        assert rig.dst[1].pages[4].tobytes() == rig.src[1].pages[4].tobytes()
        assert not rig.dst[1].pages[5].any()
        st = rig.handler.stats()
        assert st["postcopy-vcpu-blocktime"] == [] and st["postcopy-requests"] == 0


def _wait_failure(handler: FaultHandler, exc_type, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        try:
            handler.check()
        except exc_type as exc:
            return exc
        assert time.monotonic() < deadline, "the handler never reported the failure"
        time.sleep(0.01)


def test_malformed_preempt_channel_is_a_protocol_error_naming_the_channel():
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, "software", 0, start_source=False)
        enc = RamRecordEncoder(PS)
        rig.preempt.sendall(enc.page("vga.ram", 0, rig.src[1].pages[0])
                            + enc.page("nosuch.ram", 0, rig.src[1].pages[0]))
        exc = _wait_failure(rig.handler, RemoteProtocolError)
        assert type(exc) is RemoteProtocolError     # itself, not rebuilt from a kind
        assert exc.channel == "postcopy preempt"
        assert "unknown RAM block 'nosuch.ram'" in str(exc)
        # where the second record's block name starts
        assert exc.offset == (8 + 1 + len("vga.ram") + PS) + 8
        # The error sticks, and every later call says so.
        with pytest.raises(RemoteProtocolError):
            rig.handler.check()
        with pytest.raises(RemoteProtocolError):
            rig.handler.placed(0, 0)


def test_an_error_in_the_process_arrives_as_itself_with_channel_and_offset():
    """The loop refuses a PLACED outside the guest (its control channel's
    remote data); the coordinator raises that very error: same class,
    channel and offset, with a note naming the process."""
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, "software", 0, start_source=False)
        pid = rig.handler._proc.pid
        rig.handler.placed(5, 0)                # the guest has blocks 0 and 1
        exc = _wait_failure(rig.handler, RemoteProtocolError)
        assert type(exc) is RemoteProtocolError
        assert exc.channel == "fault handler control" and exc.offset == 0
        assert "PLACED for page 0 of block 5" in exc.message
        assert any("postcopy fault handler" in note for note in exc.__notes__)
        deadline = time.monotonic() + WAIT
        while psutil.pid_exists(pid) and rig.handler._proc.exitcode is None:
            assert time.monotonic() < deadline, "the process outlived its error"
            time.sleep(0.01)
        with pytest.raises(RemoteProtocolError) as again:
            rig.handler.stats()
        assert again.value is exc


def test_a_postcopy_error_in_the_process_arrives_as_a_postcopy_error():
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, "software", 0, start_source=False)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(rig.handler.socket_path)
            s.send(fp.pack(fp.Register(0, 42, fp.MODE_USERFAULTFD, (0, 0))))
            exc = _wait_failure(rig.handler, PostcopyError)
        assert type(exc) is PostcopyError
        assert str(exc).startswith("vCPU 0 (pid 42) registered for userfaultfd faults")


def test_a_block_list_on_the_preempt_channel_is_refused():
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, "software", 0, start_source=False)
        rig.preempt.sendall(ram_block_list([("pc.ram", 32 * PS)]))
        exc = _wait_failure(rig.handler, RemoteProtocolError)
        assert exc.channel == "postcopy preempt" and "RamBlockList" in str(exc)


def test_software_fault_outside_the_block_is_reported():
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, "software", 0, start_source=False)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(rig.handler.socket_path)
            s.send(fp.pack(fp.Register(3, os.getpid(), fp.MODE_SOFTWARE, (0, 0))))
            assert isinstance(fp.unpack(s.recv(fp.MAX_MESSAGE)), fp.Registered)
            s.send(fp.pack(fp.Fault(1, 7, 2)))      # vga.ram has 8 pages
            exc = _wait_failure(rig.handler, RemoteProtocolError)
        assert exc.channel == "fault socket of vCPU 3"
        assert "pages 7..8 of block 1 'vga.ram' (8 pages)" in str(exc)


def test_registering_in_the_wrong_mode_is_reported():
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, "software", 0, start_source=False)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(rig.handler.socket_path)
            s.send(fp.pack(fp.Register(0, 42, fp.MODE_USERFAULTFD, (0, 0))))
            exc = _wait_failure(rig.handler, PostcopyError)
        assert "vCPU 0 (pid 42) registered for userfaultfd faults" in str(exc)


def test_userfault_outside_every_block_is_reported():
    if not HAVE_UFFD:
        pytest.skip(f"userfaultfd: {UFFD_REASON}")
    with contextlib.ExitStack() as stack:
        # The vCPU lies about where its blocks are: its real faults fall outside.
        rig = Rig(stack, "userfaultfd", 1, base_shift=1 << 40)
        rig.vcpus[0].touch([(0, 20)])
        exc = _wait_failure(rig.handler, PostcopyError)
        assert "vCPU 0" in str(exc) and "outside every RAM block" in str(exc)
        rig.vcpus[0].proc.kill()        # blocked on its own descriptor for good


def test_handler_crash_is_raised_by_check_and_close_cleans_up():
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, "software", 1, start_source=False)
        handler = rig.handler
        pid = handler._proc.pid
        os.kill(pid, signal.SIGKILL)
        exc = _wait_failure(handler, PostcopyError)
        assert "killed by signal 9" in str(exc)
        with pytest.raises(PostcopyError, match="killed by signal 9"):
            handler.stats()
        _assert_closes_cleanly(handler)


def _assert_closes_cleanly(handler: FaultHandler) -> None:
    names = [log.handle.shm_name for log in handler.received_logs + handler.requested_logs]
    directory = os.path.dirname(handler.socket_path)
    pid = handler._proc.pid
    handler.close()
    handler.close()                             # idempotent
    assert not psutil.pid_exists(pid)           # reaped, not a zombie
    assert not os.path.exists(directory)
    for name in names:
        assert not os.path.exists(f"/dev/shm/{name}")
    handler.check()                             # closed: nothing more to say


@pytest.mark.parametrize("mode", MODES)
def test_close_stops_everything_and_keeps_the_last_figures(mode):
    with contextlib.ExitStack() as stack:
        rig = Rig(stack, mode, 1)
        pages = [(0, 30), (0, 31)]
        assert rig.vcpus[0].read(pages) == rig.expected(pages)
        rig.vcpus[0].close()                    # detaches: the handler carries on
        rig.handler.check()
        _assert_closes_cleanly(rig.handler)
        st = rig.handler.stats()
        assert st["postcopy-requests"] == 2 and st["postcopy-faults"] == mode
        with pytest.raises(PostcopyError, match="closed"):
            rig.handler.placed(0, 0)
