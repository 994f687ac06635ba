"""The vCPU side of postcopy faults: registration and waiting for pages.

During postcopy a destination vCPU runs before all of guest RAM has arrived.
:class:`FaultClient` lives in the vCPU process and connects it to the fault
handler (:mod:`engine.postcopy.handler`) over an ``AF_UNIX``
``SOCK_SEQPACKET`` socket, speaking :mod:`engine.ram.faultproto`:

* **userfaultfd**: the vCPU opens a userfaultfd, registers its own mapping of
  every block in MISSING mode and sends the descriptor with REGISTER.  From
  then on the kernel blocks the vCPU on a missing page until the handler
  places it; the workload does nothing special.  The vCPU keeps its own copy
  of the descriptor until :meth:`FaultClient.detach`, so a handler that dies
  leaves the vCPU blocked rather than letting it read zeros.
* **software**: the vCPU maps the shared "received" bitmaps that REGISTERED
  names, and the workload calls :meth:`FaultClient.touch` (a range) or
  :meth:`FaultClient.touch_pages` (an index array) before it accesses pages.
  Missing pages are asked for with one FAULT per contiguous run; the vCPU
  then waits for WAKE and looks at the bitmap again until all are there.

A request that fails is reported to the coordinator as a code
(:func:`error_code`: what failed << 16 | errno) plus a line of text.
"""
from __future__ import annotations

import errno
import os
import socket
import time
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from engine.errors import EngineError, FaultSetupError, GuestError, ProtocolError
from engine.ram import faultproto
from engine.ram.faultproto import (MAX_MESSAGE, MODE_SOFTWARE, MODE_USERFAULTFD, Fault,
                                   Register, Registered, Wake)
from engine.ram.dirty import DirtyLog, DirtyLogHandle
from engine.ram.runs import index_runs

if TYPE_CHECKING:
    from engine.uffd import Userfaultfd

__all__ = ["FaultClient", "FaultSetupError", "MODE_DETACH", "error_code", "describe_error",
           "STAGE_MODE", "STAGE_UFFD_OPEN", "STAGE_UFFD_REGISTER", "STAGE_CONNECT",
           "STAGE_SEND", "STAGE_REPLY", "STAGE_BITMAPS", "STAGE_DETACH",
           "STAGE_INTERNAL"]

#: FAULTS_MODE value asking a vCPU to drop its registration.
MODE_DETACH = 0

# What a vCPU was doing when a request failed (the high half of its code).
STAGE_MODE = 1
STAGE_UFFD_OPEN = 2
STAGE_UFFD_REGISTER = 3
STAGE_CONNECT = 4
STAGE_SEND = 5
STAGE_REPLY = 6
STAGE_BITMAPS = 7
STAGE_DETACH = 8
STAGE_INTERNAL = 9

_STAGES = {
    STAGE_MODE: "unknown fault mode",
    STAGE_UFFD_OPEN: "cannot open a userfaultfd",
    STAGE_UFFD_REGISTER: "cannot register its RAM with userfaultfd",
    STAGE_CONNECT: "cannot connect to the fault handler",
    STAGE_SEND: "cannot send REGISTER to the fault handler",
    STAGE_REPLY: "got no REGISTERED from the fault handler",
    STAGE_BITMAPS: "cannot map the received bitmaps",
    STAGE_DETACH: "cannot unregister from userfaultfd",
    STAGE_INTERNAL: "failed unexpectedly",
}

#: How long a vCPU waits for one socket event before it re-checks the bitmap
#: and whether it should give up (seconds).
WAIT_INTERVAL = 0.01
#: Longest wait for REGISTERED; the coordinator usually gives up first and
#: its next request cancels the wait anyway (seconds).
REPLY_TIMEOUT = 60.0


def error_code(stage: int, err: int = 0) -> int:
    """The ``ST_FAULTS_ERR`` word for a failure in *stage* with errno *err*."""
    return (stage << 16) | (err & 0xFFFF)


def describe_error(code: int) -> str:
    """Human-readable text for an ``ST_FAULTS_ERR`` code."""
    stage, err = code >> 16, code & 0xFFFF
    text = _STAGES.get(stage, f"failed (code {code:#x})")
    if err:
        text += f": {errno.errorcode.get(err, err)} ({os.strerror(err)})"
    return text


def _setup_error(stage: int, reason: str, err: int = 0) -> FaultSetupError:
    code = error_code(stage, err)
    return FaultSetupError(code, describe_error(code), reason)


