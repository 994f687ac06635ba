"""Child processes of a coordinator: vCPUs and multifd workers.

Two rules hold for every one of them.  Ctrl-C belongs to the coordinator
(it cancels the migration and cleans up), so children ignore SIGINT; and a
child never outlives its coordinator, so it asks the kernel for SIGKILL when
the parent goes away.  Children start with ``spawn``: no zmq context, numpy
state or lock is inherited across fork.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal

_PR_SET_PDEATHSIG = 1


def child_setup(parent_pid: int) -> None:
    """First thing a child does: ignore SIGINT, die with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # PR_SET_PDEATHSIG fires when the thread that forked us exits; the getppid
    # check covers a parent that died before prctl took effect.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def spawn(target, args: tuple, name: str) -> multiprocessing.Process:
    """Start ``target(*args)`` in a new spawned process (a daemon).

    SIGINT is blocked while the child starts, so a Ctrl-C during its start-up
    cannot kill it half-way; it stays pending for us until the mask returns.
    """
    ctx = multiprocessing.get_context("spawn")
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        proc = ctx.Process(target=target, args=args, name=name, daemon=True)
        proc.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return proc
