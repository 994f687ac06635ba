"""Guest memory as the migration drivers use it (typing Protocols).

The drivers never need the concrete classes, only what is listed here, and
more than one class fills each part:

* :class:`PageBlock`: a block's pages as :class:`~engine.migration.ramload.
  RamLoader` lands them -- :class:`~engine.ram.block.RamBlock` and the
  ``engine load`` image's ``ImageBlock``;
* :class:`MappedBlock`: a :class:`PageBlock` that other processes can map
  (multifd workers, the postcopy fault handler) -- ``RamBlock``;
* :class:`SourceGuest`, :class:`DestinationGuest`: what a SourceMigration
  and a DestinationMigration (with postcopy) need of their guest --
  :class:`~engine.ram.guest.Guest`, the library's gated guest over a
  program's own memory, the QMP machine's guest whose start/stop move the
  run state.

Annotations only: the drivers import this module for mypy, which checks
every object passed to them against these lists.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import numpy as np

    from engine.ram.abcheck import ABResult
    from engine.ram.block import RamBlockHandle
    from engine.ram.dirty import DirtyLog

__all__ = ["PageBlock", "MappedBlock", "SourceGuest", "DestinationGuest"]


class PageBlock(Protocol):
    """A RAM block's pages, as a loader writes them."""

    @property
    def idstr(self) -> str: ...

    @property
    def npages(self) -> int: ...

    @property
    def pages(self) -> np.ndarray:
        """``(npages, page_size)`` ``uint8``, straight over the memory."""
        ...

    @property
    def fresh(self) -> bool:
        """All zero where nothing was written yet (just created here)."""
        ...


class MappedBlock(PageBlock, Protocol):
    """A RAM block in shared memory or a shared file mapping (QEMU's RAMBlock)."""

    @property
    def used_length(self) -> int: ...

    @property
    def page_size(self) -> int: ...

    @property
    def handle(self) -> RamBlockHandle:
        """What another process needs to map the same memory."""
        ...

    @property
    def fd(self) -> int:
        """The descriptor behind the mapping (holes, sendfile)."""
        ...

    @property
    def buf(self) -> memoryview: ...

    @property
    def populated(self) -> bool: ...

    def populate(self) -> None: ...

    def close(self) -> None: ...


class SourceGuest(Protocol):
    """What a source migration needs of its guest: the memory, the dirty
    logs it harvests, and stopping the vCPUs for the switchover (and
    restarting them if the migration fails)."""

    @property
    def blocks(self) -> Sequence[MappedBlock]: ...

    @property
    def running(self) -> bool: ...

    def dirty_log(self, idstr: str) -> DirtyLog: ...

    def stop(self, timeout: float = ...) -> None: ...

    def start(self) -> None: ...


class DestinationGuest(Protocol):
    """What a destination migration needs of its guest: the memory, starting
    and stopping the vCPUs, the ab check, and for postcopy the vCPUs'
    registration with the fault handler."""

    @property
    def blocks(self) -> Sequence[MappedBlock]: ...

    @property
    def running(self) -> bool: ...

    @property
    def nvcpus(self) -> int: ...

    def stop(self, timeout: float = ...) -> None: ...

    def start(self) -> None: ...

    def check_ab(self, slices: int | None = ...) -> ABResult: ...

    def attach_faults(self, path: str, mode: str, timeout: float = ...) -> None: ...

    def detach_faults(self, timeout: float = ...) -> None: ...
