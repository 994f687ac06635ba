import os
import sys


def run() -> int:
    """The ``engine`` command.

    The command's process does no linear algebra, so numpy's OpenBLAS gets one
    thread instead of one per core that busy-waits after import (see
    engine.procs); set before anything imports numpy.  glibc keeps its heap
    (engine.procs.keep_heap): a coordinator allocates and frees megabytes per
    batch, and memory handed back to the kernel costs a page fault per 4 KiB
    when it is taken again (on a VM whose host reclaims freed pages, about
    8 us each).  A library user's process is left alone.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import ctypes
    from engine.procs import keep_heap
    keep_heap(ctypes.CDLL(None))
    from engine.cli import main
    return main()


if __name__ == "__main__":
    sys.exit(run())
