"""Whether the other end of a channel has gone, without reading from it, and
what to tell the user when it has."""
from __future__ import annotations

import select
import socket

__all__ = ["peer_closed", "destination_gave_up"]


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


def destination_gave_up(exc: BaseException, early_modern_multifd: bool) -> BaseException:
    """*exc* (a channel error) retold as the destination giving up, which it
    did when it closed the channel under us.  *early_modern_multifd*: the
    likeliest rejection that early, of today's multifd stream by a QEMU
    before 8.1 (it refuses the setup section's MULTIFD_FLUSH, 0x200), is named
    with its cure."""
    why = f"{exc} (the destination gave up: it rejected the stream or failed; its log says why"
    if early_modern_multifd:
        why += ("; a QEMU older than 8.1 refuses today's multifd stream: use --machine "
                "none-7.2 (or --global migration.multifd-flush-after-each-section=on with "
                "zero-page-detection=legacy)")
    err = type(exc)(why + ")")
    err.__cause__ = exc
    return err
