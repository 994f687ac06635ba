"""The fault handler's end of the postcopy preempt channel (QEMU's
postcopy_preempt_thread on the destination).

With ``postcopy-preempt`` the source sends the pages vCPUs asked for on a
channel of their own, so that an urgent page does not queue behind the
background scan on the main channel.  The fault handler reads it in its
poll loop, non-blocking: :class:`PreemptReader` turns the bytes into page
records for the loop to place.  The channel carries RAM records only
(QEMU's ``ram_load_postcopy`` on its own QEMUFile): a page, a zero page, an
EOS when no urgent page can follow; anything else is a protocol error.
"""
from __future__ import annotations

import socket
from typing import Callable, Sequence

from engine.errors import RemoteProtocolError
from engine.stream.decoder import StreamDecoder
from engine.stream.events import NEED_DATA, RamBlockInfo, RamEOS, RamPage, RamZero

__all__ = ["PreemptReader", "CHANNEL"]

#: the channel's name in errors and traces
CHANNEL = "postcopy preempt"
#: bytes read from the channel per poll round
PREEMPT_READ = 256 * 1024


class PreemptReader:
    """Reads one preempt channel (*sock*, which it owns) and hands each page
    record (:class:`RamPage` or :class:`RamZero`) to *on_page*.

    :attr:`ended` is set at the channel's EOS, its end or a break (then the
    source makes a new channel after recovery; a record cut short is
    dropped, as QEMU does).
    """

    def __init__(self, sock: socket.socket, page_size: int, blocks: Sequence[RamBlockInfo],
                 on_page: Callable[[RamPage | RamZero], None]):
        self.sock = sock
        self.ended = False
        self._on_page = on_page
        self._decoder = StreamDecoder(_no_vmsd, page_size=page_size, channel=CHANNEL,
                                      ram_records_only=True, ram_blocks=list(blocks))
        self._buf = bytearray(PREEMPT_READ)
        self._view = memoryview(self._buf)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bool:
        """Read what is there and place its records; False when nothing was
        (no byte waiting, or the channel ended)."""
        if self.ended:
            return False
        try:
            n = self.sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            n = 0
        if n == 0:
            self.ended = True
            return False
        dec = self._decoder
        dec.feed(self._view[:n])
        on_page = self._on_page
        while True:
            ev = dec.next_event()
            if ev is NEED_DATA:
                return True
            kind = type(ev)
            if kind is RamPage or kind is RamZero:
                on_page(ev)
            elif kind is RamEOS:
                self.ended = True
                return False
            else:
                raise RemoteProtocolError(
                    f"{kind.__name__} on the postcopy preempt channel (only page records "
                    f"belong there)", dec.offset, CHANNEL)

    def close(self) -> None:
        self.sock.close()


def _no_vmsd(idstr: str, instance_id: int):
    return None
