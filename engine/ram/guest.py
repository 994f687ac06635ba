"""A guest: RAM blocks, their dirty logs, and vCPU processes writing them.

This is the memory side of a QEMU instance for the migration code: the
source's coordinator harvests dirty pages with :meth:`Guest.sync_dirty`, stops
the vCPUs for the final iteration with :meth:`Guest.stop`, and saves the
``cpu`` device from :meth:`Guest.get_cpu_state`; the destination creates a
paused guest (``start=False``), fills its blocks, loads the device with
:meth:`Guest.set_cpu_state` and calls :meth:`Guest.start`.  For postcopy the
destination's vCPUs register with the fault handler
(:meth:`Guest.attach_faults`) before they start on incomplete memory.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Mapping, Sequence

import numpy as np

from engine.errors import ConfigError, GuestError, InvalidParameterError, PostcopyError
from engine.ram.faultproto import MODE_NAMES
from engine.ram.abcheck import ABResult, ab_region, check_ab
from engine.ram.block import DEFAULT_PAGE_SIZE, RamBlock
from engine.ram.dirty import DirtyLog
from engine.ram.dirtylimit import DirtyArea
from engine.ram.faults import MODE_DETACH
from engine.ram.vcpu import FAULTS_PATH_BYTES, Control, Vcpus
from engine.ram.workloads import NREGS, WorkloadSpec

__all__ = ["Guest"]

#: Default limit for spawned vCPUs to map the guest's memory (seconds).
STARTUP_TIMEOUT = 60.0


class _Resources:
    """Everything a guest must release; closed by Guest.close() or a finalizer.

    Kept apart from :class:`Guest` so that the finalizer holds no reference
    to the guest itself.
    """

    def __init__(self) -> None:
        self.vcpus: Vcpus | None = None
        self.control: Control | None = None
        self.logs: list[DirtyLog] = []
        #: dirty-rate measurement (engine.ram.dirtyrate): logs and the dirty area
        self.measure_logs: list[DirtyLog] = []
        self.dirty_area: DirtyArea | None = None
        self.owned_blocks: list[RamBlock] = []

    def close(self) -> None:
        errors: list[BaseException] = []

        def attempt(fn, *args) -> None:
            try:
                fn(*args)
            except Exception as exc:  # keep releasing the rest
                errors.append(exc)

        if self.vcpus is not None:
            attempt(self.vcpus.close)
        for log in (*self.logs, *self.measure_logs):
            attempt(log.close)
            attempt(log.unlink)
        if self.dirty_area is not None:
            attempt(self.dirty_area.close)
            attempt(self.dirty_area.unlink)
        if self.control is not None:
            attempt(self.control.close)
            attempt(self.control.unlink)
        for block in self.owned_blocks:
            attempt(block.close)
            attempt(block.unlink)
        if errors:
            raise errors[0]


class Guest:
    """RAM blocks, one dirty log per block, a control segment and vCPUs.

    Build it with :meth:`create` or :meth:`from_blocks`.  A guest is a
    context manager; :meth:`close` stops and reaps the vCPUs and releases
    every segment the guest created (it also runs at interpreter exit or
    when the guest is garbage-collected).
    """

    def __init__(self, resources: _Resources, blocks: Sequence[RamBlock],
                 nvcpus: int, workload: WorkloadSpec):
        # Private: use create() or from_blocks().
        self._res = resources
        self._finalizer = weakref.finalize(self, resources.close)
        self.blocks: list[RamBlock] = list(blocks)
        self.workload = workload
        self.nvcpus = nvcpus
        self.prealloc = False
        self.page_size = self.blocks[0].page_size if self.blocks else DEFAULT_PAGE_SIZE
        self._by_id = {b.idstr: b for b in self.blocks}
        if len(self._by_id) != len(self.blocks):
            raise ConfigError(f"duplicate RAM block idstr in {[b.idstr for b in self.blocks]}")
        if workload.name == "ab" and nvcpus and not self.blocks:
            raise ConfigError("the ab workload needs at least one RAM block")
        resources.logs.extend(DirtyLog.create(b.npages) for b in self.blocks)
        self._logs = dict(zip(self._by_id, resources.logs))
        resources.measure_logs.extend(DirtyLog.create(b.npages) for b in self.blocks)
        resources.dirty_area = DirtyArea.create(nvcpus)
        resources.control = Control.create(nvcpus)
        # Registered before any process exists, so a failure (or Ctrl-C)
        # part-way through launching still reaps what was started.
        resources.vcpus = Vcpus(resources.control, workload)
        resources.vcpus.launch(self.blocks, resources.logs,
                               (resources.dirty_area.handle,
                                tuple(log.handle for log in resources.measure_logs)))
        # The same two, typed as set: _Resources has them None until here.
        self._vcpus: Vcpus = resources.vcpus
        self._control: Control = resources.control

    # -- construction ---------------------------------------------------------------

    @classmethod
    def create(cls, blocks: Sequence[tuple], vcpus: int = 1,
               workload: WorkloadSpec = WorkloadSpec("none"), start: bool = True, *,
               page_size: int = DEFAULT_PAGE_SIZE, prealloc: bool = False,
               startup_timeout: float = STARTUP_TIMEOUT) -> "Guest":
        """Create a guest with new blocks and *vcpus* vCPU processes.

        *blocks* lists ``(idstr, size, mem_path)`` (or ``(idstr, size)``):
        sizes in bytes, multiples of *page_size*; ``mem_path=None`` puts the
        block in a new shared-memory segment, a path maps that file (see
        :meth:`RamBlock.create`).  The call returns once every vCPU has
        mapped the memory; with *start* the vCPUs are then running, without
        it they wait for :meth:`start` (QEMU's ``-S``).  *prealloc* populates
        every block in this process first (:meth:`RamBlock.populate`, QEMU's
        ``prealloc=on``).
        """
        _check_vcpus(vcpus)
        res = _Resources()
        try:
            for spec in blocks:
                if len(spec) not in (2, 3):
                    raise ConfigError(f"a block is (idstr, size[, mem_path]), not {spec!r}")
                idstr, size, mem_path = (*spec, None)[:3]
                res.owned_blocks.append(
                    RamBlock.create(idstr, size, mem_path=mem_path, page_size=page_size))
                if prealloc:
                    res.owned_blocks[-1].populate()
            guest = cls(res, res.owned_blocks, vcpus, workload)
        except BaseException:
            with contextlib.suppress(Exception):   # keep the original error
                res.close()
            raise
        #: made with prealloc: helper processes that write its memory populate
        #: their own mappings too (each process has its own page tables)
        guest.prealloc = prealloc
        guest._await_vcpus(start, startup_timeout)
        return guest

    @classmethod
    def from_blocks(cls, blocks: Sequence[RamBlock], vcpus: int = 0,
                    workload: WorkloadSpec = WorkloadSpec("none"), start: bool = True, *,
                    startup_timeout: float = STARTUP_TIMEOUT) -> "Guest":
        """A guest over blocks the caller already has (and keeps owning).

        The guest creates dirty logs, the control segment and the vCPUs;
        :meth:`close` releases those but leaves *blocks* open.
        """
        _check_vcpus(vcpus)
        res = _Resources()
        try:
            guest = cls(res, blocks, vcpus, workload)
        except BaseException:
            with contextlib.suppress(Exception):   # keep the original error
                res.close()
            raise
        guest._await_vcpus(start, startup_timeout)
        return guest

    def _await_vcpus(self, start: bool, timeout: float) -> None:
        try:
            self._vcpus.wait_ready(timeout)
            if start:
                self.start()
        except BaseException:
            with contextlib.suppress(Exception):   # keep the original error
                self.close()
            raise

    # -- memory -----------------------------------------------------------------------

    def block(self, idstr: str) -> RamBlock:
        """The block named *idstr*."""
        try:
            return self._by_id[idstr]
        except KeyError:
            raise GuestError(f"guest has no RAM block {idstr!r}") from None

    def dirty_log(self, idstr: str) -> DirtyLog:
        """The dirty log of block *idstr*."""
        self.block(idstr)
        return self._logs[idstr]

    @property
    def dirty_logs(self) -> list[DirtyLog]:
        """Dirty logs in block order."""
        return list(self._logs.values())

    @property
    def measure_logs(self) -> list[DirtyLog]:
        """The dirty-rate measurement logs, in block order (:mod:`engine.ram.dirtyrate`)."""
        return list(self._res.measure_logs)

    @property
    def dirty_area(self) -> DirtyArea:
        """Per-vCPU dirty counters, rates and limits (:mod:`engine.ram.dirtylimit`)."""
        self._check_open()
        area = self._res.dirty_area
        assert area is not None     # created with the guest's other shared memory
        return area

    def sync_dirty(self, idstr: str) -> np.ndarray:
        """Harvest block *idstr*'s dirty pages (sorted ``int64`` indexes).

        The returned pages' log entries are already clear: read them now and
        any later write shows up in the next sync (see :class:`DirtyLog`).
        """
        return self.dirty_log(idstr).harvest()

    def check_ab(self, slices: int | None = None) -> ABResult:
        """Run the ``ab`` check on the first block (guest must be stopped).

        *slices* is the number of vCPUs that wrote the memory; by default
        this guest's vCPU count (at least 1).
        """
        if self.running and self.nvcpus:
            raise GuestError("stop the guest before checking its memory")
        if not self.blocks:
            raise GuestError("guest has no RAM blocks")
        block = self.blocks[0]
        lo, hi = ab_region(block.npages, block.page_size)
        return check_ab(block.pages[lo:hi], block.page_size, slices or max(1, self.nvcpus))

    # -- vCPUs ------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """Process ids of the vCPUs."""
        return list(self._vcpus.pids)

    def start(self) -> None:
        """Run the vCPUs; each resumes from its registers."""
        self._check_open()
        self._vcpus.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Pause the vCPUs; returns once every one has acknowledged.

        Afterwards guest memory, dirty logs, registers and the counter stay
        unchanged until :meth:`start`.  Raises :class:`GuestError` if a vCPU
        died or did not pause within *timeout* seconds.
        """
        self._check_open()
        self._vcpus.stop(timeout)

    def set_throttle(self, percentage: int) -> None:
        """auto-converge: the vCPUs sleep *percentage* % of each timeslice (0: none)."""
        self._check_open()
        self._vcpus.set_throttle(percentage)

    @property
    def running(self) -> bool:
        """Whether the guest has been started and not stopped since."""
        return not self.closed and self._vcpus.running

    @property
    def registers(self) -> np.ndarray:
        """The vCPUs' registers: a live ``(nvcpus, 16)`` ``uint64`` view."""
        self._check_open()
        return self._control.registers

    @property
    def counter(self) -> int:
        """The guest-wide counter (vCPU 0 adds one per chunk it runs)."""
        self._check_open()
        return self._control.counter

    @counter.setter
    def counter(self, value: int) -> None:
        self._check_stopped("set the counter")
        self._control.counter = value

    def get_cpu_state(self) -> dict[str, Any]:
        """The ``cpu`` device state: ``{"registers": [[int]*16]*nvcpus, "counter": int}``.

        Consistent only while the guest is stopped.
        """
        self._check_open()
        return {"registers": self._control.registers.tolist(),
                "counter": self._control.counter}

    def set_cpu_state(self, state: Mapping[str, Any]) -> None:
        """Load a state from :meth:`get_cpu_state` (guest must be stopped)."""
        self._check_stopped("load CPU state")
        regs = np.asarray(state["registers"], dtype=np.uint64)
        if regs.shape != (self.nvcpus, NREGS):
            raise GuestError(f"CPU state has registers of shape {regs.shape}, this "
                             f"guest needs ({self.nvcpus}, {NREGS})")
        self._control.registers[:] = regs
        self._control.counter = int(state["counter"])

    # -- postcopy faults -----------------------------------------------------------

    def attach_faults(self, path: str, mode: str, timeout: float = 10.0) -> None:
        """Make every vCPU register with the postcopy fault handler at *path*.

        *mode* is ``"userfaultfd"`` (each vCPU registers its mapping of every
        block and hands the descriptor over; a missing page blocks it in the
        kernel) or ``"software"`` (the workloads check the handler's received
        bitmaps before touching pages and ask for missing ones).  Running and
        paused vCPUs alike take part; the call returns once all have
        registered.  A previous registration is dropped first.  No-op without
        vCPUs.

        Raises :class:`PostcopyError` naming each vCPU that failed and why
        (the others are detached again), or a vCPU that died or did not
        answer within *timeout* seconds (then nothing is undone: the guest
        is unusable and should be closed).
        """
        codes = {name: code for code, name in MODE_NAMES.items()}
        if mode not in codes:
            raise InvalidParameterError("postcopy-faults", mode,
                                        f"must be one of {sorted(codes)}")
        if not isinstance(path, str) or not path or "\0" in path \
                or len(path.encode()) > FAULTS_PATH_BYTES:
            raise InvalidParameterError("fault handler socket", path,
                                        f"must be a path of 1..{FAULTS_PATH_BYTES} bytes")
        self._check_open()
        if not self.nvcpus:
            return
        failures = self._vcpus.request_faults(codes[mode], path, timeout)
        if failures:
            with contextlib.suppress(PostcopyError):    # keep the real error
                self._vcpus.request_faults(MODE_DETACH, "", timeout)
            raise PostcopyError(f"cannot attach {mode} postcopy faults to the handler at "
                                f"{path}: " + "; ".join(failures))

    def detach_faults(self, timeout: float = 10.0) -> None:
        """Drop every vCPU's registration with the fault handler (idempotent).

        Afterwards the vCPUs touch memory without asking anyone: call it
        once every page is in place.  No-op without vCPUs.  Raises
        :class:`PostcopyError` if a vCPU failed to unregister, died, or did
        not answer within *timeout* seconds (a vCPU blocked on a page that
        never comes cannot answer).
        """
        self._check_open()
        if not self.nvcpus:
            return
        failures = self._vcpus.request_faults(MODE_DETACH, "", timeout)
        if failures:
            raise PostcopyError("cannot detach postcopy faults: " + "; ".join(failures))

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _check_open(self) -> None:
        if self.closed:
            raise GuestError("guest is closed")

    def _check_stopped(self, doing: str) -> None:
        self._check_open()
        if self.nvcpus and self.running:
            raise GuestError(f"stop the guest before trying to {doing}")

    def close(self) -> None:
        """Stop and reap the vCPUs; close and unlink what the guest created.

        Idempotent.  Blocks passed to :meth:`from_blocks` stay open.
        """
        self._finalizer()

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("running" if self.running else "stopped")
        return (f"<Guest {[b.idstr for b in self.blocks]} vcpus={self.nvcpus} "
                f"workload={self.workload.name} {state}>")


def _check_vcpus(vcpus: int) -> None:
    if not isinstance(vcpus, int) or vcpus < 0:
        raise ConfigError(f"vcpus must be an integer >= 0, not {vcpus!r}")