def _errno_of(exc: BaseException | None, default: int) -> int:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        if isinstance(exc, TimeoutError):
            return errno.ETIMEDOUT
        exc = exc.__cause__
    return default


def missing_runs(present: np.ndarray, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, counts)`` of the contiguous runs of *pages* whose entry in
    *present* is 0.  *pages* may be unsorted and hold duplicates."""
    return index_runs(np.unique(pages[present[pages] == 0]))


class FaultClient:
    """One vCPU's registration with the postcopy fault handler.

    *blocks* are the vCPU's :class:`~engine.ram.block.RamBlock` mappings in
    guest order.  *cancelled* is polled while the vCPU waits (for REGISTERED,
    for a page); when it returns true the wait gives up - the vCPU is quitting,
    its parent died, or the coordinator sent a newer request.
    """

    def __init__(self, vcpu: int, blocks: Sequence, cancelled: Callable[[], bool]):
        self.vcpu = vcpu
        self.blocks = list(blocks)
        self.cancelled = cancelled
        #: MODE_DETACH, MODE_USERFAULTFD or MODE_SOFTWARE
        self.mode = MODE_DETACH
        self.sock: socket.socket | None = None
        self.uffd: Userfaultfd | None = None
        self._registered: list[tuple[int, int]] = []
        self._logs: list[DirtyLog] = []
        #: software mode: the received bitmaps, one uint8 per page and block
        self.received: list[np.ndarray] = []
        self._handler_gone = False

    # -- registration -----------------------------------------------------------------

    def attach(self, path: str, mode: int) -> None:
        """Register with the handler listening at *path* in *mode*.

        Any previous registration must have been dropped (:meth:`detach`).
        Raises :class:`FaultSetupError`; nothing stays registered then.
        """
        if mode not in (MODE_USERFAULTFD, MODE_SOFTWARE):
            raise _setup_error(STAGE_MODE, f"mode {mode}", errno.EINVAL)
        try:
            bases = self._bases()
            if mode == MODE_USERFAULTFD:
                self._register_uffd(bases)
            self._connect(path)
            fds: list[int] = [self.uffd.fd] if self.uffd is not None else []
            self._send_register(Register(self.vcpu, os.getpid(), mode, bases), fds)
            reply = self._await_registered()
            if mode == MODE_SOFTWARE:
                self._map_bitmaps(reply)
        except BaseException:
            try:
                self._release()
            except FaultSetupError:
                pass    # the original failure is the one to report
            raise
        self.mode = mode
        self._handler_gone = False

    def _bases(self) -> tuple[int, ...]:
        from engine.uffd import buffer_address
        return tuple(buffer_address(b.buf) for b in self.blocks)

    def _register_uffd(self, bases: tuple[int, ...]) -> None:
        from engine.errors import PostcopyError
        from engine.uffd import Userfaultfd
        try:
            self.uffd = Userfaultfd.open()
        except PostcopyError as exc:
            raise _setup_error(STAGE_UFFD_OPEN, str(exc), _errno_of(exc, 0)) from exc
        for block, base in zip(self.blocks, bases):
            try:
                self.uffd.register(base, block.used_length)
            except PostcopyError as exc:
                raise _setup_error(STAGE_UFFD_REGISTER, f"block {block.idstr!r}: {exc}",
                                      _errno_of(exc, 0)) from exc
            self._registered.append((base, block.used_length))

    def _connect(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock = sock
        try:
            sock.settimeout(1.0)     # a full backlog; a unix connect is otherwise instant
            sock.connect(path)
        except OSError as exc:
            err = _errno_of(exc, errno.EIO)
            raise _setup_error(STAGE_CONNECT, "" if exc.errno else str(exc), err) from exc
        sock.settimeout(WAIT_INTERVAL)

    def _send_register(self, msg: Register, fds: list[int]) -> None:
        assert self.sock is not None    # _connect() made it
        try:
            if fds:
                socket.send_fds(self.sock, [faultproto.pack(msg)], fds)
            else:
                self.sock.send(faultproto.pack(msg))
        except OSError as exc:
            raise _setup_error(STAGE_SEND, str(exc), _errno_of(exc, errno.EIO)) from exc

    def _await_registered(self) -> Registered:
        deadline = time.monotonic() + REPLY_TIMEOUT
        assert self.sock is not None    # _connect() made it
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except TimeoutError:
                if self.cancelled():
                    raise _setup_error(STAGE_REPLY, "cancelled", errno.ECANCELED) from None
                if time.monotonic() > deadline:
                    raise _setup_error(STAGE_REPLY, f"none within {REPLY_TIMEOUT} s",
                                          errno.ETIMEDOUT) from None
                continue
            except OSError as exc:
                raise _setup_error(STAGE_REPLY, str(exc), _errno_of(exc, errno.EIO)) from exc
            if not data:
                raise _setup_error(STAGE_REPLY, "the handler closed the connection",
                                      errno.ECONNRESET)
            try:
                msg = faultproto.unpack(data)
            except ProtocolError as exc:
                raise _setup_error(STAGE_REPLY, str(exc), errno.EPROTO) from exc
            if isinstance(msg, Registered):
                return msg
            if not isinstance(msg, Wake):    # a stray WAKE is harmless
                raise _setup_error(STAGE_REPLY, f"unexpected {msg!r}", errno.EPROTO)

    def _map_bitmaps(self, reply: Registered) -> None:
        if len(reply.received) != len(self.blocks):
            raise _setup_error(
                STAGE_BITMAPS, f"{len(reply.received)} bitmaps for {len(self.blocks)} blocks",
                errno.EINVAL)
        for block, (name, npages) in zip(self.blocks, reply.received):
            if npages != block.npages:
                raise _setup_error(
                    STAGE_BITMAPS, f"bitmap {name!r} has {npages} pages, block "
                    f"{block.idstr!r} {block.npages}", errno.EINVAL)
            try:
                self._logs.append(DirtyLog.attach(DirtyLogHandle(name, npages)))
            except GuestError as exc:
                raise _setup_error(STAGE_BITMAPS, str(exc), errno.ENOENT) from exc
        self.received = [log.log for log in self._logs]

    def detach(self) -> None:
        """Drop the registration (no-op when there is none).

        Everything is released even on failure; an ``UFFDIO_UNREGISTER``
        that failed raises :class:`FaultSetupError` afterwards.
        """
        self.mode = MODE_DETACH
        self._release()

    def _release(self) -> None:
        failure = None
        if self.uffd is not None:
            for base, length in self._registered:
                try:
                    self.uffd.unregister(base, length)
                except EngineError as exc:
                    failure = failure or _setup_error(STAGE_DETACH, str(exc),
                                                      _errno_of(exc, 0))
            self.uffd.close()
            self.uffd = None
        self._registered = []
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.received = []
        for log in self._logs:
            log.close()
        self._logs = []
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Release everything, ignoring errors (the vCPU is exiting)."""
        try:
            self.detach()
        except FaultSetupError:
            pass

    # -- software faults ----------------------------------------------------------------

    def touch(self, block: int, first: int, count: int) -> bool:
        """Wait until pages ``[first, first+count)`` of *block* are present.

        Returns False, without waiting further, when :attr:`cancelled` says
        so: the caller must then not access the pages.
        """
        received = self.received[block]
        if received[first:first + count].all():
            return True
        return self._wait(block, np.arange(first, first + count, dtype=np.int64))

    def touch_pages(self, block: int, pages: np.ndarray) -> bool:
        """Like :meth:`touch` for an array of page indexes (any order)."""
        if self.received[block][pages].all():
            return True
        return self._wait(block, np.asarray(pages, dtype=np.int64))

    def _wait(self, block: int, pages: np.ndarray) -> bool:
        received = self.received[block]
        starts, counts = missing_runs(received, pages)
        for start, count in zip(starts.tolist(), counts.tolist()):
            if not self._send(Fault(block, start, count)):
                return False
        # A WAKE says "something arrived"; the bitmap says what.
        while not received[pages].all():
            if self.cancelled():
                return False
            self._await_wake()
        return True

    def _send(self, msg) -> bool:
        data = faultproto.pack(msg)
        assert self.sock is not None    # attached: attach() connected it
        while not self._handler_gone:
            try:
                self.sock.send(data)
                return True
            except TimeoutError:
                if self.cancelled():
                    return False
            except OSError:
                # The handler is gone: keep waiting on the bitmap (the pages
                # may still be placed by the coordinator), never read zeros.
                self._handler_gone = True
        return True

    def _await_wake(self) -> None:
        if self._handler_gone:
            time.sleep(WAIT_INTERVAL)
            return
        assert self.sock is not None    # attached: attach() connected it
        try:
            data = self.sock.recv(MAX_MESSAGE)
        except TimeoutError:
            return
        except OSError:
            self._handler_gone = True
            return
        if not data:
            self._handler_gone = True
        # Whatever arrived (normally WAKE), the caller re-reads the bitmap.
