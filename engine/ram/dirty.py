"""The dirty log: which pages of a RAM block were written since the last sync.

QEMU keeps a dirty bitmap per block, filled by KVM or TCG and harvested by
``migration_bitmap_sync``.  Here the writers are guest vCPU processes, so the
log is one byte per page in a shared segment: a byte store is atomic and
needs no read-modify-write, so concurrent writers cannot lose each other's
marks, and numpy harvests it in one vectorised pass.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from engine.errors import ConfigError, GuestError
from engine.ram.shm import (attach_segment, close_segment, create_segment, removed_on_error,
                            unlink_segment)

__all__ = ["DirtyLogHandle", "DirtyLog"]


@dataclass(frozen=True)
class DirtyLogHandle:
    """What another process needs to attach a log (picklable)."""

    shm_name: str
    npages: int


class DirtyLog:
    """One byte per page, non-zero when the page is dirty.

    The protocol that makes a sync lose no write:

    * a **writer** stores into the page first and marks it afterwards
      (:meth:`mark`, :meth:`mark_pages`);
    * the **harvester** (:meth:`harvest`) clears an entry before anyone reads
      the page it names.

    Take any write W to page p.  If the harvester clears p's mark *after* W's
    mark, then W's store came before the clear, and the caller reads p after
    the clear, so the copy it makes contains W.  If W's mark lands after the
    clear, the entry stays set and the next harvest returns p again.  Either
    way the destination eventually sees W; a page may be sent once more than
    needed, never once too few.  Reading first and clearing afterwards would
    lose exactly the writes that land between the read and the clear.

    The order of a store and a later load from the *same* process is the one
    thing x86 may reorder; :meth:`harvest` issues a full barrier (a locked
    instruction, via an uncontended lock) between clearing and returning so
    the caller's page reads cannot overtake the clear.  Stores stay in program
    order on x86 (TSO), which is all the writer side needs.
    """

    def __init__(self, shm, npages: int, *, owner: bool):
        # Private: use create() or attach().
        self._shm = shm
        self.npages = npages
        self.owner = owner
        self._log: np.ndarray | None = np.frombuffer(shm.buf, dtype=np.uint8, count=npages)
        self._barrier = threading.Lock()
        self._closed = False

    @classmethod
    def create(cls, npages: int) -> "DirtyLog":
        """A new, all-clean log for *npages* pages in an ``engine-`` segment."""
        if npages < 0:
            raise ConfigError(f"dirty log page count must be >= 0, not {npages}")
        # A zero-page block still gets a (one-byte) segment: shm cannot be empty.
        with removed_on_error(create_segment(max(npages, 1))) as shm:
            return cls(shm, npages, owner=True)

    @classmethod
    def attach(cls, handle: DirtyLogHandle) -> "DirtyLog":
        """Attach the log described by *handle* (not the owner)."""
        shm = attach_segment(handle.shm_name)
        if shm.size < handle.npages:
            shm.close()
            raise GuestError(f"dirty log {handle.shm_name!r} is smaller than "
                             f"{handle.npages} pages")
        return cls(shm, handle.npages, owner=False)

    @property
    def handle(self) -> DirtyLogHandle:
        return DirtyLogHandle(self._shm.name, self.npages)

    @property
    def log(self) -> np.ndarray:
        """The raw ``uint8`` log, one entry per page (for inspection)."""
        if self._log is None:
            raise GuestError("dirty log is closed")
        return self._log

    # -- writer side ------------------------------------------------------------

    def mark(self, first_page: int, count: int = 1) -> None:
        """Mark pages ``[first_page, first_page + count)`` dirty.

        Call it *after* the stores into those pages.
        """
        self.log[first_page:first_page + count] = 1

    def mark_pages(self, indexes: np.ndarray) -> None:
        """Mark the pages listed in *indexes* dirty (after storing into them)."""
        self.log[indexes] = 1

    def mark_all(self) -> None:
        """Mark every page dirty (the start of a migration's first pass)."""
        self.log[:] = 1

    # -- harvester side -----------------------------------------------------------

    def harvest(self) -> np.ndarray:
        """Return the sorted ``int64`` indexes of dirty pages and clear them.

        Every returned entry has been cleared, and a barrier issued, before
        this returns, so the caller may now read those pages (see the class
        docstring).  Entries marked during the call that were not returned
        stay set for the next harvest.
        """
        log = self.log
        # Scan a snapshot: numpy's nonzero counts, then fills, and raises if
        # writers change the live log in between.
        dirty = np.flatnonzero(log.copy())
        log[dirty] = 0
        with self._barrier:
            pass
        return dirty.astype(np.int64, copy=False)

    def count(self) -> int:
        """Number of dirty pages right now (approximate while writers run)."""
        return int(np.count_nonzero(self.log))

    # -- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        """Unmap the log in this process (idempotent)."""
        if self._closed:
            return
        self._log = None
        close_segment(self._shm)     # views held elsewhere keep it mapped
        self._closed = True

    def unlink(self) -> None:
        """Destroy the log's segment (owner only, idempotent)."""
        if not self.owner:
            raise GuestError(f"dirty log {self._shm.name!r}: only the owner may unlink it")
        unlink_segment(self._shm)

    def __enter__(self) -> "DirtyLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.close()
        finally:
            if self.owner:
                self.unlink()

    def __repr__(self) -> str:
        return f"<DirtyLog {self._shm.name!r} npages={self.npages} owner={self.owner}>"
