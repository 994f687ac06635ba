import os
import sys


def run() -> int:
    """The ``engine`` command.

    The command's process does no linear algebra, so numpy's OpenBLAS gets one
    thread instead of one per core that busy-waits after import (see
    engine.procs); set before anything imports numpy.  A library user's
    process is left alone.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from engine.cli import main
    return main()


if __name__ == "__main__":
    sys.exit(run())
