"""POSIX shared-memory segments for guest RAM, dirty logs and vCPU control.

Thin helpers around :class:`multiprocessing.shared_memory.SharedMemory` that
fix its two traps on Python 3.11:

* **Resource tracker (gh-82300).**  Every ``SharedMemory`` constructor, even an
  attach with ``create=False``, registers the name with the resource tracker,
  which unlinks the segment when *that* process exits: a vCPU or worker that
  merely attached would destroy the owner's RAM.  Registering and then
  unregistering is no cure on 3.11, because the tracker's cache is shared by
  the whole process tree and the attacher's unregister would delete the
  owner's entry.  :func:`attach_segment` therefore suppresses the registration
  itself.  The creator (:func:`create_segment`) keeps its registration on
  purpose: if the owner dies without unlinking, the tracker still removes the
  segment.
* **/dev/shm exhaustion.**  ``ftruncate`` on tmpfs succeeds sparsely and the
  first store into a page beyond the filesystem's capacity kills the process
  with ``SIGBUS``.  :func:`create_segment` checks the free space and reserves
  every page with ``posix_fallocate`` so that a full ``/dev/shm`` becomes a
  :class:`~engine.errors.GuestError` at creation time.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
from collections.abc import Iterator
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import _posixshmem

from engine.errors import ConfigError, GuestError

# mypy: disable-error-code="attr-defined"
# (this module is where the engine reaches into CPython's SharedMemory: its
# _fd, _name and _mmap, which typeshed leaves out)

__all__ = [
    "SHM_DIR",
    "SEGMENT_PREFIX",
    "create_segment",
    "removed_on_error",
    "attach_segment",
    "unlink_segment",
    "close_segment",
    "reserve",
]

#: Where glibc's ``shm_open`` keeps POSIX segments on Linux.
SHM_DIR = "/dev/shm"

#: Every segment the engine creates is named ``engine-<hex>``.
SEGMENT_PREFIX = "engine-"

# The tracker hook is process-wide, so swapping it must not interleave between
# threads (an attach in one thread would otherwise silence a create in another).
_TRACKER_HOOK_LOCK = threading.Lock()

# Attribute set on SharedMemory objects to remember whether this process holds
# a tracker registration for the name (decides how unlink_segment unlinks).
_TRACKED_ATTR = "_engine_tracked"
_UNLINKED_ATTR = "_engine_unlinked"

# posix_fallocate errors that mean "this filesystem cannot preallocate" rather
# than "no space": the mapping then stays sparse, as QEMU's does without
# prealloc=on.
_FALLOCATE_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def reserve(fd: int, size: int, what: str, directory: str = SHM_DIR) -> None:
    """Allocate the first *size* bytes of the file behind *fd*.

    Existing contents are kept (``posix_fallocate`` only fills holes).  Raises
    :class:`GuestError` if the filesystem holding *directory* has no room, so
    that running out of space is an exception here and not a ``SIGBUS`` on a
    later store.  Filesystems that cannot preallocate are left sparse.
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in _FALLOCATE_UNSUPPORTED:
            return
        if exc.errno == errno.ENOSPC:
            raise GuestError(
                f"{what}: cannot reserve {size} bytes in {directory} "
                f"({_free_bytes(directory)} bytes free); enlarge it (for "
                f"docker: --shm-size) or use a file-backed block on a larger "
                f"filesystem (mem_path)") from exc
        raise GuestError(f"{what}: posix_fallocate failed: {exc}") from exc


def _segment_name(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(8)}"


def create_segment(size: int, prefix: str = SEGMENT_PREFIX) -> SharedMemory:
    """Create a new named POSIX shared-memory segment of *size* bytes.

    The name is ``<prefix><16 hex digits>``.  The creating process stays
    registered with the resource tracker, so a crashed owner's segment is
    still unlinked when the tracker notices.  All pages are reserved up front
    (see the module docstring); a segment that does not fit raises
    :class:`GuestError` and leaves nothing behind.  Release it with
    ``shm.close()`` and :func:`unlink_segment`.
    """
    if size <= 0:
        raise ConfigError(f"shared memory segment size must be positive, not {size}")
    free = _free_bytes(SHM_DIR)
    if size > free:
        raise GuestError(
            f"{SHM_DIR} has {free} bytes free, a {size}-byte segment does not "
            f"fit; enlarge it (for docker: --shm-size) or use a file-backed "
            f"block (mem_path)")
    with _TRACKER_HOOK_LOCK:
        while True:
            try:
                shm = SharedMemory(name=_segment_name(prefix), create=True, size=size)
            except FileExistsError:
                continue
            break
    setattr(shm, _TRACKED_ATTR, True)
    with removed_on_error(shm):
        reserve(shm._fd, size, f"shared memory segment {shm.name!r}")
    return shm


@contextlib.contextmanager
def removed_on_error(shm: SharedMemory) -> Iterator[SharedMemory]:
    """For a segment just created: closed and unlinked again if the block
    raises, so that an owner that fails to take it on leaves nothing behind."""
    try:
        yield shm
    except BaseException:
        shm.close()
        unlink_segment(shm)
        raise


def _no_register(name: object, rtype: str) -> None:
    """Stand-in for resource_tracker.register while attaching."""


def attach_segment(name: str) -> SharedMemory:
    """Map the existing segment *name* without registering it for cleanup.

    The attaching process never owns the segment: exiting (or crashing) does
    not unlink it and produces no tracker warning.  Raises :class:`GuestError`
    if the segment does not exist.
    """
    with _TRACKER_HOOK_LOCK:
        saved = resource_tracker.register
        resource_tracker.register = _no_register
        try:
            shm = SharedMemory(name=name, create=False)
        except FileNotFoundError as exc:
            raise GuestError(f"shared memory segment {name!r} does not exist") from exc
        finally:
            resource_tracker.register = saved
    setattr(shm, _TRACKED_ATTR, False)
    return shm


def unlink_segment(shm: SharedMemory) -> None:
    """Remove *shm*'s name from the system (idempotent).

    A segment this process created is also unregistered from the resource
    tracker; an attached one is unlinked without touching the tracker, whose
    entry belongs to the creator.  A name that is already gone is ignored.
    The mapping itself stays usable until ``shm.close()``.
    """
    if getattr(shm, _UNLINKED_ATTR, False):
        return
    tracked = getattr(shm, _TRACKED_ATTR, True)
    try:
        _posixshmem.shm_unlink(shm._name)
    except FileNotFoundError:
        pass
    if tracked:
        resource_tracker.unregister(shm._name, "shared_memory")
    # Marked only now: an interrupt before this point leaves the segment to a
    # retry, which must still unlink it and drop the tracker's entry.
    setattr(shm, _UNLINKED_ATTR, True)


def close_segment(shm: SharedMemory) -> bool:
    """Close *shm* in this process, even while views of it are alive.

    ``SharedMemory.close`` raises ``BufferError`` when numpy arrays or
    memoryviews still point into the mapping.  Then the mapping is left to
    those views: it stays valid (no dangling pointer) and is unmapped when the
    last of them is gone; the descriptor is closed now.  Returns whether the
    mapping was unmapped immediately.
    """
    try:
        shm.close()
        return True
    except BufferError:
        # close() released the buffer and stopped at the mmap; the views keep
        # the mmap object alive, so forgetting it here frees it with them (and
        # spares SharedMemory.__del__ from failing again later).
        shm._mmap = None
        if shm._fd >= 0:
            os.close(shm._fd)
            shm._fd = -1
        return False
