"""Whether the other end of a channel has gone, without reading from it."""
from __future__ import annotations

import select
import socket

__all__ = ["peer_closed"]


def peer_closed(channel) -> bool:
    """Whether the other end of ``channel`` has closed or reset it (never blocks)."""
    try:
        fd = channel.fileno()
    except Exception:       # noqa: BLE001 - a channel with no descriptor: cannot tell
        return False
    if fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLRDHUP)
    events = dict(poller.poll(0)).get(fd, 0)
    if events & (select.POLLHUP | select.POLLERR | select.POLLRDHUP):
        return True
    if not events & select.POLLIN:
        return False
    sock = socket.socket(fileno=fd)     # borrowed: detached below, never closed
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True         # reset
    finally:
        sock.detach()
