"""userfaultfd through ctypes, and hole punching on shared-memory files.

A destination vCPU registers its own mapping of guest RAM in MISSING mode:
touching a page that is not in the shm file's page cache then blocks the
touching thread and queues a fault message on the descriptor instead of
handing out a fresh zero page.  Whoever holds the descriptor (the fault
handler, which received it over a unix socket) reads the fault, gets the
page from the source and installs it atomically with ``UFFDIO_COPY``, which
also wakes the waiter.  ``UFFDIO_COPY`` resolves ``dst`` in the address
space of the descriptor's *creator* and reads ``src`` from the *caller's*,
so a handler in another process places pages with its own staging buffer.

Only holes fault.  A tmpfs page that was ever allocated - written, read,
or reserved with ``fallocate``/``posix_fallocate`` (as
``RamBlock.create`` does) - counts as present; :func:`punch_hole` makes a
range missing again, which is how POSTCOPY_RAM_DISCARD is implemented.

Constants and structure layouts are those of ``linux/userfaultfd.h``.
ctypes calls release the GIL, so a blocking ioctl never stalls other
threads of the caller.

QEMU keeps these wrappers in util/userfaultfd.c, below migration/; here too
it is a bottom-layer module: the vCPUs (:mod:`engine.ram.faults`) open and
register descriptors, the postcopy handler and placer use them.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import platform
import struct
import threading
from dataclasses import dataclass

import numpy as np

from engine.errors import PostcopyError

__all__ = [
    "UFFD_API", "UFFDIO", "UFFD_EVENT_PAGEFAULT", "UFFD_PAGEFAULT_FLAG_WRITE",
    "UFFD_FEATURE_THREAD_ID", "UFFD_USER_MODE_ONLY", "UFFDIO_REGISTER_MODE_MISSING",
    "UFFDIO_COPY_MODE_DONTWAKE", "UFFDIO_ZEROPAGE_MODE_DONTWAKE",
    "UFFDIO_API", "UFFDIO_REGISTER", "UFFDIO_UNREGISTER", "UFFDIO_WAKE", "UFFDIO_COPY",
    "UFFDIO_ZEROPAGE", "USERFAULTFD_IOC_NEW", "UFFD_MSG_SIZE",
    "FaultEvent", "Userfaultfd", "probe", "buffer_address", "punch_hole",
]

# -- constants (linux/userfaultfd.h) ----------------------------------------------

#: API version the UFFDIO_API handshake asks for.
UFFD_API = 0xAA
#: ioctl "type" byte of every UFFDIO_* request.
UFFDIO = 0xAA

_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_API = 0x3F

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2

UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0

#: flag of userfaultfd(2) / USERFAULTFD_IOC_NEW: handle user-mode faults only
#: (what an unprivileged caller may get when vm.unprivileged_userfaultfd=0).
UFFD_USER_MODE_ONLY = 1

#: size of one ``struct uffd_msg`` as read() returns it, bytes.
UFFD_MSG_SIZE = 32

_SYS_USERFAULTFD = {"x86_64": 323, "amd64": 323, "aarch64": 282, "arm64": 282,
                    "i386": 374, "i686": 374, "ppc64le": 364, "s390x": 355,
                    "riscv64": 282}

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

# -- ioctl request numbers (asm-generic/ioctl.h) --------------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64),
                ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("copy", ctypes.c_int64)]


class _Zeropage(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, _UFFDIO_API, ctypes.sizeof(_Api))
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, _UFFDIO_REGISTER,
                       ctypes.sizeof(_Register))
UFFDIO_UNREGISTER = _ioc(_IOC_READ, UFFDIO, _UFFDIO_UNREGISTER, ctypes.sizeof(_Range))
UFFDIO_WAKE = _ioc(_IOC_READ, UFFDIO, _UFFDIO_WAKE, ctypes.sizeof(_Range))
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, _UFFDIO_COPY, ctypes.sizeof(_Copy))
UFFDIO_ZEROPAGE = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, _UFFDIO_ZEROPAGE,
                       ctypes.sizeof(_Zeropage))
USERFAULTFD_IOC_NEW = _ioc(_IOC_NONE, UFFDIO, 0x00, 0)

# event, reserved x3, then the pagefault arm of the union: flags, address, ptid
_MSG = struct.Struct("<BBHIQQI4x")
assert _MSG.size == UFFD_MSG_SIZE

# Consecutive EAGAINs without progress after which a fill gives up: the
# kernel returns EAGAIN while the target mm is being changed (fork, mremap),
# which passes quickly; an endless stream means something else is wrong.
_MAX_EAGAIN = 10000

# How many messages one read() may return; faults come one per blocked thread,
# so this is rarely the limit.
_READ_BATCH = 64

# -- libc -----------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_PAGE_SIZE = mmap.PAGESIZE


def _errtext(err: int) -> str:
    return f"{errno.errorcode.get(err, err)} ({os.strerror(err)})"


@dataclass(frozen=True)
class FaultEvent:
    """One page fault read from a userfaultfd.

    *address* is the faulting address in the registering process (rounded
    down to its page unless UFFD_FEATURE_EXACT_ADDRESS), *write* whether it
    was a write access, *tid* the faulting thread's id (0 unless the
    descriptor was created with UFFD_FEATURE_THREAD_ID).
    """

    address: int
    write: bool
    tid: int


class Userfaultfd:
    """A userfaultfd descriptor and the ioctls on it.

    :meth:`open` creates one for the calling process's address space;
    :meth:`from_fd` adopts one received from another process.  Addresses
    given to :meth:`register`, :meth:`copy`, :meth:`zeropage`,
    :meth:`wake` are in the creator's address space; *src* of :meth:`copy`
    is in the caller's.  Lengths are bytes, multiples of the system page
    size.  One object may be used from several threads.
    """

    def __init__(self, fd: int, features: int = 0):
        # Private: use open() or from_fd().
        self.fd = fd
        #: features granted by the UFFDIO_API handshake (0 when adopted).
        self.features = features
        # ctypes argument structs are reused across calls (setting fields is
        # cheaper than building a Structure); per thread, because the ioctl
        # runs without the GIL and another thread could rewrite them.
        self._tls = threading.local()

    # -- construction -------------------------------------------------------------

    @classmethod
    def open(cls) -> "Userfaultfd":
        """A new descriptor for this process, after the UFFDIO_API handshake.

        Tries ``userfaultfd(2)``, then the same with UFFD_USER_MODE_ONLY, then
        ``/dev/userfaultfd``.  Asks for UFFD_FEATURE_THREAD_ID and settles
        for no features if the kernel lacks it.  Raises
        :class:`PostcopyError` naming every reason when none works.
        """
        fd = _new_fd()
        try:
            features = _handshake(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, features)

    @classmethod
    def from_fd(cls, fd: int) -> "Userfaultfd":
        """Adopt *fd* (e.g. received with SCM_RIGHTS); its creator did the
        handshake.  The object owns *fd* from now on and closes it."""
        if fd < 0:
            raise PostcopyError(f"userfaultfd: invalid descriptor {fd}")
        # read_events() must never block; O_NONBLOCK only concerns read() and
        # poll(), faults still block the faulting thread.
        os.set_blocking(fd, False)
        return cls(fd)

    # -- ioctls -------------------------------------------------------------------

    def _structs(self):
        tls = self._tls
        try:
            return tls.structs
        except AttributeError:
            tls.structs = (_Range(), _Copy(), _Zeropage())
            return tls.structs

    def _check_open(self) -> int:
        fd = self.fd
        if fd < 0:
            raise PostcopyError("userfaultfd is closed")
        return fd

    def register(self, addr: int, length: int) -> None:
        """Register [addr, addr+length) in MISSING mode.

        The range must be page aligned and lie within shared-memory (or
        anonymous) mappings of the creator; otherwise :class:`PostcopyError`.
        """
        fd = self._check_open()
        reg = _Register()
        reg.range.start, reg.range.len = addr, length
        reg.mode = UFFDIO_REGISTER_MODE_MISSING
        if _ioctl(fd, UFFDIO_REGISTER, ctypes.addressof(reg)) != 0:
            err = ctypes.get_errno()
            raise PostcopyError(
                f"UFFDIO_REGISTER of {length} bytes at {addr:#x} failed: {_errtext(err)}"
                + (" (not page aligned, or not a shared-memory/anonymous mapping)"
                   if err == errno.EINVAL else "")
                + (" (no mapping there)" if err == errno.ENOMEM else ""))
        if not reg.ioctls & (1 << _UFFDIO_COPY):
            self.unregister(addr, length)
            raise PostcopyError(
                f"UFFDIO_REGISTER at {addr:#x}: the kernel offers no UFFDIO_COPY on "
                f"this mapping (ioctls {reg.ioctls:#x})")

    def unregister(self, addr: int, length: int) -> None:
        """Unregister [addr, addr+length); blocked faulters there are woken
        (they then see whatever the page holds, a hole reading as zeros)."""
        fd = self._check_open()
        rng = _Range(addr, length)
        if _ioctl(fd, UFFDIO_UNREGISTER, ctypes.addressof(rng)) != 0:
            err = ctypes.get_errno()
            raise PostcopyError(
                f"UFFDIO_UNREGISTER of {length} bytes at {addr:#x} failed: {_errtext(err)}")

    def copy(self, dst: int, src: int, length: int, wake: bool = True) -> bool:
        """Atomically fill missing pages at *dst* with *length* bytes from *src*.

        Returns True if every page was placed by this call, False if (some
        of) them already existed - those are left as they are and, with
        *wake*, their waiters woken.  Without *wake* (DONTWAKE) the caller
        batches a :meth:`wake` later.  Raises :class:`PostcopyError` when the
        creator's address space is gone (its process exited) or on any other
        failure.
        """
        _, cp, _ = self._structs()
        mode = 0 if wake else UFFDIO_COPY_MODE_DONTWAKE

        def arm(done: int) -> None:
            cp.dst, cp.src, cp.len = dst + done, src + done, length - done
            cp.mode, cp.copy = mode, 0
        return self._fill("UFFDIO_COPY", UFFDIO_COPY, cp, "copy", arm, dst, length, wake)

    def zeropage(self, dst: int, length: int, wake: bool = True) -> bool:
        """Atomically fill missing pages at *dst* with zeros (UFFDIO_ZEROPAGE).

        Same results and errors as :meth:`copy`.
        """
        _, _, zp = self._structs()
        mode = 0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE

        def arm(done: int) -> None:
            zp.range.start, zp.range.len = dst + done, length - done
            zp.mode, zp.zeropage = mode, 0
        return self._fill("UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE, zp, "zeropage", arm,
                          dst, length, wake)

    def _fill(self, name: str, request: int, st, result: str, arm, dst: int, length: int,
              wake: bool) -> bool:
        """The loop COPY and ZEROPAGE share: ``arm(done)`` aims ``st`` at what
        is left; the kernel reports progress in ``st.<result>``.  A page that
        exists is skipped (and its waiters woken with *wake*); EAGAIN (the
        mapping was changing: fork, mremap) is retried, a bounded number of
        times without progress."""
        fd = self._check_open()
        done, all_new, again = 0, True, 0
        while done < length:
            arm(done)
            if _ioctl(fd, request, ctypes.addressof(st)) == 0:
                return all_new
            err = ctypes.get_errno()
            progress = getattr(st, result)
            if progress > 0:    # partial progress, then an error for the rest
                done += progress
                again = 0
                continue
            if err == errno.EAGAIN and again < _MAX_EAGAIN:
                again += 1
                continue
            if err == errno.EEXIST:
                all_new = False
                if wake:
                    self.wake(dst + done, _PAGE_SIZE)
                done += _PAGE_SIZE
                continue
            raise _fill_error(name, dst + done, length - done, err)
        return all_new

    def wake(self, addr: int, length: int) -> None:
        """Wake threads blocked on faults in [addr, addr+length) (UFFDIO_WAKE);
        they retry the access, which faults again if the page is still missing."""
        fd = self._check_open()
        rng, _, _ = self._structs()
        rng.start, rng.len = addr, length
        if _ioctl(fd, UFFDIO_WAKE, ctypes.addressof(rng)) != 0:
            err = ctypes.get_errno()
            raise PostcopyError(
                f"UFFDIO_WAKE of {length} bytes at {addr:#x} failed: {_errtext(err)}")

    def read_events(self) -> list[FaultEvent]:
        """The pending fault messages; ``[]`` when there are none (never blocks).

        Messages other than page faults (none are requested) are skipped.
        """
        fd = self._check_open()
        try:
            data = os.read(fd, UFFD_MSG_SIZE * _READ_BATCH)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise PostcopyError(f"reading userfaultfd {fd} failed: {exc}") from exc
        events = []
        for event, _r1, _r2, _r3, flags, address, ptid in _MSG.iter_unpack(data):
            if event == UFFD_EVENT_PAGEFAULT:
                events.append(FaultEvent(address, bool(flags & UFFD_PAGEFAULT_FLAG_WRITE),
                                         ptid))
        return events

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Close the descriptor (idempotent).  When the last descriptor of a
        userfaultfd closes, its registrations go and blocked faulters wake."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "Userfaultfd":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Userfaultfd fd={self.fd} features={self.features:#x}>"


def _fill_error(what: str, dst: int, length: int, err: int) -> PostcopyError:
    if err in (errno.ESRCH, errno.ENOENT):
        return PostcopyError(
            f"{what} of {length} bytes at {dst:#x}: the registering process's "
            f"address space is gone (vCPU exited or unmapped its RAM): {_errtext(err)}")
    return PostcopyError(f"{what} of {length} bytes at {dst:#x} failed: {_errtext(err)}")


def _new_fd() -> int:
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    reasons = []
    nr = _SYS_USERFAULTFD.get(platform.machine().lower())
    if nr is None:
        reasons.append(f"userfaultfd(2): no syscall number known for {platform.machine()}")
    else:
        for extra, label in ((0, "userfaultfd(2)"),
                             (UFFD_USER_MODE_ONLY, "userfaultfd(2, UFFD_USER_MODE_ONLY)")):
            fd = _syscall(ctypes.c_long(nr), ctypes.c_long(flags | extra))
            if fd >= 0:
                return fd
            err = ctypes.get_errno()
            hint = (" (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE)"
                    if err == errno.EPERM else "")
            reasons.append(f"{label}: {_errtext(err)}{hint}")
            if err == errno.ENOSYS:
                break
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        reasons.append(f"/dev/userfaultfd: {exc.strerror}")
    else:
        try:
            fd = _ioctl(dev, USERFAULTFD_IOC_NEW, flags)
            err = ctypes.get_errno()
        finally:
            os.close(dev)
        if fd >= 0:
            return fd
        reasons.append(f"/dev/userfaultfd USERFAULTFD_IOC_NEW: {_errtext(err)}")
    raise PostcopyError("userfaultfd unavailable: " + "; ".join(reasons))


def _handshake(fd: int) -> int:
    """UFFDIO_API on a new descriptor; returns the features granted."""
    api = _Api()
    for wanted in (UFFD_FEATURE_THREAD_ID, 0):
        api.api, api.features, api.ioctls = UFFD_API, wanted, 0
        if _ioctl(fd, UFFDIO_API, ctypes.addressof(api)) == 0:
            # The kernel reports everything it supports; we got what we asked.
            return wanted
        err = ctypes.get_errno()
        # A failed handshake leaves the descriptor uninitialised, so the
        # feature-less retry is allowed on the same descriptor.
        if err != errno.EINVAL:
            break
    raise PostcopyError(f"userfaultfd UFFDIO_API handshake failed: {_errtext(err)}")


@functools.cache
def probe() -> tuple[bool, str]:
    """Whether this process can use userfaultfd MISSING mode on shared memory.

    Opens a descriptor, registers a small memfd (tmpfs) mapping and
    unregisters it.  Returns ``(True, "userfaultfd")`` or ``(False,
    reason)``.  Cached: the answer is a fact about the host and the
    process's privileges.
    """
    try:
        uffd = Userfaultfd.open()
    except PostcopyError as exc:
        return False, str(exc)
    try:
        memfd = os.memfd_create("engine-uffd-probe", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, _PAGE_SIZE)
            m = mmap.mmap(memfd, _PAGE_SIZE, mmap.MAP_SHARED,
                          mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(memfd)
        try:
            addr = buffer_address(m)
            uffd.register(addr, _PAGE_SIZE)
            uffd.unregister(addr, _PAGE_SIZE)
        finally:
            m.close()
    except (PostcopyError, OSError) as exc:
        return False, f"userfaultfd cannot register shared memory: {exc}"
    finally:
        uffd.close()
    return True, "userfaultfd"


def buffer_address(buf) -> int:
    """Start address of *buf*: a numpy array, ``mmap.mmap``, ``memoryview``,
    ``bytearray`` or anything else exporting the buffer protocol.

    No export is left behind (an ``mmap`` stays closable); the address is
    valid as long as *buf*'s memory is mapped.
    """
    if isinstance(buf, np.ndarray):
        return buf.ctypes.data
    if isinstance(buf, memoryview) and buf.nbytes == 0:
        raise PostcopyError("buffer_address: empty buffer")
    # frombuffer's export lives exactly as long as the temporary array.
    arr = np.frombuffer(buf, dtype=np.uint8)
    try:
        if arr.size == 0:
            raise PostcopyError("buffer_address: empty buffer")
        return arr.ctypes.data
    finally:
        del arr


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free [offset, offset+length) of the file behind *fd* (bytes; the file
    size is kept).  The range reads as zeros afterwards and, on a
    userfaultfd-registered mapping, faults again (missing) on next access.
    Raises :class:`PostcopyError`."""
    if length <= 0:
        return
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise PostcopyError(
            f"punching a hole of {length} bytes at offset {offset} of fd {fd} "
            f"failed: {_errtext(err)}")
