"""Guest vCPUs: real processes that run a workload on shared guest memory.

The coordinator and its vCPUs share a small *control segment* of ``uint64``
words:

=========================  ================================================
words                      meaning
=========================  ================================================
``RUN``                    1 while the guest should run, 0 to pause
``EPOCH``                  bumped by every ``stop()``
``COUNTER``                guest-wide counter, +1 per chunk of vCPU 0
``QUIT``                   1 asks every vCPU to exit
``status[i, ST_ACK]``      the EPOCH vCPU *i* saw while paused
``status[i, ST_READY]``    1 once vCPU *i* has attached its memory
``status[i, ST_PID]``      vCPU *i*'s pid
``regs[i, 0:16]``          vCPU *i*'s registers (see :mod:`workloads`)
=========================  ================================================

**Stop is exact.**  ``stop()`` bumps EPOCH, *then* clears RUN, and waits until
every vCPU's ACK equals the new EPOCH.  A vCPU runs chunks while RUN is set;
at each chunk boundary it reads EPOCH *first* and RUN *second*, and only when
it sees RUN clear does it store that EPOCH into ACK and idle.  If it read the
new EPOCH, its later read of RUN cannot return a value older than the
``start()`` that preceded this stop (stores are seen in order and loads are
not reordered with loads on x86), so RUN==0 is this stop's and stays 0 until
the next ``start()``: the vCPU will not write again.  Its last chunk's stores,
dirty marks and registers were all stored before the ACK, so the coordinator
sees them once it sees the ACK.  Reading RUN before EPOCH would let a vCPU
acknowledge a new stop with a stale RUN==0 and then resume on the previous
``start()``'s RUN==1.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from engine.errors import GuestError
from engine.procs import child_setup, spawn
from engine.ram.block import RamBlock, RamBlockHandle
from engine.ram.dirty import DirtyLog, DirtyLogHandle
from engine.ram.shm import attach_segment, close_segment, create_segment, unlink_segment
from engine.ram.workloads import NREGS, Pacer, WorkloadSpec, make_workload

__all__ = ["ControlHandle", "Control", "Vcpus", "vcpu_main"]

RUN, EPOCH, COUNTER, QUIT = 0, 1, 2, 3
_HEADER_WORDS = 8
ST_ACK, ST_READY, ST_PID = 0, 1, 2
_STATUS_WORDS = 4

#: How often an idle or paused vCPU looks at the control words (seconds).
POLL_INTERVAL = 0.001
#: How often a running vCPU checks that its parent is still alive (seconds).
PARENT_CHECK_INTERVAL = 0.05
#: Longest sleep of a paced vCPU between control checks (seconds).
_MAX_PACING_SLEEP = 0.005



@dataclass(frozen=True)
class ControlHandle:
    """What a vCPU process needs to attach the control segment (picklable)."""

    shm_name: str
    nvcpus: int


def _control_words(nvcpus: int) -> int:
    return _HEADER_WORDS + nvcpus * (_STATUS_WORDS + NREGS)


class Control:
    """Typed views over the control segment (see the module docstring)."""

    def __init__(self, shm, nvcpus: int, *, owner: bool):
        # Private: use create() or attach().
        self._shm = shm
        self.nvcpus = nvcpus
        self.owner = owner
        words = np.frombuffer(shm.buf, dtype=np.uint64, count=_control_words(nvcpus))
        self.words = words
        status_end = _HEADER_WORDS + nvcpus * _STATUS_WORDS
        self.status = words[_HEADER_WORDS:status_end].reshape(nvcpus, _STATUS_WORDS)
        self.registers = words[status_end:].reshape(nvcpus, NREGS)
        self._closed = False

    @classmethod
    def create(cls, nvcpus: int) -> "Control":
        shm = create_segment(_control_words(nvcpus) * 8)
        try:
            return cls(shm, nvcpus, owner=True)
        except BaseException:
            shm.close()
            unlink_segment(shm)
            raise

    @classmethod
    def attach(cls, handle: ControlHandle) -> "Control":
        return cls(attach_segment(handle.shm_name), handle.nvcpus, owner=False)

    @property
    def handle(self) -> ControlHandle:
        return ControlHandle(self._shm.name, self.nvcpus)

    @property
    def run(self) -> bool:
        return bool(self.words[RUN])

    @property
    def epoch(self) -> int:
        return int(self.words[EPOCH])

    @property
    def quit(self) -> bool:
        return bool(self.words[QUIT])

    @property
    def counter(self) -> int:
        return int(self.words[COUNTER])

    @counter.setter
    def counter(self, value: int) -> None:
        self.words[COUNTER] = value

    def close(self) -> None:
        if self._closed:
            return
        self.words = self.status = self.registers = None
        close_segment(self._shm)     # views held elsewhere keep it mapped
        self._closed = True

    def unlink(self) -> None:
        unlink_segment(self._shm)


# -- the vCPU process -----------------------------------------------------------


def vcpu_main(index: int, nvcpus: int, control: ControlHandle,
              blocks: Sequence[RamBlockHandle], logs: Sequence[DirtyLogHandle],
              spec: WorkloadSpec, parent_pid: int) -> None:
    """Body of vCPU *index*: attach the guest's memory and run *spec*.

    Ctrl-C belongs to the coordinator, so SIGINT is ignored; the process
    dies with its parent.  Returns when QUIT is set.
    """
    child_setup(parent_pid)
    ctl = Control.attach(control)
    mapped_blocks: list[RamBlock] = []
    mapped_logs: list[DirtyLog] = []
    workload = None
    try:
        for handle in blocks:
            mapped_blocks.append(RamBlock.attach(handle))
        for handle in logs:
            mapped_logs.append(DirtyLog.attach(handle))
        workload = make_workload(spec, index, nvcpus, mapped_blocks, mapped_logs,
                                 ctl.registers[index])
        ctl.status[index, ST_PID] = os.getpid()
        ctl.status[index, ST_READY] = 1
        _run(ctl, index, workload, parent_pid)
    finally:
        # The workload holds numpy views into the blocks: drop it first.
        del workload
        for resource in (*mapped_logs, *mapped_blocks, ctl):
            resource.close()


def _run(ctl: Control, index: int, workload, parent_pid: int) -> None:
    words = ctl.words
    ack = ctl.status[index, ST_ACK:ST_ACK + 1]
    pacer = Pacer(workload.rate)
    paused = True
    next_parent_check = 0.0
    clock = time.monotonic
    while not words[QUIT]:
        now = clock()
        if now >= next_parent_check:
            if os.getppid() != parent_pid:
                return
            next_parent_check = now + PARENT_CHECK_INTERVAL
        epoch = words[EPOCH]            # EPOCH before RUN: see module docstring
        if not words[RUN]:
            ack[0] = epoch
            paused = True
            time.sleep(POLL_INTERVAL)
            continue
        if paused:
            paused = False
            workload.resume()
            pacer.reset()
        if workload.idle:
            time.sleep(POLL_INTERVAL)
            continue
        wait = pacer.delay()
        if wait > 0:
            time.sleep(min(wait, _MAX_PACING_SLEEP))
            continue
        pacer.account(workload.step())
        if index == 0:
            words[COUNTER] += 1


# -- the coordinator's side -----------------------------------------------------


class Vcpus:
    """The coordinator's handle on a guest's vCPU processes.

    :meth:`launch` spawns one process per vCPU of *control* (``spawn`` start
    method); they attach the guest's blocks and dirty logs and run *spec*,
    initially paused.  :meth:`start` and :meth:`stop` drive the control
    segment; :meth:`close` ends and reaps the processes.  With no vCPUs there
    are no processes and start/stop only flip the RUN word.

    The vCPUs die with the *thread* that launched them (that is how
    ``PR_SET_PDEATHSIG`` works): launch from a thread that outlives the guest.
    """

    def __init__(self, control: Control, spec: WorkloadSpec):
        self.control = control
        self.spec = spec
        self.processes: list[multiprocessing.Process] = []
        self.pids: list[int] = []
        self._closed = False

    def launch(self, blocks: Sequence[RamBlock], logs: Sequence[DirtyLog]) -> None:
        """Spawn the vCPU processes (they stay paused until :meth:`start`).

        If this raises, the processes already spawned are still listed and
        :meth:`close` reaps them.
        """
        nvcpus = self.control.nvcpus
        args = (nvcpus, self.control.handle, tuple(b.handle for b in blocks),
                tuple(log.handle for log in logs), self.spec, os.getpid())
        for index in range(nvcpus):
            proc = spawn(vcpu_main, (index, *args), f"engine-vcpu-{index}")
            self.processes.append(proc)
            self.pids.append(proc.pid)

    def _check_alive(self, index: int, doing: str) -> None:
        proc = self.processes[index]
        if not proc.is_alive():
            raise GuestError(f"vCPU {index} (pid {proc.pid}) died with exit code "
                             f"{proc.exitcode} while {doing}")

    def wait_ready(self, timeout: float) -> None:
        """Wait until every vCPU has mapped the guest's memory."""
        deadline = time.monotonic() + timeout
        status = self.control.status
        for index in range(self.control.nvcpus):
            while not status[index, ST_READY]:
                self._check_alive(index, "starting")
                if time.monotonic() > deadline:
                    raise GuestError(f"vCPU {index} did not start within {timeout} s")
                time.sleep(POLL_INTERVAL)

    def start(self) -> None:
        """Let the vCPUs run (they resume from their registers)."""
        self.control.words[RUN] = 1

    def stop(self, timeout: float = 10.0) -> None:
        """Pause every vCPU; return once all have acknowledged.

        On return no vCPU is between the stores and the dirty marks of a
        chunk, its registers describe where it stopped, and none writes guest
        memory until :meth:`start`.  Raises :class:`GuestError` if a vCPU died
        or did not acknowledge within *timeout* seconds.
        """
        words = self.control.words
        epoch = int(words[EPOCH]) + 1
        words[EPOCH] = epoch                # EPOCH before RUN: see module docstring
        words[RUN] = 0
        deadline = time.monotonic() + timeout
        status = self.control.status
        for index in range(self.control.nvcpus):
            while int(status[index, ST_ACK]) != epoch:
                self._check_alive(index, "stopping")
                if time.monotonic() > deadline:
                    raise GuestError(f"vCPU {index} (pid {self.processes[index].pid}) "
                                     f"did not pause within {timeout} s")
                time.sleep(POLL_INTERVAL / 2)

    @property
    def running(self) -> bool:
        return self.control.run

    def close(self, timeout: float = 2.0) -> None:
        """Ask the vCPUs to exit and reap them, killing stragglers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.control.words is not None:
            self.control.words[RUN] = 0
            self.control.words[QUIT] = 1
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
            try:
                proc.close()
            except ValueError:
                pass    # reaped behind multiprocessing's back: nothing to release
