"""The postcopy fault handler, seen from the destination coordinator.

QEMU's destination runs a "fault thread" next to the vCPU threads; here the
vCPUs are processes, so the handler is a process of its own (a faulting
guest thread must never hold anything the handler needs).  The handler is
three modules along that process boundary:

* this one, :class:`FaultHandler`: the coordinator's proxy.  It creates what
  the process shares with the coordinator and the vCPUs - the listening
  socket where vCPUs register (:attr:`FaultHandler.socket_path`,
  :mod:`engine.ram.faultproto`), the "received" bitmaps (one byte per page
  and block, set by whoever places a page) and "requested" bitmaps (a page
  just placed has a waiter: :meth:`FaultHandler.placed`), and the lock
  (:class:`~engine.postcopy.lock.FileLock`) under which both write the
  return path - starts the process and talks to it;
* :mod:`~engine.postcopy.faultloop`: the process and its poll loop, which
  turns faults into REQ_PAGES on (a duplicate of) the return path, places
  the preempt channel's pages and wakes the waiters;
* :mod:`~engine.postcopy.control`: the typed messages between the two, over
  a ``SOCK_SEQPACKET`` socketpair (descriptors ride along with SCM_RIGHTS).

Statistics (:mod:`~engine.postcopy.blocktime`) are QEMU's: remote fault
latency, blocktime per vCPU and the time all vCPUs were blocked at once.

A failure of the loop arrives here as the exception the loop raised (same
class, same channel and offset; :mod:`engine.ctlerrors`) and is raised by
every later call.  The process exits when the control socket ends, and dies
with its parent.
"""
from __future__ import annotations

import multiprocessing
import os
import select
import shutil
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

from engine.errors import ConfigError, PostcopyError, RemoteProtocolError
from engine.postcopy import control as ctl
from engine.postcopy.blocktime import empty_figures
from engine.postcopy.faultloop import LoopConfig, fault_main, recv_with_fds
from engine.postcopy.lock import FileLock
from engine.procs import spawn
from engine.ram.seams import MappedBlock
from engine.ram.dirty import DirtyLog
from engine.trace import trace
from engine.uffd import Userfaultfd

__all__ = ["FaultHandler", "FileLock", "HANDLER_MODES"]

#: the modes a handler runs in (``auto`` is resolved before one is made)
HANDLER_MODES = ("userfaultfd", "software")

