"""The postcopy fault handler: a process that turns vCPU faults into page requests.

QEMU's destination runs a "fault thread" next to the vCPU threads; here the
vCPUs are processes, so the handler is a process of its own (a faulting
guest thread must never hold anything the handler needs).  It owns:

* a ``SOCK_SEQPACKET`` listening socket (:attr:`FaultHandler.socket_path`)
  where vCPUs register (:mod:`~engine.postcopy.faultproto`): in userfaultfd
  mode each hands over its own userfaultfd, registered over its mapping of
  every block; in software mode a vCPU sends FAULT messages itself;
* the shared "received" bitmaps (one byte per page and block), which the
  coordinator, the multifd receive workers and the placers set once a page
  is in place, and "requested" bitmaps, which tell the coordinator that a
  page it just placed has a waiter (:meth:`FaultHandler.placed`);
* a duplicate of the return path, where it writes REQ_PAGES_ID / REQ_PAGES
  under :attr:`FaultHandler.lock` (the coordinator writes its own return-path
  messages under the same lock), and of the preempt channel, whose page
  records it places itself.

A fault on a page that has been received is served locally: a page received
as ZERO in precopy was never written and is still a hole, so the handler
installs a zero page (UFFDIO_ZEROPAGE; EEXIST just wakes).  Otherwise the
page is requested once, and every waiter is woken when it arrives, whoever
placed it: ``UFFDIO_COPY`` wakes only waiters in the address space of the
descriptor it went through, so the other vCPUs' descriptors get
``UFFDIO_WAKE``; software vCPUs get a WAKE message.  Every ~10 ms with
waiters the handler also sweeps them against the received bitmaps, so a
missed notification costs latency, never a hang.

Statistics are QEMU's: remote fault latency (ns, mean and p99), blocktime
per vCPU and the time all vCPUs were blocked at once (ms).

The coordinator talks to the process over a control ``SOCK_SEQPACKET``
socketpair (pickled tuples; descriptors ride along with SCM_RIGHTS).  The
process exits when that socket ends, and dies with its parent.
"""
from __future__ import annotations

import array
import fcntl
import multiprocessing
import os
import pickle
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

from engine.errors import (ConfigError, LocalProtocolError, PostcopyError, ProtocolError,
                           RemoteProtocolError)
from engine.postcopy import faultproto as fp
from engine.postcopy.placer import Placer
from engine.postcopy.uffd import Userfaultfd
from engine.procs import child_setup, spawn
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog
from engine.stream.decoder import StreamDecoder
from engine.stream.events import NEED_DATA, RamBlockInfo, RamEOS, RamPage, RamZero
from engine.stream.returnpath import rp_req_pages, rp_req_pages_id

__all__ = ["FaultHandler", "HANDLER_MODES"]

#: the modes a handler runs in (``auto`` is resolved before one is made)
HANDLER_MODES = ("userfaultfd", "software")

#: seconds the process may take to start (a spawned interpreter importing numpy)
STARTUP_SECONDS = 60.0
#: seconds a request/response over the control socket may take
REPLY_SECONDS = 10.0
#: seconds the process gets to stop by itself at close()
STOP_SECONDS = 5.0
#: while vCPUs wait, the handler looks at the received bitmaps this often (ns)
SWEEP_NS = 10_000_000
#: poll timeout with nobody waiting (ms): nothing to sweep, the control
#: socket's end wakes us anyway
IDLE_POLL_MS = 500
#: a return path that takes no bytes for this long counts as broken (s)
RP_STALL_SECONDS = 30.0
#: bytes read from the preempt channel per poll round
PREEMPT_READ = 256 * 1024

# Control messages (first element of the pickled tuple).
_READY = "ready"            # process -> coordinator: up and listening
_VCPUS = "vcpus"            # process -> : (count, bases | None) [+ uffd when all are in]
_STATS = "stats"            # both ways: request / (dict,)
_ERROR = "error"            # process -> : (class name, message, offset, channel)
_RP = "rp"                  # coordinator -> process, + fd: the return path
_PREEMPT = "preempt"        # + fd: the preempt channel
_PLACED = "placed"          # (block, page): the coordinator placed a requested page
_PAUSE = "pause"            # the channels broke
_RESEND = "resend"          # POSTCOPY_RESUME: send every pending request again
_STOP = "stop"

