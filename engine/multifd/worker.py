"""What every multifd worker process does around its own loop.

A worker connects a DEALER to its coordinator's ROUTER under its routing id
(set before connect, so the coordinator can address it at once), and
whatever ends it, it tries to say why (ERROR) before it exits non-zero: the
coordinator names the channel in the migration's error.
"""
from __future__ import annotations

import contextlib

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
        text = str(exc) if role == "receive" else f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            sock.send_multipart(ctl.Error(text).frames())
        raise SystemExit(f"multifd {role} worker {index}: {text}") from None
    finally:
        sock.close(linger=1000)
        zctx.term()
