"""The postcopy fault handler process: its poll loop (QEMU's postcopy_ram_fault_thread).

The process waits, in one ``poll``, on the vCPUs' registration socket,
each registered vCPU's userfaultfd (or its socket, in software mode), the
control socket from the coordinator (:mod:`~engine.postcopy.control`) and
the preempt channel (:mod:`~engine.postcopy.preempt`).  A fault on a page
not received yet becomes one request on the return path (REQ_PAGES_ID / REQ_PAGES, written under the
shared lock); a fault on a page that was received as ZERO in precopy (still
a hole) is served with a zero page.  When a page arrives, whoever placed it,
every waiter is woken: ``UFFDIO_COPY`` wakes only waiters in the address
space of the descriptor it went through, and only when it installed the
page, so the other vCPUs' descriptors (and that one, when the page was there
already) get ``UFFDIO_WAKE``, software vCPUs a WAKE message.  The preempt
channel's pages land through a :class:`~engine.ram.loader.RamLoader` of the
handler's own, the same loader the destination's main channel uses, so both
channels place, count and refuse pages alike.  Every ~10 ms with waiters
the loop also sweeps them against the received bitmaps, so a missed
notification costs latency, never a hang.

The loop's failure ends the process after an ERROR on the control socket
that carries the exception itself (:mod:`engine.ctlerrors`).  Statistics
are kept by :class:`~engine.postcopy.blocktime.Blocktime`.
"""
from __future__ import annotations

import array
import os
import select
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from engine.errors import PostcopyError, RemoteProtocolError
from engine.postcopy import control as ctl
from engine.postcopy.blocktime import Blocktime
from engine.postcopy.placer import Placer
from engine.postcopy.preempt import PreemptReader
from engine.procs import child_setup
from engine.ram import faultproto as fp
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog
from engine.ram.loader import RamLoader, received_maps
from engine.stream.events import RamBlockInfo, RamPage, RamZero
from engine.stream.returnpath import rp_req_pages, rp_req_pages_id
from engine.trace import trace
from engine.uffd import Userfaultfd

__all__ = ["LoopConfig", "fault_main", "recv_with_fds"]

#: while vCPUs wait, the handler looks at the received bitmaps this often (ns)
SWEEP_NS = 10_000_000
#: poll timeout with nobody waiting (ms): nothing to sweep, the control
#: socket's end wakes us anyway
IDLE_POLL_MS = 500
#: a return path that takes no bytes for this long counts as broken (s)
RP_STALL_SECONDS = 30.0
#: at most this many reads of the preempt channel before a statistics reply
#: (bounded: a source that keeps sending must not hold the reply up)
PREEMPT_DRAIN_READS = 64
#: largest control packet from the coordinator
_CTL_IN_MAX = 4096
#: after REGISTER a vCPU sends only FAULT packets (17 bytes); a longer one
#: arrives truncated and is refused as malformed
_VCPU_PACKET_MAX = 256


_FD_SPACE = socket.CMSG_SPACE(2 * array.array("i").itemsize)