#: largest control packet to the coordinator (a stats reply) and to the process
_CTL_MAX = 64 * 1024
_CTL_IN_MAX = 4096
#: after REGISTER a vCPU sends only FAULT packets (17 bytes); a longer one
#: arrives truncated and is refused as malformed
_VCPU_PACKET_MAX = 256


def _ctl_pack(*msg) -> bytes:
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


_FD_SPACE = socket.CMSG_SPACE(2 * array.array("i").itemsize)


def _recv_with_fds(sock: socket.socket, bufsize: int, flags: int = 0) -> tuple[bytes, list[int]]:
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
class _Config:
    """What the process needs (picklable)."""

    blocks: tuple           # RamBlockHandle per block
    received: tuple         # DirtyLogHandle per block
    requested: tuple        # DirtyLogHandle per block
    mode: str
    page_size: int
    nvcpus: int
    parent_pid: int


# -- the coordinator's handle -----------------------------------------------------------


class FaultHandler:
    """The fault handler process, seen from the destination coordinator.

    *blocks* are the guest's RAM blocks (their page size must be
    *page_size*, bytes), *mode* ``"userfaultfd"`` or ``"software"``,
    *nvcpus* the number of vCPUs that will register.  The constructor
    returns once the process runs and :attr:`socket_path` accepts vCPUs.

    Attributes: :attr:`socket_path`, :attr:`mode`, :attr:`received_logs`
    and :attr:`requested_logs` (one :class:`DirtyLog` per block, shared with
    the process), :attr:`lock` (a :class:`FileLock`: the software
    placer's lock and the return-path write lock).

    Failures of the process surface as :class:`PostcopyError` (or the
    :class:`ProtocolError` it hit, e.g. a malformed preempt channel) from
    :meth:`check` and from every call that talks to it.  :meth:`close`
    always releases everything.
    """

    def __init__(self, blocks: list[RamBlock], mode: str, *, page_size: int = 4096,
                 nvcpus: int):
        if mode not in HANDLER_MODES:
            raise ConfigError(f"fault handler mode {mode!r}: choose one of "
                              f"{', '.join(HANDLER_MODES)}")
        if nvcpus < 0:
            raise ConfigError(f"fault handler: nvcpus must be >= 0, not {nvcpus}")
        for b in blocks:
            if b.page_size != page_size:
                raise ConfigError(f"fault handler: block {b.idstr!r} has page size "
                                  f"{b.page_size}, postcopy pages are {page_size} bytes")
        self.mode = mode
        self.nvcpus = nvcpus
        self.page_size = page_size
        self.blocks = list(blocks)
        self.received_logs: list[DirtyLog] = []
        self.requested_logs: list[DirtyLog] = []
        self._proc: multiprocessing.Process | None = None
        self._ctl: socket.socket | None = None
        self._closed = False
        self._error: Exception | None = None
        self._ctl_eof = False
        # What the process told us (written by _pump under _ctl_lock).
        self._ready = False
        self._nregistered = 0
        self._registered: tuple | None = None     # (fd | None, bases)
        self._stats_reply: dict | None = None
        self._final_stats: dict | None = None
        self._uffds: list[Userfaultfd] = []       # handed out by wait_registered
        self._ctl_lock = threading.Lock()
        self._dir = tempfile.mkdtemp(prefix="engine-postcopy-")
        self.socket_path = os.path.join(self._dir, "faults.sock")
        try:
            for b in blocks:
                self.received_logs.append(DirtyLog.create(b.npages))
                self.requested_logs.append(DirtyLog.create(b.npages))
            self.lock = FileLock(os.path.join(self._dir, "lock"))
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                listener.bind(self.socket_path)
                listener.listen(max(16, 2 * nvcpus))
                self._ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                try:
                    cfg = _Config(tuple(b.handle for b in blocks),
                                  tuple(r.handle for r in self.received_logs),
                                  tuple(r.handle for r in self.requested_logs),
                                  mode, page_size, nvcpus, os.getpid())
                    self._proc = spawn(_handler_main, (cfg, listener, theirs, self.lock),
                                       "engine-postcopy-faults")
                finally:
                    theirs.close()
            finally:
                listener.close()        # the process has its own; the path stays bound
            with self._ctl_lock:
                self._await(lambda: self._ready, "the fault handler to start",
                            STARTUP_SECONDS)
        except BaseException:
            self.close()
            raise

    # -- control socket ------------------------------------------------------------

    def _send(self, msg: tuple, fds: tuple[int, ...] = ()) -> None:
        if self._closed:
            raise PostcopyError("postcopy fault handler is closed")
        self._raise_error()
        data = _ctl_pack(*msg)
        try:
            if fds:
                socket.send_fds(self._ctl, [data], list(fds))
            else:
                self._ctl.send(data)
        except OSError as exc:
            self.check()
            raise PostcopyError(f"postcopy fault handler unreachable: {exc}") from exc

    def _pump(self, timeout: float) -> bool:
        """Read and record one control message, waiting up to *timeout* s.
        Caller holds _ctl_lock.  False if none came (or the socket ended)."""
        if self._ctl_eof:
            return False
        poller = select.poll()
        poller.register(self._ctl, select.POLLIN)
        if not poller.poll(max(0, int(timeout * 1000))):
            return False
        try:
            data, fds = _recv_with_fds(self._ctl, _CTL_MAX, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            data, fds = b"", []
        if not data:
            self._ctl_eof = True
            for fd in fds:
                os.close(fd)
            return False
        msg = pickle.loads(data)
        kind = msg[0]
        if kind == _VCPUS:
            _, count, bases = msg
            self._nregistered = count
            if count == self.nvcpus:
                if self._registered is not None and self._registered[0] is not None:
                    os.close(self._registered[0])    # superseded, never taken
                self._registered = (fds.pop() if fds else None, bases)
        elif kind == _STATS:
            self._stats_reply = msg[1]
        elif kind == _ERROR:
            self._error = _rebuild_error(*msg[1:])
        elif kind == _READY:
            self._ready = True
        for fd in fds:
            os.close(fd)
        return True

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _died(self) -> PostcopyError:
        code = self._proc.exitcode if self._proc is not None else None
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exited with code {code}")
        return PostcopyError(f"postcopy fault handler process {how}")

    def _await(self, done, what: str, timeout: float) -> None:
        """Pump control messages until ``done()``; caller holds _ctl_lock."""
        deadline = time.monotonic() + timeout
        while True:
            if done():
                return
            self._raise_error()
            if self._ctl_eof or (self._proc is not None and self._proc.exitcode is not None):
                # Its last words (an ERROR) may still be in the socket.
                while self._pump(0):
                    pass
                if done():
                    return
                self._raise_error()
                if self._proc is not None:
                    self._proc.join(1.0)
                self._error = self._died()
                raise self._error
            left = deadline - time.monotonic()
            if left <= 0:
                raise PostcopyError(f"postcopy fault handler: timed out after {timeout:g} s "
                                    f"waiting for {what}")
            self._pump(min(left, 0.05))

    # -- API ---------------------------------------------------------------------------

    def wait_registered(self, timeout: float) -> tuple[Userfaultfd | None,
                                                       tuple[int, ...] | None]:
        """Wait until all *nvcpus* vCPUs have registered (seconds).

        Userfaultfd mode: returns one vCPU's userfaultfd (received from the
        process; valid until :meth:`close`, which closes it) and that
        vCPU's block base addresses, for the coordinator's own
        :class:`~engine.postcopy.placer.Placer`.  Software mode or no vCPUs:
        ``(None, None)``.
        """
        if self.nvcpus == 0:
            return None, None
        if self._closed:
            raise PostcopyError("postcopy fault handler is closed")
        with self._ctl_lock:
            self._await(lambda: self._registered is not None,
                        f"{self.nvcpus} vCPUs to register", timeout)
            fd, bases = self._registered
            self._registered = None
        if fd is None:
            return None, None
        uffd = Userfaultfd.from_fd(fd)
        self._uffds.append(uffd)
        return uffd, tuple(bases)

    def set_return_path(self, sock: socket.socket) -> None:
        """Give the process (a duplicate of) the return path.  It writes
        REQ_PAGES(_ID) there under :attr:`lock` unless paused; call again with
        the new socket after a recovery (before :meth:`resend_requests`)."""
        self._send((_RP,), (sock.fileno(),))

    def set_preempt(self, sock: socket.socket) -> None:
        """Give the process (a duplicate of) the preempt channel: it reads page
        records there and places them itself.  Replaces an earlier one."""
        self._send((_PREEMPT,), (sock.fileno(),))

    def placed(self, block: int, page: int) -> None:
        """The coordinator placed *page* of *block* (index) whose requested
        bit was set: the process wakes its waiters.  Does not wait."""
        self._send((_PLACED, block, page))

    def pause(self) -> None:
        """The channels broke: stop writing the return path (the process drops
        its duplicates of both channels); faults and requests are kept."""
        self._send((_PAUSE,))

    def resend_requests(self) -> None:
        """After POSTCOPY_RESUME: send every pending request again on the
        current return path, the first in the REQ_PAGES_ID form."""
        self._send((_RESEND,))

    def stats(self) -> dict:
        """The handler's figures::

            {"postcopy-requests": pages requested, "postcopy-latency": mean
             remote fault latency (ns), "postcopy-latency-p50" and
             "postcopy-latency-p99": median and 99th percentile (ns),
             "postcopy-blocktime": ms all vCPUs were blocked at once,
             "postcopy-vcpu-blocktime": [ms per vCPU],
             "postcopy-faults": mode, "faults": faults read}

        After :meth:`close` the last figures (taken at close) are returned.
        """
        if self._closed:
            return dict(self._final_stats) if self._final_stats else _empty_stats(
                self.mode, self.nvcpus)
        return self._query_stats(REPLY_SECONDS)

    def _query_stats(self, timeout: float) -> dict:
        with self._ctl_lock:
            self._stats_reply = None
            self._send((_STATS,))
            self._await(lambda: self._stats_reply is not None, "statistics", timeout)
            reply, self._stats_reply = self._stats_reply, None
        return reply

    def check(self) -> None:
        """Raise if the process reported an error (:class:`PostcopyError` or
        the :class:`ProtocolError` it met) or died.  Never blocks for long."""
        if self._closed:
            return
        self._raise_error()
        if self._ctl_lock.acquire(blocking=False):
            try:
                while self._pump(0):
                    pass
            finally:
                self._ctl_lock.release()
        self._raise_error()
        if self._proc is not None and self._proc.exitcode is not None:
            with self._ctl_lock:
                while self._pump(0):
                    pass
            self._raise_error()
            self._error = self._died()
            raise self._error

    def close(self) -> None:
        """Stop and reap the process, close every descriptor, unlink the
        bitmaps and remove the socket directory.  Idempotent; fine after a
        crash of the process."""
        if self._closed:
            return
        proc = self._proc
        try:
            if proc is not None and proc.exitcode is None and self._error is None \
                    and self._ready:
                try:
                    self._final_stats = self._query_stats(STOP_SECONDS)
                except Exception:
                    pass
                try:
                    self._ctl.send(_ctl_pack(_STOP))
                except OSError:
                    pass
                proc.join(STOP_SECONDS)
        finally:
            self._closed = True
            if proc is not None:
                if proc.exitcode is None:
                    proc.kill()
                proc.join()
                proc.close()
                self._proc = None
            if self._ctl is not None:
                self._ctl.close()
            if self._registered is not None and self._registered[0] is not None:
                os.close(self._registered[0])
                self._registered = None
            for u in self._uffds:
                u.close()
            for log in self.received_logs + self.requested_logs:
                log.close()
                log.unlink()
            lock = getattr(self, "lock", None)
            if lock is not None:
                lock.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "FaultHandler":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = ("closed" if self._closed or self._proc is None
                 else f"pid {self._proc.pid}")
        return f"<FaultHandler {self.mode} nvcpus={self.nvcpus} {state}>"


def _rebuild_error(kind: str, message: str, offset, channel) -> Exception:
    if kind == "RemoteProtocolError":
        return RemoteProtocolError(message, offset, channel)
    if kind == "LocalProtocolError":
        return LocalProtocolError(message, offset, channel)
    return PostcopyError(f"postcopy fault handler: {message}")


def _empty_stats(mode: str, nvcpus: int) -> dict:
    return {"postcopy-requests": 0, "postcopy-latency": 0, "postcopy-latency-p50": 0,
            "postcopy-latency-p99": 0,
            "postcopy-blocktime": 0, "postcopy-vcpu-blocktime": [0] * nvcpus,
            "postcopy-vcpu-latency": [0] * nvcpus, "postcopy-latency-dist": [0] * 24,
            "postcopy-faults": mode, "faults": 0}


# -- the process ----------------------------------------------------------------------


class FileLock:
    """A lock shared by processes: ``flock`` on a file in the handler's
    private directory, plus a thread lock for threads of one process.

    Chosen over ``multiprocessing.Lock`` because the kernel drops an
    ``flock`` when its holder dies (a killed coordinator cannot leave the
    handler blocked on the lock), and it leaves no named semaphore behind
    in /dev/shm when a process is killed.  Picklable: each process opens
    the file itself.
    """

    def __init__(self, path: str):
        self.path = path
        open(path, "a").close()
        self._fd: int | None = None
        self._thread_lock = threading.Lock()

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._fd = None
        self._thread_lock = threading.Lock()

    def __enter__(self):
        self._thread_lock.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc):
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _handler_main(cfg: _Config, listener: socket.socket, ctl: socket.socket, lock) -> None:
    """Body of the fault handler process."""
    child_setup(cfg.parent_pid)
    loop = None
    try:
        loop = _FaultLoop(cfg, listener, ctl, lock)
        ctl.send(_ctl_pack(_READY))
        loop.run()
    except Exception as exc:
        _report(ctl, exc)
        sys.exit(1)
    finally:
        if loop is not None:
            loop.close()


