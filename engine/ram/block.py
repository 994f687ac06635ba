"""RAM blocks: one contiguous range of guest memory, as QEMU's ``RAMBlock``.

A block is backed either by a named POSIX shared-memory segment (created by
the engine) or by a file mapped ``MAP_SHARED`` (QEMU's
``memory-backend-file,share=on``: the file *is* the guest memory, its contents
are kept and it is never deleted).  Any process can map the same block from
its picklable :class:`RamBlockHandle`; only the creator owns the segment.

Numpy views (:attr:`RamBlock.array`, :attr:`RamBlock.pages`) point straight
into the mapping.  The mapping cannot be closed while any view is alive (the
``BufferError`` pitfall), so :meth:`RamBlock.close` drops the block's own views
first, and leaves the mapping to views held elsewhere until they are gone.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from engine.errors import ConfigError, GuestError
from engine.ram.shm import (attach_segment, close_segment, create_segment,
                            removed_on_error, reserve, unlink_segment)

__all__ = ["RamBlockHandle", "RamBlock", "DEFAULT_PAGE_SIZE", "MAX_IDSTR_LEN"]

#: QEMU's TARGET_PAGE_SIZE on x86: the unit of dirty tracking and transfer.
DEFAULT_PAGE_SIZE = 4096

#: The stream encodes a block's idstr with a one-byte length.
MAX_IDSTR_LEN = 255

#: madvise(2): fault every page of a range in for writing (Linux 5.14)
_MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@dataclass(frozen=True)
class RamBlockHandle:
    """What another process needs to map a block (picklable).

    Exactly one of *shm_name* (a POSIX segment name, without the leading
    slash) and *mem_path* (a file path) is set.  *used_length* and *page_size*
    are in bytes.
    """

    idstr: str
    used_length: int
    page_size: int
    shm_name: str | None
    mem_path: str | None

    def __post_init__(self) -> None:
        if (self.shm_name is None) == (self.mem_path is None):
            raise ConfigError(
                f"RAM block {self.idstr!r}: exactly one of shm_name and mem_path "
                f"must be set")
        _check_geometry(self.idstr, self.used_length, self.page_size)

    @property
    def npages(self) -> int:
        return self.used_length // self.page_size


def _check_geometry(idstr: str, size: int, page_size: int) -> None:
    if not isinstance(idstr, str) or not idstr:
        raise ConfigError(f"RAM block idstr must be a non-empty string, not {idstr!r}")
    if len(idstr.encode()) > MAX_IDSTR_LEN:
        raise ConfigError(f"RAM block idstr {idstr!r} is longer than {MAX_IDSTR_LEN} bytes")
    if page_size < 8 or page_size & (page_size - 1):
        raise ConfigError(f"RAM block {idstr!r}: page size {page_size} is not a power of two >= 8")
    if size <= 0 or size % page_size:
        raise ConfigError(
            f"RAM block {idstr!r}: size {size} is not a positive multiple of the "
            f"page size {page_size}")


class RamBlock:
    """A mapped RAM block.

    Build one with :meth:`create` (new memory, this process owns it),
    :meth:`attach` (map a block another process created, from its handle) or
    :meth:`from_segment` (map a segment made by a program outside the
    engine).  Attributes: ``idstr``, ``used_length`` and ``page_size`` (bytes),
    ``npages``, ``handle``, ``owner`` and the views ``buf``, ``array`` and
    ``pages``.  Used as a context manager it closes on exit and, if it owns a
    shared-memory segment, unlinks it.
    """

    def __init__(self, handle: RamBlockHandle, *, owner: bool,
                 shm: SharedMemory | None = None, mapping: mmap.mmap | None = None,
                 fd: int = -1, fresh: bool = False):
        # Private: use create(), attach() or from_segment().
        self.handle = handle
        #: True while the block is known to be all zero because this process
        #: just created it; lets a destination skip zero pages entirely.
        self.fresh = fresh
        #: True once :meth:`populate` mapped every page in this process
        self.populated = False
        self.idstr = handle.idstr
        self.used_length = handle.used_length
        self.page_size = handle.page_size
        self.npages = handle.npages
        self.owner = owner
        self._shm = shm
        self._mapping = mapping
        self._fd = fd
        self._closed = False
        if shm is not None:
            assert shm.buf is not None      # an open segment (None only once closed)
            self._buf = shm.buf[:self.used_length]
        else:
            assert mapping is not None      # create() and attach() pass one of the two
            self._buf = memoryview(mapping)[:self.used_length]
        self._array: np.ndarray | None = np.frombuffer(self._buf, dtype=np.uint8)
        self._pages: np.ndarray | None = self._array.reshape(self.npages, self.page_size)

    # -- construction ---------------------------------------------------------

    @classmethod
    def create(cls, idstr: str, size: int, *, mem_path: str | None = None,
               page_size: int = DEFAULT_PAGE_SIZE) -> "RamBlock":
        """Create a block of *size* bytes (a multiple of *page_size*).

        Without *mem_path* the memory is a new, zero-filled ``engine-`` shared
        memory segment owned by the returned block.  With *mem_path* the file
        is opened (created if missing), grown to *size* if it is smaller
        (never shrunk; a larger file contributes its first *size* bytes), and
        its contents become the block's contents.  All pages are reserved up
        front so that a full filesystem is a :class:`GuestError` now rather
        than a ``SIGBUS`` later.
        """
        _check_geometry(idstr, size, page_size)
        if mem_path is None:
            shm = create_segment(size)
            handle = RamBlockHandle(idstr, size, page_size, shm.name, None)
            with removed_on_error(shm):
                return cls(handle, owner=True, shm=shm, fresh=True)
        mem_path = os.path.abspath(mem_path)
        handle = RamBlockHandle(idstr, size, page_size, None, mem_path)
        created = False
        try:
            try:
                fd = os.open(mem_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
            except FileExistsError:
                fd = os.open(mem_path, os.O_RDWR)
        except OSError as exc:
            raise GuestError(f"RAM block {idstr!r}: cannot open {mem_path}: {exc}") from exc
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            reserve(fd, size, f"RAM block {idstr!r} ({mem_path})",
                    os.path.dirname(mem_path))
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException as exc:
            os.close(fd)
            if created:         # ours and still empty: do not leave it behind
                os.unlink(mem_path)
            if isinstance(exc, OSError):
                raise GuestError(
                    f"RAM block {idstr!r}: cannot map {mem_path}: {exc}") from exc
            raise
        return cls(handle, owner=True, mapping=mapping, fd=fd, fresh=created)

    @classmethod
    def attach(cls, handle: RamBlockHandle) -> "RamBlock":
        """Map the block described by *handle*; the result is not the owner."""
        if handle.shm_name is not None:
            shm = attach_segment(handle.shm_name)
            if shm.size < handle.used_length:
                size = shm.size
                shm.close()
                raise GuestError(
                    f"RAM block {handle.idstr!r}: segment {handle.shm_name!r} has "
                    f"{size} bytes, the block needs {handle.used_length}")
            return cls(handle, owner=False, shm=shm)
        assert handle.mem_path is not None      # the handle has exactly one of the two
        try:
            fd = os.open(handle.mem_path, os.O_RDWR)
        except OSError as exc:
            raise GuestError(
                f"RAM block {handle.idstr!r}: cannot open {handle.mem_path}: {exc}") from exc
        try:
            size = os.fstat(fd).st_size
            if size < handle.used_length:
                raise GuestError(
                    f"RAM block {handle.idstr!r}: {handle.mem_path} has {size} "
                    f"bytes, the block needs {handle.used_length}")
            mapping = mmap.mmap(fd, handle.used_length, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise GuestError(
                f"RAM block {handle.idstr!r}: cannot map {handle.mem_path}: {exc}") from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(handle, owner=False, mapping=mapping, fd=fd)

    @classmethod
    def from_segment(cls, idstr: str, shm_name: str, size: int, *,
                     page_size: int = DEFAULT_PAGE_SIZE) -> "RamBlock":
        """Use the first *size* bytes of an existing segment as a block.

        For programs that made their own ``SharedMemory``: the block attaches
        without taking ownership (closing it never unlinks the segment).
        """
        return cls.attach(RamBlockHandle(idstr, size, page_size, shm_name, None))

    # -- views ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed or self._array is None:
            raise GuestError(f"RAM block {self.idstr!r} is closed")

    @property
    def buf(self) -> memoryview:
        """Writable memoryview of exactly ``used_length`` bytes."""
        self._check_open()
        return self._buf

    @property
    def array(self) -> np.ndarray:
        """The block as a flat ``uint8`` array of ``used_length`` elements."""
        self._check_open()
        # _check_open() raised if it is None; no second test on this hot path
        return self._array     # type: ignore[return-value]

    @property
    def pages(self) -> np.ndarray:
        """The block as a ``(npages, page_size)`` ``uint8`` array."""
        self._check_open()
        # _check_open() raised if it is None; no second test on this hot path
        return self._pages     # type: ignore[return-value]

    @property
    def fd(self) -> int:
        """The file descriptor behind the mapping (for ``os.sendfile``)."""
        self._check_open()
        # CPython's SharedMemory keeps its descriptor in _fd (no public accessor)
        return self._shm._fd if self._shm is not None else self._fd  # type: ignore[attr-defined]

    @property
    def closed(self) -> bool:
        return self._closed

    def populate(self) -> None:
        """Fault every page of the block in for writing, in this process's mapping.

        QEMU's ``prealloc=on``: memory that does not exist yet is allocated
        now (and the first-touch cost the host charges for it is paid now),
        and the page tables of this process map every page, so that the
        migration writes to memory that is there.  Contents are kept.  One
        ``madvise(MADV_POPULATE_WRITE)``; kernels before 5.14 get a write to
        every page instead (nothing else may write the block meanwhile).
        """
        self._check_open()
        assert self._array is not None and self._pages is not None     # open
        addr = self._array.ctypes.data
        if _libc.madvise(addr, self.used_length, _MADV_POPULATE_WRITE) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise GuestError(f"RAM block {self.idstr!r}: populating {self.used_length} "
                                 f"bytes failed: {os.strerror(err)}")
            self._pages[:, 0] |= 0      # a write to each page faults it in
        self.populated = True

    # -- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        """Release the block in this process (idempotent).

        The block's own views are dropped first and the memory is unmapped.
        If arrays or memoryviews derived from it are still alive elsewhere,
        the mapping stays valid for them and is unmapped when the last one
        goes (closing it under them would leave dangling pointers); the block
        itself is closed either way.
        """
        if self._closed:
            return
        self._closed = True
        self._array = self._pages = None
        self._buf.release()
        if self._shm is not None:
            close_segment(self._shm)
        else:
            assert self._mapping is not None    # the block was made with one
            try:
                self._mapping.close()
            except BufferError:
                pass    # the remaining views keep the mmap alive; it goes with them
            self._mapping = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        """Destroy the block's shared-memory segment (owner only, idempotent).

        A file-backed block's file is guest memory that outlives the engine,
        as with QEMU: it is never deleted and this is a no-op.
        """
        if self.handle.mem_path is not None:
            return
        if not self.owner:
            raise GuestError(
                f"RAM block {self.idstr!r}: only the owner may unlink segment "
                f"{self.handle.shm_name!r}")
        assert self._shm is not None    # shm_name set: the block was made with its segment
        unlink_segment(self._shm)

    def __enter__(self) -> "RamBlock":
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.close()
        finally:
            if self.owner and self.handle.shm_name is not None:
                self.unlink()

    def __repr__(self) -> str:
        backing = (f"shm={self.handle.shm_name!r}" if self.handle.shm_name
                   else f"mem_path={self.handle.mem_path!r}")
        state = " closed" if self._closed else ""
        return (f"<RamBlock {self.idstr!r} {self.used_length} bytes "
                f"page_size={self.page_size} {backing} owner={self.owner}{state}>")
