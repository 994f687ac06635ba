"""Child processes of a coordinator: vCPUs and multifd workers.

Two rules hold for every one of them.  Ctrl-C belongs to the coordinator
(it cancels the migration and cleans up), so children ignore SIGINT; and a
child never outlives its coordinator, so it asks the kernel for SIGKILL when
the parent goes away.  Children start with ``spawn``: no zmq context, numpy
state or lock is inherited across fork.

A child also starts with ``OPENBLAS_NUM_THREADS=1`` unless the caller set it.
No child does linear algebra, but numpy's OpenBLAS starts a thread per core
at import, and each busy-waits for work for about 0.1 s of CPU before it
sleeps: on a small host that is CPU taken from the migration the child was
started for.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import threading

_PR_SET_PDEATHSIG = 1
# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# The only way to give a spawned child an environment is os.environ at
# start(); the lock keeps two spawning threads from restoring it out of order.
_ENV_LOCK = threading.Lock()
_CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1"}


def child_setup(parent_pid: int) -> None:
    """First thing a child does: ignore SIGINT, die with the parent, keep its heap."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # PR_SET_PDEATHSIG fires when the thread that forked us exits; the getppid
    # check covers a parent that died before prctl took effect.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)
    keep_heap(libc)
    # A child runs one loop whose garbage is acyclic (buffers, views, small
    # arrays): the cycle collector would only rescan numpy's and zmq's objects.
    gc.freeze()
    gc.disable()
    from engine.trace import enable_from_env
    enable_from_env()


def keep_heap(libc) -> None:
    """Stop glibc handing the heap back to the kernel after every packet.

    A worker allocates and frees a few hundred KiB per packet (codec output,
    numpy temporaries).  With glibc's defaults the free shrinks the heap
    (brk) and the next packet grows it again, so the kernel zeroes and maps
    those pages anew each time: measured, about 5% of a zstd sender's CPU.
    Blocks up to 32 MiB now come from the heap, which keeps what it had.
    Elsewhere than glibc ``mallopt`` may be missing or ignore these.
    """
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def spawn(target, args: tuple, name: str) -> multiprocessing.Process:
    """Start ``target(*args)`` in a new spawned process (a daemon).

    SIGINT is blocked while the child starts, so a Ctrl-C during its start-up
    cannot kill it half-way; it stays pending for us until the mask returns.
    """
    ctx = multiprocessing.get_context("spawn")
    with _ENV_LOCK:
        added = [key for key in _CHILD_ENV if key not in os.environ]
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for key in added:
                os.environ[key] = _CHILD_ENV[key]
            proc = ctx.Process(target=target, args=args, name=name, daemon=True)
            proc.start()
        finally:
            for key in added:
                os.environ.pop(key, None)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return proc


@contextlib.contextmanager
def no_cycle_collection():
    """The cycle collector off for a migration's loop, as it was afterwards.

    A batch makes thousands of short-lived objects (two views per page): the
    collector ran a generation scan every few hundred of them, and now and
    then a full one over every object of the process, about 5% of a source's
    CPU.  Nothing in these loops makes reference cycles worth collecting
    meanwhile.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class CpuMeter:
    """CPU seconds (user + system) one side of a migration spends from
    :meth:`start` to :meth:`stop`: this process and its helper processes
    (multifd workers, the fault handler), not the guest's vCPUs, whose time
    is the guest's own.

    ``helpers()`` lists the helpers' pids when asked.  One that exits and is
    reaped in between still counts: its time moves to this process's
    ``children`` times, which are counted too (which is also why vCPUs reaped
    meanwhile, rare, would count).
    """

    def __init__(self, helpers):
        self._helpers = helpers
        self._start: float | None = None
        self.seconds: float | None = None

    def _now(self) -> float:
        import psutil
        me = psutil.Process()
        t = me.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for pid in self._helpers():
            try:
                h = psutil.Process(pid).cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue            # reaped: counted in children_* above
            total += h.user + h.system
        return total

    def start(self) -> None:
        self._start = self._now()
        self.seconds = None

    def stop(self) -> float | None:
        """The CPU seconds since :meth:`start` (None if it never started)."""
        if self._start is not None and self.seconds is None:
            self.seconds = max(0.0, self._now() - self._start)
        return self.seconds