#: seconds the process may take to start (a spawned interpreter importing numpy)
STARTUP_SECONDS = 60.0
#: seconds a request/response over the control socket may take
REPLY_SECONDS = 10.0
#: seconds the process gets to stop by itself at close()
STOP_SECONDS = 5.0
#: largest control packet from the process (a stats reply, an error)
_CTL_MAX = 64 * 1024


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

    A failure of the process surfaces as the exception it raised (a
    :class:`PostcopyError`, or e.g. the :class:`RemoteProtocolError` of a
    malformed preempt channel, with its channel and offset; an unexpected
    one as a :class:`PostcopyError` naming its type), a death as a
    :class:`PostcopyError`, from :meth:`check` and from every call that
    talks to it.  :meth:`close` always releases everything.
    """

    def __init__(self, blocks: Sequence[MappedBlock], mode: str, *, page_size: int = 4096,
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
        self._error: BaseException | None = None
        self._ctl_eof = False
        # What the process told us (written by _pump under _ctl_lock).
        self._ready = False
        self._nregistered = 0
        self._registered: tuple | None = None     # (fd | None, bases)
        self._stats_reply: dict | None = None
        self._final_stats: dict | None = None
        self._uffds: list[Userfaultfd] = []       # handed out by wait_registered
        self._ctl_lock = threading.Lock()
        self._on_message: dict[type, Callable[[Any, list[int]], None]] = {ctl.Ready: self._on_ready, ctl.Vcpus: self._on_vcpus,
                            ctl.Stats: self._on_stats, ctl.Error: self._on_error}
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
                    cfg = LoopConfig(tuple(b.handle for b in blocks),
                                  tuple(r.handle for r in self.received_logs),
                                  tuple(r.handle for r in self.requested_logs),
                                  mode, page_size, nvcpus, os.getpid())
                    self._proc = spawn(fault_main, (cfg, listener, theirs, self.lock),
                                       "engine-postcopy-faults")
                finally:
                    theirs.close()
            finally:
                listener.close()        # the process has its own; the path stays bound
            with self._ctl_lock:
                self._await(lambda: self._ready, "the fault handler to start",
                            STARTUP_SECONDS)
            trace("postcopy_fault_handler_start", pid=self._proc.pid, mode=mode,
                  nvcpus=nvcpus)
        except BaseException:
            self.close()
            raise

    # -- control socket ------------------------------------------------------------

    def _send(self, msg: ctl.Message, fds: tuple[int, ...] = ()) -> None:
        if self._closed:
            raise PostcopyError("postcopy fault handler is closed")
        self._raise_error()
        data = ctl.pack(msg)
        trace("postcopy_fault_ctl_send", msg=type(msg).__name__)
        assert self._ctl is not None    # made in __init__ before the process ran
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
        assert self._ctl is not None    # made in __init__ before the process ran
        poller = select.poll()
        poller.register(self._ctl, select.POLLIN)
        if not poller.poll(max(0, int(timeout * 1000))):
            return False
        try:
            data, fds = recv_with_fds(self._ctl, _CTL_MAX, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            data, fds = b"", []
        if not data:
            self._ctl_eof = True
            for fd in fds:
                os.close(fd)
            return False
        try:
            msg = ctl.unpack(data, len(fds))
            if not isinstance(msg, ctl.TO_COORDINATOR):
                raise RemoteProtocolError(f"{type(msg).__name__} sent to the coordinator",
                                          0, ctl.CHANNEL)
        except RemoteProtocolError as exc:
            for fd in fds:
                os.close(fd)
            self._error = exc
            return True
        trace("postcopy_fault_ctl_recv", msg=type(msg).__name__)
        self._on_message[type(msg)](msg, fds)
        for fd in fds:
            os.close(fd)
        return True

    # What the process says (caller holds _ctl_lock); a handler pops the
    # descriptor it keeps, the rest are closed.

    def _on_ready(self, msg: ctl.Ready, fds: list[int]) -> None:
        self._ready = True

    def _on_vcpus(self, msg: ctl.Vcpus, fds: list[int]) -> None:
        self._nregistered = msg.count
        if msg.count == self.nvcpus:
            if self._registered is not None and self._registered[0] is not None:
                os.close(self._registered[0])    # superseded, never taken
            self._registered = (fds.pop() if fds else None, msg.bases)

    def _on_stats(self, msg: ctl.Stats, fds: list[int]) -> None:
        self._stats_reply = msg.figures

    def _on_error(self, msg: ctl.Error, fds: list[int]) -> None:
        # The loop's own exception, rebuilt as itself (class, channel, offset).
        trace("postcopy_fault_handler_error", error=type(msg.exc).__name__,
              text=repr(str(msg.exc)))
        self._error = msg.exc

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _died(self) -> PostcopyError:
        code = self._proc.exitcode if self._proc is not None else None
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exited with code {code}")
        trace("postcopy_fault_handler_died", exitcode=code)
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
            assert self._registered is not None     # what _await waited for
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
        self._send(ctl.ReturnPath(), (sock.fileno(),))

    def set_preempt(self, sock: socket.socket) -> None:
        """Give the process (a duplicate of) the preempt channel: it reads page
        records there and places them itself.  Replaces an earlier one."""
        self._send(ctl.Preempt(), (sock.fileno(),))

    def placed(self, block: int, page: int) -> None:
        """The coordinator placed *page* of *block* (index) whose requested
        bit was set: the process wakes its waiters.  Does not wait."""
        self._send(ctl.Placed(block, page))

    def pause(self) -> None:
        """The channels broke: stop writing the return path (the process drops
        its duplicates of both channels); faults and requests are kept."""
        self._send(ctl.Pause())

    def resend_requests(self) -> None:
        """After POSTCOPY_RESUME: send every pending request again on the
        current return path, the first in the REQ_PAGES_ID form."""
        self._send(ctl.Resend())

    def stats(self) -> dict:
        """The handler's figures::

            {"postcopy-requests": pages requested, "postcopy-latency": mean
             remote fault latency (ns), "postcopy-latency-p50" and
             "postcopy-latency-p99": median and 99th percentile (ns),
             "postcopy-blocktime": ms all vCPUs were blocked at once,
             "postcopy-vcpu-blocktime": [ms per vCPU],
             "postcopy-faults": mode, "faults": faults read,
             "preempt-pages", "preempt-zero-pages": page records that came
             on the preempt channel (with contents, zero)}

        After :meth:`close` the last figures (taken at close) are returned.
        """
        if self._closed:
            return dict(self._final_stats) if self._final_stats else empty_figures(
                self.mode, self.nvcpus)
        return self._query_stats(REPLY_SECONDS)

    def _query_stats(self, timeout: float) -> dict:
        with self._ctl_lock:
            self._stats_reply = None
            self._send(ctl.QueryStats())
            self._await(lambda: self._stats_reply is not None, "statistics", timeout)
            reply, self._stats_reply = self._stats_reply, None
        assert reply is not None        # what _await waited for
        return reply

    def check(self) -> None:
        """Raise the error the process reported (as itself), or a
        :class:`PostcopyError` if it died.  Never blocks for long."""
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
                    and self._ready and self._ctl is not None:
                try:
                    self._final_stats = self._query_stats(STOP_SECONDS)
                except Exception:
                    pass
                try:
                    self._ctl.send(ctl.pack(ctl.Stop()))
                except OSError:
                    pass
                proc.join(STOP_SECONDS)
        finally:
            self._closed = True
            if proc is not None:
                if proc.exitcode is None:
                    proc.kill()
                proc.join()
                trace("postcopy_ram_incoming_cleanup_join", pid=proc.pid,
                      exitcode=proc.exitcode)
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
