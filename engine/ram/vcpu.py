"""Guest vCPUs: real processes that run a workload on shared guest memory.

The coordinator and its vCPUs share a small *control segment* of ``uint64``
words:

============================  =============================================
words                         meaning
============================  =============================================
``RUN``                       1 while the guest should run, 0 to pause
``EPOCH``                     bumped by every ``stop()``
``COUNTER``                   guest-wide counter, +1 per chunk of vCPU 0
``QUIT``                      1 asks every vCPU to exit
``FAULTS_SEQ``                bumped by every postcopy faults request
``FAULTS_MODE``               what the request asks for: 0 detach,
                              1 userfaultfd, 2 software (``faultproto``)
``THROTTLE``                  auto-converge's throttle percentage (0: none)
``path[0:128]``               the fault handler's socket path, UTF-8, NUL
                              padded (16 words after the header)
``status[i, ST_ACK]``         the EPOCH vCPU *i* saw while paused
``status[i, ST_READY]``       1 once vCPU *i* has attached its memory
``status[i, ST_PID]``         vCPU *i*'s pid
``status[i, ST_FAULTS]``      the FAULTS_SEQ vCPU *i* has carried out
``status[i, ST_FAULTS_ERR]``  0, or why that request failed
                              (:func:`engine.ram.faults.describe_error`)
``regs[i, 0:16]``             vCPU *i*'s registers (see :mod:`workloads`)
``reason[i][0:256]``          text of vCPU *i*'s last faults failure
                              (32 words per vCPU after the registers)
============================  =============================================

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

**Faults requests** (postcopy, :mod:`engine.ram.faults`) are level
triggered.  The coordinator stores the path and FAULTS_MODE, *then* bumps
FAULTS_SEQ, and waits until every vCPU's ST_FAULTS equals it.  A vCPU looks
at FAULTS_SEQ every time it looks at EPOCH (every chunk boundary while it
runs, every poll while it is paused); when it changed, it drops whatever
registration it had, sets up the one FAULTS_MODE asks for, stores the
outcome into its reason text and ST_FAULTS_ERR and only then FAULTS_SEQ into
ST_FAULTS.  While a vCPU waits for a missing page (software faults) it keeps
watching QUIT, its parent and FAULTS_SEQ, so closing the guest or a newer
request never waits for a page that does not come.  A stop that arrives
while a vCPU waits for a page takes effect once the page is there (the chunk
has not stored anything yet), as with a vCPU blocked in a userfault.
"""
from __future__ import annotations

import errno
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from engine.errors import GuestError, PostcopyError
from engine.ram.faultproto import MODE_NAMES, MODE_SOFTWARE
from engine.procs import child_setup, parent_alive, spawn
from engine.ram.block import RamBlock, RamBlockHandle
from engine.ram.cputhrottle import CPU_THROTTLE_TIMESLICE, throttle_sleep
from engine.ram.dirty import DirtyLog, DirtyLogHandle
from engine.ram.dirtylimit import DirtyArea, DirtyAreaHandle, DirtyLimiter
from engine.ram.dirtyrate import TeeLog
from engine.ram.faults import (MODE_DETACH, STAGE_INTERNAL, FaultClient, FaultSetupError,
                               describe_error, error_code)
from engine.ram.shm import (attach_segment, close_segment, create_segment, removed_on_error,
                            unlink_segment)
from engine.ram.workloads import NREGS, Pacer, WorkloadSpec, make_workload

__all__ = ["ControlHandle", "Control", "Vcpus", "vcpu_main"]

RUN, EPOCH, COUNTER, QUIT, FAULTS_SEQ, FAULTS_MODE = 0, 1, 2, 3, 4, 5
THROTTLE = 6
_HEADER_WORDS = 8
#: Room for the fault handler's socket path (bytes; a unix path has <= 107).
FAULTS_PATH_BYTES = 128
_PATH_WORDS = FAULTS_PATH_BYTES // 8
ST_ACK, ST_READY, ST_PID, ST_FAULTS, ST_FAULTS_ERR = 0, 1, 2, 3, 4
_STATUS_WORDS = 6
#: Room for a vCPU's faults failure text (bytes).
FAULTS_REASON_BYTES = 256
_REASON_WORDS = FAULTS_REASON_BYTES // 8

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
    return _HEADER_WORDS + _PATH_WORDS + nvcpus * (_STATUS_WORDS + NREGS + _REASON_WORDS)


