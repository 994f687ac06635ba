"""The lock the coordinator and the fault handler share (placement and return-path writes)."""
from __future__ import annotations

import fcntl
import os
import threading

__all__ = ["FileLock"]


class FileLock:
    """A lock shared by processes: ``flock`` on a file in the handler's
    private directory, plus a thread lock for threads of one process.

    Chosen over ``multiprocessing.Lock`` because the kernel drops an
    ``flock`` when its holder dies (a killed coordinator cannot leave the
    handler blocked on the lock), and it leaves no named semaphore behind
    in /dev/shm when a process is killed.  Picklable: each process opens
    the file itself.
    """

    def __init__(self, path: str):
        self.path = path
        open(path, "a").close()
        self._fd: int | None = None
        self._thread_lock = threading.Lock()

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._fd = None
        self._thread_lock = threading.Lock()

    def __enter__(self):
        self._thread_lock.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc):
        try:
            # __enter__ opened it; no second test per placement
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # type: ignore[arg-type]
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
