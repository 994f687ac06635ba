"""What every multifd worker process does around its own loop.

A worker connects a DEALER to its coordinator's ROUTER under its routing id
(set before connect, so the coordinator can address it at once), and
whatever ends it, it tries to say why (ERROR) before it exits non-zero: the
coordinator names the channel in the migration's error.

A worker that ended cleanly leaves with ``os._exit(0)`` once its socket has
delivered its last message: the interpreter's own teardown (numpy, zmq and
the rest, unloaded one by one) cost about 55 ms of CPU per worker, inside
the migration for destination workers, whose end the migration waits for.
"""
from __future__ import annotations

import contextlib
import os
import sys

from engine.multifd import control as ctl
from engine.procs import child_setup


@contextlib.contextmanager
def control_socket(endpoint: str, index: int, parent_pid: int, role: str,
                   failures: tuple = (Exception,)):
    """Set up the child, yield its DEALER; report ``failures`` as ERROR and exit 1."""
    import zmq

    child_setup(parent_pid)
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, ctl.worker_identity(index))
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(endpoint)
    try:
        yield sock
    except failures as exc:
        text = str(exc)
        with contextlib.suppress(Exception):
            sock.send_multipart(ctl.Error.of(exc).frames())
        raise SystemExit(f"multifd {role} worker {index}: {text}") from None
    finally:
        sock.close(linger=1000)
        zctx.term()
    # Reached only when the body returned: a clean end, everything released.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