class Control:
    """Typed views over the control segment (see the module docstring)."""

    def __init__(self, shm, nvcpus: int, *, owner: bool):
        # Private: use create() or attach().
        self._shm = shm
        self.nvcpus = nvcpus
        self.owner = owner
        words = np.frombuffer(shm.buf, dtype=np.uint64, count=_control_words(nvcpus))
        self.words = words
        path_end = _HEADER_WORDS + _PATH_WORDS
        status_end = path_end + nvcpus * _STATUS_WORDS
        regs_end = status_end + nvcpus * NREGS
        self._path = words[_HEADER_WORDS:path_end].view(np.uint8)
        self.status = words[path_end:status_end].reshape(nvcpus, _STATUS_WORDS)
        self.registers = words[status_end:regs_end].reshape(nvcpus, NREGS)
        self._reasons = words[regs_end:].view(np.uint8).reshape(nvcpus, FAULTS_REASON_BYTES)
        self._closed = False

    @classmethod
    def create(cls, nvcpus: int) -> "Control":
        with removed_on_error(create_segment(_control_words(nvcpus) * 8)) as shm:
            return cls(shm, nvcpus, owner=True)

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

    @property
    def faults_path(self) -> str:
        """The fault handler's socket path of the current faults request."""
        return _read_text(self._path)

    @faults_path.setter
    def faults_path(self, path: str) -> None:
        _write_text(self._path, path)

    def faults_reason(self, index: int) -> str:
        """Why vCPU *index*'s last faults request failed ("" if it did not)."""
        return _read_text(self._reasons[index])

    def set_faults_reason(self, index: int, text: str) -> None:
        raw = text.encode(errors="replace")[:FAULTS_REASON_BYTES - 1]
        _write_text(self._reasons[index], raw.decode(errors="ignore"))

    def close(self) -> None:
        if self._closed:
            return
        # Drops the views (typed as arrays: nothing may use them after close)
        self.words = self.status = self.registers = None  # type: ignore[assignment]
        self._path = self._reasons = None  # type: ignore[assignment]
        close_segment(self._shm)     # views held elsewhere keep it mapped
        self._closed = True

    def unlink(self) -> None:
        unlink_segment(self._shm)


def _read_text(area: np.ndarray) -> str:
    return area.tobytes().split(b"\0", 1)[0].decode(errors="replace")


def _write_text(area: np.ndarray, text: str) -> None:
    raw = text.encode()
    if len(raw) > area.size or b"\0" in raw:
        raise ValueError(f"{text!r} does not fit a {area.size}-byte NUL-padded field")
    area[len(raw):] = 0
    area[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)


# -- the vCPU process -----------------------------------------------------------