def _report(ctl: socket.socket, exc: Exception) -> None:
    if isinstance(exc, ProtocolError):
        msg = (_ERROR, type(exc).__name__, exc.message, exc.offset, exc.channel)
    elif isinstance(exc, PostcopyError):
        msg = (_ERROR, "PostcopyError", str(exc), None, None)
    else:
        msg = (_ERROR, "PostcopyError", f"{type(exc).__name__}: {exc}", None, None)
    try:
        ctl.send(_ctl_pack(*msg))
    except OSError:
        pass


class _Vcpu:
    """A registered vCPU and what it waits for."""

    __slots__ = ("index", "pid", "mode", "sock", "uffd", "bases", "channel", "waiting",
                 "blocked_since")

    def __init__(self, index, pid, mode, sock, uffd, bases):
        self.index, self.pid, self.mode = index, pid, mode
        self.sock: socket.socket = sock
        self.uffd: Userfaultfd | None = uffd
        self.bases: tuple[int, ...] = bases
        self.channel = f"fault socket of vCPU {index}"
        #: (block, page) -> monotonic ns of the fault
        self.waiting: dict[tuple[int, int], int] = {}
        self.blocked_since: int | None = None

    def __repr__(self) -> str:
        return f"vCPU {self.index} (pid {self.pid})"