def recv_with_fds(sock: socket.socket, bufsize: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """One packet and up to two descriptors that came with it.

    (``socket.recv_fds`` of Python 3.11 drops its *flags*, so MSG_DONTWAIT
    would be lost.)
    """
    data, ancdata, _msg_flags, _addr = sock.recvmsg(bufsize, _FD_SPACE, flags)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


@dataclass(frozen=True)
class LoopConfig:
    """What the process needs (picklable)."""

    blocks: tuple           # RamBlockHandle per block
    received: tuple         # DirtyLogHandle per block
    requested: tuple        # DirtyLogHandle per block
    mode: str
    page_size: int
    nvcpus: int
    parent_pid: int


def fault_main(cfg: LoopConfig, listener: socket.socket, sock: socket.socket, lock) -> None:
    """Body of the fault handler process."""
    child_setup(cfg.parent_pid)
    trace("postcopy_ram_fault_thread_entry", mode=cfg.mode, nvcpus=cfg.nvcpus)
    loop = None
    try:
        loop = _FaultLoop(cfg, listener, sock, lock)
        loop.send_ctl(ctl.Ready())
        loop.run()
    except Exception as exc:
        _report(sock, exc)
        sys.exit(1)
    finally:
        if loop is not None:
            loop.close()
        trace("postcopy_ram_fault_thread_exit")


def _report(sock: socket.socket, exc: Exception) -> None:
    """Send the loop's failure to the coordinator, as itself (best effort: a
    coordinator that is gone needs no report)."""
    trace("postcopy_ram_fault_thread_error", error=type(exc).__name__, text=repr(str(exc)))
    try:
        sock.send(ctl.pack(ctl.Error(exc)))
    except OSError:
        pass


class _Vcpu:
    """A registered vCPU and what it waits for."""

    __slots__ = ("index", "pid", "mode", "sock", "uffd", "bases", "channel", "waiting")

    def __init__(self, index, pid, mode, sock, uffd, bases):
        self.index, self.pid, self.mode = index, pid, mode
        self.sock: socket.socket = sock
        self.uffd: Userfaultfd | None = uffd
        self.bases: tuple[int, ...] = bases
        self.channel = f"fault socket of vCPU {index}"
        #: (block, page) -> monotonic ns of the fault
        self.waiting: dict[tuple[int, int], int] = {}

    def __repr__(self) -> str:
        return f"vCPU {self.index} (pid {self.pid})"


class _FaultLoop:
    """The process's state and its poll loop."""

    def __init__(self, cfg: LoopConfig, listener: socket.socket, sock: socket.socket, lock):
        self.cfg = cfg
        self.ps = cfg.page_size
        self.mode = cfg.mode
        self.lock = lock
        self.blocks: list[RamBlock] = [RamBlock.attach(h) for h in cfg.blocks]
        received_logs = [DirtyLog.attach(h) for h in cfg.received]
        requested_logs = [DirtyLog.attach(h) for h in cfg.requested]
        self.logs = received_logs + requested_logs
        self.received = [log.log for log in received_logs]
        self.requested = [log.log for log in requested_logs]
        self.idstrs = [b.idstr for b in self.blocks]
        self.index = {b.idstr: i for i, b in enumerate(self.blocks)}
        self.sizes = [b.used_length for b in self.blocks]
        self.npages = [b.npages for b in self.blocks]
        self.block_infos = [RamBlockInfo(b.idstr, b.used_length) for b in self.blocks]
        self.registered_reply = fp.pack(fp.Registered(
            tuple((h.shm_name, h.npages) for h in cfg.received)))
        self.wake_msg = fp.pack(fp.Wake())

        self.listener = listener
        listener.setblocking(False)
        self.ctl = sock
        self.poller = select.poll()
        self.dispatch: dict[int, Callable[[int], None]] = {}
        self._watch(listener.fileno(), self._on_listen)
        self._watch(sock.fileno(), self._on_ctl)
        self.conns: dict[int, socket.socket] = {}       # accepted, not registered yet
        self.vcpus: dict[int, _Vcpu] = {}               # by vCPU index
        self.running = True

        # requests: (block, page) -> None, in request order
        self.pending: dict[tuple[int, int], None] = {}
        self.unsent: list[tuple[int, int]] = []
        self.waiters: dict[tuple[int, int], list[_Vcpu]] = {}
        self.rp: socket.socket | None = None
        self.paused = False
        self.last_block: int | None = None
        self.preempt: PreemptReader | None = None
        # The preempt channel's pages; its counts are the channel's figures.
        self.loader = RamLoader(self.blocks, received_maps(self.blocks, self.received),
                                self.ps)
        self.placer: Placer | None = None
        self.placer_vcpu: _Vcpu | None = None
        self._new_placer()

        self.stats = Blocktime(cfg.nvcpus, cfg.mode)
        self.last_sweep = time.monotonic_ns()
        self._ctl_handlers: dict[type, Callable[[Any, list[int]], None]] = {
            ctl.Placed: self._ctl_placed, ctl.ReturnPath: self._ctl_return_path,
            ctl.Preempt: self._ctl_preempt, ctl.Pause: self._ctl_pause,
            ctl.Resend: self._ctl_resend, ctl.QueryStats: self._ctl_query_stats,
            ctl.Stop: self._ctl_stop,
        }

    # -- plumbing -------------------------------------------------------------------

    def _watch(self, fd: int, fn, events: int = select.POLLIN) -> None:
        self.poller.register(fd, events)
        self.dispatch[fd] = fn

    def _unwatch(self, fd: int) -> None:
        if self.dispatch.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def run(self) -> None:
        poll, dispatch = self.poller.poll, self.dispatch
        while self.running:
            timeout = SWEEP_NS // 1_000_000 if self.waiters else IDLE_POLL_MS
            for fd, revents in poll(timeout):
                fn = dispatch.get(fd)
                if fn is not None:
                    fn(revents)
                if not self.running:
                    return
            if self.unsent:
                self._flush()
            if self.waiters or self.pending:
                now = time.monotonic_ns()
                if now - self.last_sweep >= SWEEP_NS:
                    self._sweep(now)

    def close(self) -> None:
        for v in list(self.vcpus.values()):
            v.sock.close()
            if v.uffd is not None:
                v.uffd.close()
        self.vcpus.clear()
        for c in self.conns.values():
            c.close()
        for s in (self.rp, self.preempt, self.listener, self.ctl):
            if s is not None:
                s.close()
        self.placer = None
        for log in self.logs:
            log.close()
        for b in self.blocks:
            b.close()

    def send_ctl(self, msg: ctl.Message, fds: tuple[int, ...] = ()) -> None:
        trace("postcopy_fault_ctl_send", msg=type(msg).__name__)
        data = ctl.pack(msg)
        if fds:
            socket.send_fds(self.ctl, [data], list(fds))
        else:
            self.ctl.send(data)

    # -- the control socket ------------------------------------------------------------

    def _on_ctl(self, revents: int) -> None:
        while self.running:
            try:
                data, fds = recv_with_fds(self.ctl, _CTL_IN_MAX, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:            # the coordinator is gone
                trace("postcopy_ram_fault_thread_quit", why="control socket closed")
                self.running = False
                return
            try:
                msg = ctl.unpack(data, len(fds))
                handler = self._ctl_handlers.get(type(msg))
                if handler is None:
                    raise RemoteProtocolError(f"{type(msg).__name__} sent to the fault "
                                              f"handler", 0, ctl.CHANNEL)
                trace("postcopy_fault_ctl_recv", msg=type(msg).__name__)
                handler(msg, fds)
            finally:
                for fd in fds:
                    os.close(fd)

    # Each handler takes the message and its descriptors; one it keeps, it
    # pops from the list (the rest are closed after it).

    def _ctl_placed(self, msg: ctl.Placed, fds: list[int]) -> None:
        block, page = msg.block, msg.page
        if block >= len(self.received) or page >= self.npages[block]:
            raise RemoteProtocolError(f"PLACED for page {page} of block {block}, outside "
                                      f"the guest", 0, ctl.CHANNEL)
        if self.received[block][page]:
            self._page_arrived((block, page), time.monotonic_ns())

    def _ctl_return_path(self, msg: ctl.ReturnPath, fds: list[int]) -> None:
        if self.rp is not None:
            self.rp.close()
        self.rp = socket.socket(fileno=fds.pop())
        self.last_block = None      # a new channel: name the block first

    def _ctl_preempt(self, msg: ctl.Preempt, fds: list[int]) -> None:
        self._drop_preempt()
        self.preempt = PreemptReader(socket.socket(fileno=fds.pop()), self.ps,
                                     self.block_infos, self._place)
        self._watch(self.preempt.fileno(), self._on_preempt)

    def _ctl_pause(self, msg: ctl.Pause, fds: list[int]) -> None:
        trace("postcopy_pause_fault_thread", pending=len(self.pending))
        self.paused = True
        if self.rp is not None:
            self.rp.close()
            self.rp = None
        self._drop_preempt()

    def _ctl_resend(self, msg: ctl.Resend, fds: list[int]) -> None:
        trace("postcopy_pause_fault_thread_continued", pending=len(self.pending))
        self.paused = False
        self.last_block = None
        now = time.monotonic_ns()
        for key in [k for k in self.pending if self.received[k[0]][k[1]]]:
            self._page_arrived(key, now, zero_first=True)
        self.unsent = list(self.pending)

    def _ctl_query_stats(self, msg: ctl.QueryStats, fds: list[int]) -> None:
        # Pages already in the preempt socket count: at the end of postcopy
        # the source wrote its last urgent pages and the channel's EOS before
        # the main channel's end, after which the destination asks.
        for _ in range(PREEMPT_DRAIN_READS):
            if self.preempt is None or not self._on_preempt(select.POLLIN):
                break
        figures = self.stats.figures(time.monotonic_ns(),
                                     preempt=(self.loader.pages, self.loader.zero_pages))
        self.send_ctl(ctl.Stats(figures))

    def _ctl_stop(self, msg: ctl.Stop, fds: list[int]) -> None:
        trace("postcopy_ram_fault_thread_quit", why="stop")
        self.running = False

    # -- registration ------------------------------------------------------------------

    def _on_listen(self, revents: int) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.conns[conn.fileno()] = conn
            self._watch(conn.fileno(), lambda ev, c=conn: self._on_conn(c))

    def _on_conn(self, conn: socket.socket) -> None:
        """The first packet of a connection: REGISTER."""
        try:
            data, fds = recv_with_fds(conn, fp.MAX_MESSAGE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        fd = conn.fileno()
        if not data:
            self._unwatch(fd)
            del self.conns[fd]
            conn.close()
            return
        try:
            msg = fp.unpack(data, "fault socket (registration)")
            if not isinstance(msg, fp.Register):
                raise RemoteProtocolError(f"{type(msg).__name__.upper()} before REGISTER",
                                          0, "fault socket (registration)")
            channel = f"fault socket of vCPU {msg.vcpu}"
            mode = fp.MODE_NAMES[msg.mode]
            if mode != self.mode:
                raise PostcopyError(f"vCPU {msg.vcpu} (pid {msg.pid}) registered for "
                                    f"{mode} faults, the handler runs in {self.mode} mode")
            if len(msg.bases) != len(self.blocks):
                raise RemoteProtocolError(f"REGISTER names {len(msg.bases)} block bases, "
                                          f"the guest has {len(self.blocks)} blocks",
                                          0, channel)
            uffd = None
            if mode == "userfaultfd":
                if len(fds) != 1:
                    raise PostcopyError(f"vCPU {msg.vcpu} (pid {msg.pid}) registered for "
                                        f"userfaultfd faults with {len(fds)} descriptors, "
                                        f"not one")
                uffd = Userfaultfd.from_fd(fds.pop())
            elif fds:
                raise PostcopyError(f"vCPU {msg.vcpu} (pid {msg.pid}): software-mode "
                                    f"REGISTER carried {len(fds)} descriptors")
        finally:
            for extra in fds:
                os.close(extra)
        self._unwatch(fd)
        del self.conns[fd]
        old = self.vcpus.get(msg.vcpu)
        if old is not None:         # a stale registration of the same vCPU
            self._drop(old)
        v = _Vcpu(msg.vcpu, msg.pid, mode, conn, uffd, tuple(msg.bases))
        self.vcpus[v.index] = v
        self._watch(fd, lambda ev, v=v: self._on_vcpu(v))
        if uffd is not None:
            self._watch(uffd.fileno(), lambda ev, v=v: self._on_uffd(v, ev))
        try:
            conn.send(self.registered_reply)
        except OSError:
            self._drop(v)           # gone again before the answer
            return
        if uffd is not None and self.placer_vcpu is None:
            self._new_placer()
        self.stats.set_online(len(self.vcpus), time.monotonic_ns())
        trace("postcopy_ram_fault_thread_fds_core", vcpu=v.index, pid=v.pid, mode=mode)
        self._announce()

    def _announce(self) -> None:
        """Tell the coordinator how many vCPUs are in (with a userfaultfd for
        its placer once all of them are)."""
        count = len(self.vcpus)
        v = self.placer_vcpu
        if count == self.cfg.nvcpus and v is not None:
            assert v.uffd is not None   # the placer's vCPU is a userfaultfd one
            self.send_ctl(ctl.Vcpus(count, v.bases), fds=(v.uffd.fileno(),))
        else:
            self.send_ctl(ctl.Vcpus(count))

    def _new_placer(self) -> None:
        """A placer through the lowest-numbered userfaultfd vCPU (UFFDIO_COPY
        needs a registered mapping), the shared lock in software mode, or
        plain writes when no vCPU can fault."""
        candidates = [v for v in self.vcpus.values() if v.uffd is not None]
        if self.mode == "software":
            self.placer_vcpu = None
            self.placer = Placer(self.blocks, self.received, lock=self.lock)
        elif candidates:
            v = min(candidates, key=lambda c: c.index)
            self.placer_vcpu = v
            self.placer = Placer(self.blocks, self.received, uffd=v.uffd, bases=v.bases)
        else:
            self.placer_vcpu = None
            self.placer = Placer(self.blocks, self.received)
        # The loop wakes its own waiters (_page_arrived): no requested/on_placed.
        self.loader.place_through(self.placer)

    def _drop(self, v: _Vcpu) -> None:
        """A vCPU went away (detached, died or registered again)."""
        now = time.monotonic_ns()
        if self.vcpus.get(v.index) is v:
            del self.vcpus[v.index]
        self._unwatch(v.sock.fileno())
        if v.uffd is not None:
            self._unwatch(v.uffd.fileno())
        for key in v.waiting:
            lst = self.waiters.get(key)
            if lst is not None and v in lst:
                lst.remove(v)
                if not lst:
                    del self.waiters[key]
        v.waiting.clear()
        self.stats.unblock(v.index, now)
        v.sock.close()
        if v.uffd is not None:
            v.uffd.close()
        if v is self.placer_vcpu:
            self._new_placer()
        self.stats.set_online(len(self.vcpus), now)
        self._announce()

    @staticmethod
    def _gone(v: _Vcpu) -> bool:
        """Whether *v*'s end of the socket is closed (it exited or detached)."""
        p = select.poll()
        p.register(v.sock.fileno(), select.POLLIN)
        return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))

    # -- faults ------------------------------------------------------------------------

    def _on_vcpu(self, v: _Vcpu) -> None:
        """Software faults (or the end of the vCPU's connection)."""
        now = None
        while True:
            try:
                data = v.sock.recv(_VCPU_PACKET_MAX)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self._drop(v)
                return
            msg = fp.unpack(data, v.channel)
            if not isinstance(msg, fp.Fault) or v.uffd is not None:
                raise RemoteProtocolError(f"unexpected {type(msg).__name__.upper()} from "
                                          f"{v} in {v.mode} mode", 0, v.channel)
            if now is None:
                now = time.monotonic_ns()
            self._soft_fault(v, msg, now)
        if now is not None and not v.waiting:
            self._send_wake(v)      # everything it asked for is there already

    def _soft_fault(self, v: _Vcpu, msg: fp.Fault, now: int) -> None:
        b, lo, count = msg.block, msg.page, msg.count
        if b >= len(self.blocks) or lo + count > self.npages[b]:
            raise RemoteProtocolError(
                f"FAULT for pages {lo}..{lo + count - 1} of block {b}, outside the guest "
                f"({len(self.blocks)} blocks)" if b >= len(self.blocks) else
                f"FAULT for pages {lo}..{lo + count - 1} of block {b} "
                f"'{self.idstrs[b]}' ({self.npages[b]} pages)", 0, v.channel)
        self.stats.faults += count
        rec = self.received[b]
        if count == 1:
            if not rec[lo]:
                self._wait(v, b, lo, now)
            return
        for p in (np.flatnonzero(rec[lo:lo + count] == 0) + lo).tolist():
            self._wait(v, b, p, now)

    def _on_uffd(self, v: _Vcpu, revents: int) -> None:
        assert v.uffd is not None   # watched for userfaultfd vCPUs only
        if revents & (select.POLLERR | select.POLLNVAL):
            # A descriptor the kernel gave up on; the vCPU's socket tells the rest.
            self._unwatch(v.uffd.fileno())
            return
        try:
            events = v.uffd.read_events()
        except PostcopyError as exc:
            raise PostcopyError(f"{v}: {exc}") from None
        if not events:
            return
        now = time.monotonic_ns()
        ps, received = self.ps, self.received
        self.stats.faults += len(events)
        for ev in events:
            addr = ev.address
            for b, base in enumerate(v.bases):
                off = addr - base
                if 0 <= off < self.sizes[b]:
                    break
            else:
                raise PostcopyError(
                    f"{v}: fault at {addr:#x} is outside every RAM block (its blocks: "
                    + ", ".join(f"'{i}' at {base:#x}+{size:#x}" for i, base, size
                                in zip(self.idstrs, v.bases, self.sizes)) + ")")
            page = off // ps
            if received[b][page]:
                # Received as ZERO in precopy and never written: still a hole.
                self._uffd_fill_zero(v, b, page)
            else:
                self._wait(v, b, page, now)

    def _uffd_fill_zero(self, v: _Vcpu, b: int, page: int) -> None:
        """Install a zero page through *v*'s descriptor (EEXIST: it is there;
        either way *v*'s waiters wake)."""
        assert v.uffd is not None   # a fault read from its userfaultfd
        try:
            v.uffd.zeropage(v.bases[b] + page * self.ps, self.ps)
        except PostcopyError as exc:
            if not self._gone(v):
                raise PostcopyError(f"{v}: serving page {page} of block "
                                    f"'{self.idstrs[b]}' locally: {exc}") from None

    def _wait(self, v: _Vcpu, b: int, page: int, now: int) -> None:
        """*v* waits for a missing page: request it unless already requested."""
        key = (b, page)
        if key in v.waiting:
            return                  # faulted again after a spurious wake
        if not v.waiting:
            self.stats.block(v.index, now)
        v.waiting[key] = now
        lst = self.waiters.get(key)
        if lst is None:
            self.waiters[key] = [v]
        else:
            lst.append(v)
        if key not in self.pending:
            self.pending[key] = None
            self.requested[b][page] = 1
            self.unsent.append(key)
            self.stats.requests += 1
            trace("postcopy_ram_fault_thread_request", block=self.idstrs[b],
                  offset=page * self.ps, vcpu=v.index)

    def _page_arrived(self, key: tuple[int, int], now: int, *, skip: _Vcpu | None = None,
                      zero_first: bool = False) -> None:
        """*key* is in place (received bit set): wake whoever waits for it.

        *skip* was woken by the placement itself; *zero_first* (a page found
        received by a look at the bitmap, not a placement we know of) installs
        a zero page where it may still be a hole.
        """
        if key in self.pending:
            del self.pending[key]
            self.requested[key[0]][key[1]] = 0
        waiters = self.waiters.pop(key, None)
        if not waiters:
            return
        b, page = key
        stats = self.stats
        for v in waiters:
            t0 = v.waiting.pop(key, None)
            if t0 is None:
                continue
            stats.latency(v.index, now - t0)
            if v.uffd is not None:
                if zero_first:
                    self._uffd_fill_zero(v, b, page)
                elif v is not skip:
                    v.uffd.wake(v.bases[b] + page * self.ps, self.ps)
            if not v.waiting:
                stats.unblock(v.index, now)
                if v.uffd is None:
                    self._send_wake(v)

    def _send_wake(self, v: _Vcpu) -> None:
        try:
            v.sock.send(self.wake_msg)
        except OSError:
            pass    # full (it re-checks on its own timeout) or gone (EOF comes next)

    def _sweep(self, now: int) -> None:
        """The safety net: wake waiters whose page is there by now."""
        self.last_sweep = now
        for key in [k for k in self.waiters if self.received[k[0]][k[1]]]:
            self._page_arrived(key, now, zero_first=True)
        for key in [k for k in self.pending if self.received[k[0]][k[1]]]:
            self._page_arrived(key, now)

    # -- the return path ------------------------------------------------------------------

    def _flush(self) -> None:
        """Write the requests not sent yet, in one go under the lock."""
        if self.rp is None or self.paused:
            return
        ps, idstrs, pending = self.ps, self.idstrs, self.pending
        out = bytearray()
        sent = []
        for key in self.unsent:
            if key not in pending:
                continue
            b, page = key
            if b != self.last_block:
                out += rp_req_pages_id(page * ps, ps, idstrs[b])
                self.last_block = b
            else:
                out += rp_req_pages(page * ps, ps)
            sent.append(key)
        self.unsent.clear()
        if not out:
            return
        with self.lock:
            self._write_rp(out)
        # The lock was a full barrier after the requested bits were set: a
        # page placed meanwhile either shows its received bit here, or its
        # placer saw the requested bit and tells us (placed()).
        now = time.monotonic_ns()
        for key in sent:
            if self.received[key[0]][key[1]]:
                self._page_arrived(key, now, zero_first=True)

    def _write_rp(self, data) -> None:
        assert self.rp is not None  # the caller checked it
        view = memoryview(data)
        stalled_since = None
        flags = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT
        while view:
            try:
                n = self.rp.send(view, flags)
            except BlockingIOError:
                now = time.monotonic()
                if stalled_since is None:
                    stalled_since = now
                elif now - stalled_since > RP_STALL_SECONDS:
                    self._rp_broken()
                    return
                p = select.poll()
                p.register(self.rp.fileno(), select.POLLOUT)
                p.poll(100)
                continue
            except OSError:
                self._rp_broken()
                return
            view = view[n:]
            stalled_since = None

    def _rp_broken(self) -> None:
        """The return path failed under us: the coordinator sees the same and
        pauses; requests stay pending for resend_requests()."""
        trace("postcopy_fault_rp_broken", pending=len(self.pending))
        self.paused = True
        assert self.rp is not None  # it just failed under _write_rp
        self.rp.close()
        self.rp = None

    # -- the preempt channel ----------------------------------------------------------------

    def _drop_preempt(self) -> None:
        if self.preempt is not None:
            self._unwatch(self.preempt.fileno())
            self.preempt.close()
            self.preempt = None

    def _on_preempt(self, revents: int) -> bool:
        """Read the preempt channel; whether there may be more to read."""
        assert self.preempt is not None  # watched only while there is one
        more = self.preempt.read()
        if self.preempt.ended:
            self._drop_preempt()
        return more

    def _place(self, ev: RamPage | RamZero) -> None:
        """Place an urgent page from the preempt channel and wake its waiters."""
        b, page = self.index[ev.block], ev.offset // self.ps
        data = ev.data if type(ev) is RamPage else None
        trace("postcopy_place_page", block=ev.block, offset=ev.offset,
              zero=data is None, channel="preempt")
        for attempt in (0, 1):
            placer_vcpu = self.placer_vcpu
            try:
                placed = self.loader.land_page(ev.block, ev.offset, data)
                break
            except PostcopyError as exc:
                # Its vCPU detached or died under us: go through another
                # (_drop makes a new placer, and hands it to the loader).
                if attempt == 0 and placer_vcpu is not None and self._gone(placer_vcpu):
                    self._drop(placer_vcpu)
                    continue
                raise PostcopyError(
                    f"placing page {page} of block '{ev.block}' from the preempt "
                    f"channel: {exc}") from None
        # UFFDIO_COPY woke the waiters of its own descriptor only if it
        # installed the page; otherwise every waiter needs a wake.
        self._page_arrived((b, page), time.monotonic_ns(), skip=placer_vcpu if placed else None)