def vcpu_main(index: int, nvcpus: int, control: ControlHandle,
              blocks: Sequence[RamBlockHandle], logs: Sequence[DirtyLogHandle],
              spec: WorkloadSpec, parent_pid: int,
              dirty: tuple[DirtyAreaHandle, Sequence[DirtyLogHandle]] | None = None) -> None:
    """Body of vCPU *index*: attach the guest's memory and run *spec*.

    *dirty* is the guest's dirty area and measurement logs: the vCPU marks
    each page in its measurement log too, counts the pages it marks and keeps
    under its dirty-rate quota (:mod:`engine.ram.dirtylimit`).  Ctrl-C belongs
    to the coordinator, so SIGINT is ignored; the process dies with its parent.
    Returns when QUIT is set.
    """
    child_setup(parent_pid)
    ctl = Control.attach(control)
    mapped_blocks: list[RamBlock] = []
    mapped_logs: list[DirtyLog] = []
    measure_logs: list[DirtyLog] = []
    area = workload = faults = limiter = None
    try:
        for handle in blocks:
            mapped_blocks.append(RamBlock.attach(handle))
        for log_handle in logs:
            mapped_logs.append(DirtyLog.attach(log_handle))
        marked: Sequence = mapped_logs
        if dirty is not None:
            area = DirtyArea.attach(dirty[0])
            measure_logs.extend(DirtyLog.attach(handle) for handle in dirty[1])
            marked = [TeeLog(log, m, area.words) for log, m in zip(mapped_logs, measure_logs)]
            limiter = DirtyLimiter(area, index)
        workload = make_workload(spec, index, nvcpus, mapped_blocks, marked,
                                 ctl.registers[index])
        faults = _FaultRequests(ctl, index, mapped_blocks, workload, parent_pid)
        ctl.status[index, ST_PID] = os.getpid()
        ctl.status[index, ST_READY] = 1
        _run(ctl, index, workload, faults, parent_pid, limiter)
    finally:
        if faults is not None:
            faults.close()      # unregister before the mappings go
        # The workload holds numpy views into the blocks: drop it first.
        del workload, faults, limiter
        closing: tuple = (*mapped_logs, *measure_logs, *mapped_blocks, *filter(None, [area]),
                          ctl)
        for resource in closing:
            resource.close()


class _FaultRequests:
    """Carries out the coordinator's faults requests inside a vCPU."""

    def __init__(self, ctl: Control, index: int, blocks: Sequence[RamBlock], workload,
                 parent_pid: int):
        self.ctl = ctl
        self.words = ctl.words
        self.index = index
        self.workload = workload
        self.parent_pid = parent_pid
        #: the FAULTS_SEQ last carried out (the coordinator's count starts at 0)
        self.seen = 0
        self.client = FaultClient(index, blocks, self.cancelled)

    def cancelled(self) -> bool:
        """Whether a wait for the handler or for a page must give up."""
        words = self.words
        return (bool(words[QUIT]) or int(words[FAULTS_SEQ]) != self.seen
                or not parent_alive(self.parent_pid))

    def serve(self) -> None:
        ctl, index = self.ctl, self.index
        self.seen = seq = int(self.words[FAULTS_SEQ])     # SEQ before MODE and path
        mode = int(self.words[FAULTS_MODE])
        code, reason = 0, ""
        self.workload.faults = None
        try:
            self.client.detach()
            if mode != MODE_DETACH:
                self.client.attach(ctl.faults_path, mode)
        except FaultSetupError as exc:
            code, reason = exc.code, str(exc)
        except Exception as exc:   # reported, never fatal: the vCPU must still ack
            code, reason = error_code(STAGE_INTERNAL, errno.EIO), f"{type(exc).__name__}: {exc}"
        if self.client.mode == MODE_SOFTWARE:
            self.workload.faults = self.client
        ctl.set_faults_reason(index, reason)
        ctl.status[index, ST_FAULTS_ERR] = code
        ctl.status[index, ST_FAULTS] = seq      # last: it publishes the two above

    def close(self) -> None:
        self.workload.faults = None
        self.client.close()


def _run(ctl: Control, index: int, workload, faults: _FaultRequests,
         parent_pid: int, limiter: DirtyLimiter | None = None) -> None:
    words = ctl.words
    ack = ctl.status[index, ST_ACK:ST_ACK + 1]
    pacer = Pacer(workload.rate)
    paused = True
    next_parent_check = 0.0
    clock = time.monotonic
    slice_end = 0.0
    while not words[QUIT]:
        now = clock()
        if now >= slice_end:
            slice_end = _throttle_slice(words, pacer, now)
        if now >= next_parent_check:
            if not parent_alive(parent_pid):
                return
            next_parent_check = now + PARENT_CHECK_INTERVAL
        if words[FAULTS_SEQ] != faults.seen:
            faults.serve()
        epoch = words[EPOCH]            # EPOCH before RUN: see module docstring
        if not words[RUN]:
            ack[0] = epoch
            paused = True
            time.sleep(POLL_INTERVAL)
            continue
        if paused:
            # False: a wait for a missing page gave up; look at the words again.
            if not workload.resume():
                continue
            paused = False
            pacer.reset()
            if limiter is not None:
                limiter.reset()
        if workload.idle:
            time.sleep(POLL_INTERVAL)
            continue
        wait = pacer.delay()
        if wait > 0:
            time.sleep(min(wait, _MAX_PACING_SLEEP))
            continue
        if limiter is not None:         # dirty-limit: the vCPU's own quota
            hold = limiter.delay(now)
            if hold > 0:
                limiter.sleep(min(hold, _MAX_PACING_SLEEP))
                continue
        pages = workload.step()          # 0: gave up waiting for a page, wrote nothing
        pacer.account(pages)
        if limiter is not None:
            limiter.account(pages)
        if index == 0 and pages:
            words[COUNTER] += 1