class _FaultLoop:
    """The process's state and its poll loop."""

    def __init__(self, cfg: _Config, listener: socket.socket, ctl: socket.socket, lock):
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
        self.ctl = ctl
        self.poller = select.poll()
        self.dispatch: dict[int, object] = {}
        self._watch(listener.fileno(), self._on_listen)
        self._watch(ctl.fileno(), self._on_ctl)
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
        self.preempt: socket.socket | None = None
        self.decoder: StreamDecoder | None = None
        self.rbuf = bytearray(PREEMPT_READ)
        self.rview = memoryview(self.rbuf)
        self.placer: Placer | None = None
        self.placer_vcpu: _Vcpu | None = None
        self._new_placer()

        # statistics
        self.requests = 0
        self.faults = 0
        self.latencies = np.zeros(1024, dtype=np.int64)     # ns, the first nlatencies
        self.latency_vcpus = np.zeros(1024, dtype=np.int32)  # whose fault each one was
        self.nlatencies = 0
        self.blocktime: dict[int, int] = {}     # vCPU index -> ns blocked (finished spells)
        self.nblocked = 0
        self.all_since: int | None = None
        self.all_blocked_ns = 0
        self.last_sweep = time.monotonic_ns()

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

    def _send_ctl(self, *msg, fds=()) -> None:
        data = _ctl_pack(*msg)
        if fds:
            socket.send_fds(self.ctl, [data], list(fds))
        else:
            self.ctl.send(data)

    # -- the control socket ------------------------------------------------------------

    def _on_ctl(self, revents: int) -> None:
        while True:
            try:
                data, fds = _recv_with_fds(self.ctl, _CTL_IN_MAX, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:            # the coordinator is gone
                self.running = False
                return
            msg = pickle.loads(data)
            kind = msg[0]
            if kind == _PLACED:
                _, block, page = msg
                if self.received[block][page]:
                    self._page_arrived((block, page), time.monotonic_ns())
            elif kind == _RP:
                if self.rp is not None:
                    self.rp.close()
                self.rp = socket.socket(fileno=fds.pop())
                self.last_block = None      # a new channel: name the block first
            elif kind == _PREEMPT:
                self._drop_preempt()
                self.preempt = socket.socket(fileno=fds.pop())
                self.decoder = StreamDecoder(_no_vmsd, page_size=self.ps,
                                             channel="postcopy preempt",
                                             ram_records_only=True,
                                             ram_blocks=self.block_infos)
                self._watch(self.preempt.fileno(), self._on_preempt)
            elif kind == _PAUSE:
                self.paused = True
                if self.rp is not None:
                    self.rp.close()
                    self.rp = None
                self._drop_preempt()
            elif kind == _RESEND:
                self.paused = False
                self.last_block = None
                now = time.monotonic_ns()
                for key in [k for k in self.pending if self.received[k[0]][k[1]]]:
                    self._page_arrived(key, now, zero_first=True)
                self.unsent = list(self.pending)
            elif kind == _STATS:
                self._send_ctl(_STATS, self._stats())
            elif kind == _STOP:
                self.running = False
            for fd in fds:
                os.close(fd)
            if not self.running:
                return

    def _stats(self) -> dict:
        now = time.monotonic_ns()
        lat = self.latencies[:self.nlatencies]
        per = dict(self.blocktime)
        for v in self.vcpus.values():
            if v.blocked_since is not None:
                per[v.index] = per.get(v.index, 0) + now - v.blocked_since
        n = max([self.cfg.nvcpus, *(i + 1 for i in per)])
        total = self.all_blocked_ns + (now - self.all_since if self.all_since else 0)
        whose = self.latency_vcpus[:self.nlatencies]
        # QEMU 10.1's buckets: [2^N, 2^(N+1)) us, under 1 us in the first,
        # 2^23 us and more in the last
        us = lat // 1000
        buckets = np.where(us > 0, np.frexp(np.maximum(us, 1))[1] - 1, 0)
        dist = np.bincount(np.minimum(buckets, 23), minlength=24)
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
        }

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
            data, fds = _recv_with_fds(conn, fp.MAX_MESSAGE, socket.MSG_DONTWAIT)
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
        self._all_blocked(time.monotonic_ns())
        self._announce()

    def _announce(self) -> None:
        """Tell the coordinator how many vCPUs are in (with a userfaultfd for
        its placer once all of them are)."""
        count = len(self.vcpus)
        v = self.placer_vcpu
        if count == self.cfg.nvcpus and v is not None:
            self._send_ctl(_VCPUS, count, v.bases, fds=(v.uffd.fileno(),))
        else:
            self._send_ctl(_VCPUS, count, None)

    def _new_placer(self) -> None:
        """A placer through the lowest-numbered userfaultfd vCPU (UFFDIO_COPY
        needs a registered mapping), the shared lock in software mode, or
        plain writes when no vCPU can fault."""
        if self.mode == "software":
            self.placer_vcpu = None
            self.placer = Placer(self.blocks, self.received, lock=self.lock)
            return
        candidates = [v for v in self.vcpus.values() if v.uffd is not None]
        if candidates:
            v = min(candidates, key=lambda c: c.index)
            self.placer_vcpu = v
            self.placer = Placer(self.blocks, self.received, uffd=v.uffd, bases=v.bases)
        else:
            self.placer_vcpu = None
            self.placer = Placer(self.blocks, self.received)

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
        if v.blocked_since is not None:
            self._unblock(v, now)
        v.sock.close()
        if v.uffd is not None:
            v.uffd.close()
        if v is self.placer_vcpu:
            self._new_placer()
        self._all_blocked(now)
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
        self.faults += count
        rec = self.received[b]
        if count == 1:
            if not rec[lo]:
                self._wait(v, b, lo, now)
            return
        for p in (np.flatnonzero(rec[lo:lo + count] == 0) + lo).tolist():
            self._wait(v, b, p, now)

    def _on_uffd(self, v: _Vcpu, revents: int) -> None:
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
        for ev in events:
            self.faults += 1
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
        v.waiting[key] = now
        if v.blocked_since is None:
            v.blocked_since = now
            self.nblocked += 1
            self._all_blocked(now)
        lst = self.waiters.get(key)
        if lst is None:
            self.waiters[key] = [v]
        else:
            lst.append(v)
        if key not in self.pending:
            self.pending[key] = None
            self.requested[b][page] = 1
            self.unsent.append(key)
            self.requests += 1

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
        for v in waiters:
            t0 = v.waiting.pop(key, None)
            if t0 is None:
                continue
            n = self.nlatencies
            if n == len(self.latencies):
                self.latencies = np.concatenate([self.latencies, np.zeros_like(self.latencies)])
                self.latency_vcpus = np.concatenate([self.latency_vcpus,
                                                     np.zeros_like(self.latency_vcpus)])
            self.latencies[n] = now - t0
            self.latency_vcpus[n] = v.index
            self.nlatencies = n + 1
            if v.uffd is not None:
                if zero_first:
                    self._uffd_fill_zero(v, b, page)
                elif v is not skip:
                    v.uffd.wake(v.bases[b] + page * self.ps, self.ps)
            if not v.waiting:
                self._unblock(v, now)
                if v.uffd is None:
                    self._send_wake(v)

    def _send_wake(self, v: _Vcpu) -> None:
        try:
            v.sock.send(self.wake_msg)
        except OSError:
            pass    # full (it re-checks on its own timeout) or gone (EOF comes next)

    def _unblock(self, v: _Vcpu, now: int) -> None:
        self.blocktime[v.index] = self.blocktime.get(v.index, 0) + now - v.blocked_since
        v.blocked_since = None
        self.nblocked -= 1
        self._all_blocked(now)

    def _all_blocked(self, now: int) -> None:
        """Keep the all-vCPUs-blocked interval (QEMU's total blocktime)."""
        every = bool(self.vcpus) and self.nblocked == len(self.vcpus)
        if every and self.all_since is None:
            self.all_since = now
        elif not every and self.all_since is not None:
            self.all_blocked_ns += now - self.all_since
            self.all_since = None

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
        self.paused = True
        self.rp.close()
        self.rp = None

    # -- the preempt channel ----------------------------------------------------------------

    def _drop_preempt(self) -> None:
        if self.preempt is not None:
            self._unwatch(self.preempt.fileno())
            self.preempt.close()
            self.preempt = None
            self.decoder = None

    def _on_preempt(self, revents: int) -> None:
        try:
            n = self.preempt.recv_into(self.rbuf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0:
            # The end, or a break (then the source re-creates the channel
            # after recovery; a record cut short is dropped, as QEMU does).
            self._drop_preempt()
            return
        dec = self.decoder
        dec.feed(self.rview[:n])
        index = self.index
        while True:
            ev = dec.next_event()
            if ev is NEED_DATA:
                return
            kind = type(ev)
            if kind is RamPage:
                self._place(index[ev.block], ev.offset // self.ps, ev.data)
            elif kind is RamZero:
                self._place(index[ev.block], ev.offset // self.ps, None)
            elif kind is RamEOS:
                self._drop_preempt()
                return
            else:
                raise RemoteProtocolError(
                    f"{kind.__name__} on the postcopy preempt channel (only page records "
                    f"belong there)", dec.offset, "postcopy preempt")

    def _place(self, b: int, page: int, data) -> None:
        """Place an urgent page from the preempt channel and wake its waiters."""
        skip = None
        if not self.received[b][page]:
            for attempt in (0, 1):
                placer_vcpu = self.placer_vcpu
                try:
                    if data is None:
                        self.placer.place_zero(b, page)
                    else:
                        self.placer.place(b, page, data)
                    break
                except PostcopyError as exc:
                    # Its vCPU detached or died under us: go through another.
                    if attempt == 0 and placer_vcpu is not None and self._gone(placer_vcpu):
                        self._drop(placer_vcpu)
                        continue
                    raise PostcopyError(
                        f"placing page {page} of block '{self.idstrs[b]}' from the preempt "
                        f"channel: {exc}") from None
            skip = placer_vcpu      # UFFDIO_COPY woke its own waiters
        self._page_arrived((b, page), time.monotonic_ns(), skip=skip)


def _no_vmsd(idstr: str, instance_id: int):
    return None