def _throttle_slice(words, pacer: Pacer, now: float) -> float:
    """End of a 10 ms timeslice: sleep auto-converge's share (QEMU's
    cpu_throttle_thread); returns when the next timeslice ends.

    The sleep gives way to a stop or a quit, as QEMU's ends when the vCPU is
    kicked, so a 99 % throttle never stretches the switchover.  The pacer
    forgets the time slept: catching up on it would undo the throttle.
    """
    pct = int(words[THROTTLE])
    if pct and words[RUN]:
        until = now + throttle_sleep(pct)
        while words[RUN] and not words[QUIT]:
            left = until - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, _MAX_PACING_SLEEP))
        pacer.reset()
        now = time.monotonic()
    return now + CPU_THROTTLE_TIMESLICE


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

    def launch(self, blocks: Sequence[RamBlock], logs: Sequence[DirtyLog],
               dirty: tuple[DirtyAreaHandle, Sequence[DirtyLogHandle]] | None = None) -> None:
        """Spawn the vCPU processes (they stay paused until :meth:`start`).

        *dirty* is passed to :func:`vcpu_main`.

        If this raises, the processes already spawned are still listed and
        :meth:`close` reaps them.
        """
        nvcpus = self.control.nvcpus
        args = (nvcpus, self.control.handle, tuple(b.handle for b in blocks),
                tuple(log.handle for log in logs), self.spec, os.getpid(), dirty)
        for index in range(nvcpus):
            proc = spawn(vcpu_main, (index, *args), f"engine-vcpu-{index}")
            self.processes.append(proc)
            assert proc.pid is not None     # spawn() started it
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

    def request_faults(self, mode: int, path: str, timeout: float) -> list[str]:
        """Ask every vCPU to set up postcopy faults in *mode* (0: drop them).

        *path* is the fault handler's socket (ignored for mode 0).  Returns
        once every vCPU has carried the request out, with one line per vCPU
        that failed (empty if none did).  Raises :class:`PostcopyError` if a
        vCPU died or did not answer within *timeout* seconds.
        """
        control = self.control
        words, status = control.words, control.status
        what = (f"attaching {MODE_NAMES[mode]} postcopy faults" if mode
                else "detaching postcopy faults")
        control.faults_path = path if mode else ""
        words[FAULTS_MODE] = mode
        seq = int(words[FAULTS_SEQ]) + 1
        words[FAULTS_SEQ] = seq             # last: it publishes the path and mode
        deadline = time.monotonic() + timeout
        failures = []
        for index in range(control.nvcpus):
            proc = self.processes[index]
            while int(status[index, ST_FAULTS]) != seq:
                if not proc.is_alive():
                    raise PostcopyError(f"vCPU {index} (pid {proc.pid}) died with exit code "
                                        f"{proc.exitcode} while {what}")
                if time.monotonic() > deadline:
                    raise PostcopyError(f"vCPU {index} (pid {proc.pid}) did not finish "
                                        f"{what} within {timeout} s")
                time.sleep(POLL_INTERVAL / 2)
            code = int(status[index, ST_FAULTS_ERR])
            if code:
                reason = control.faults_reason(index) or describe_error(code)
                failures.append(f"vCPU {index} (pid {proc.pid}): {reason}")
        return failures

    def set_throttle(self, percentage: int) -> None:
        """auto-converge: every vCPU sleeps this share of its time (0: none)."""
        self.control.words[THROTTLE] = max(0, min(int(percentage), 99))

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
