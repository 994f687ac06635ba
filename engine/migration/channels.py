"""Telling incoming connections apart (QEMU's migration_ioc_process_incoming).

A destination expecting multifd accepts connections until it has the main
channel and every multifd channel, in whatever order they arrive.  It peeks
at the first four bytes: the stream magic ``QEVM`` marks the main channel,
``MULTIFD_MAGIC`` a multifd channel, whose 64-byte MultiFDInit then says
which channel it is.
"""
from __future__ import annotations

import struct

from engine.errors import RemoteProtocolError
from engine.multifd.packet import MULTIFD_INIT_SIZE, MULTIFD_MAGIC, MultiFDInit
from engine.stream.constants import QEMU_VM_FILE_MAGIC
from engine.transport import Channel, Listener

#: The VM's UUID.  A guest here has none (QEMU's default is all zeros), and
#: QEMU's destination requires the channels' UUID to equal its own.
NULL_UUID = bytes(16)


def accept_channels(listener: Listener, multifd_channels: int, timeout: float | None = None,
                    uuid: bytes = NULL_UUID) -> tuple[Channel, dict[int, Channel]]:
    """Accept the main channel and ``multifd_channels`` multifd channels.

    Returns ``(main, {channel_id: Channel})``; the multifd channels have had
    their MultiFDInit consumed.  Raises RemoteProtocolError for a connection
    that is neither, a duplicate or out-of-range channel id, or a UUID
    mismatch; the channels accepted so far are closed first.
    """
    main: Channel | None = None
    multifd: dict[int, Channel] = {}
    try:
        while main is None or len(multifd) < multifd_channels:
            ch = listener.accept(timeout=timeout)
            if not multifd_channels:
                return ch, {}
            try:
                magic = struct.unpack(">I", ch.peek(4))[0]
            except Exception:
                ch.close()
                raise
            if magic == QEMU_VM_FILE_MAGIC and main is None:
                main = ch
                continue
            if magic != MULTIFD_MAGIC:
                ch.close()
                raise RemoteProtocolError(
                    f"unknown channel magic 0x{magic:08x} (expected QEVM or multifd "
                    f"0x{MULTIFD_MAGIC:08x})", 0, ch.name)
            raw = ch.read_exactly(MULTIFD_INIT_SIZE)
            # Named by the id it claims (byte 24) even when its version is wrong.
            init = MultiFDInit.unpack(raw, channel=f"multifd {raw[24]} on {ch.name}")
            name = f"multifd {init.channel_id}"
            if init.uuid != uuid:
                ch.close()
                raise RemoteProtocolError(
                    f"multifd: received uuid '{init.uuid.hex()}' and expected "
                    f"'{uuid.hex()}'", 8, name)
            if init.channel_id >= multifd_channels or init.channel_id in multifd:
                ch.close()
                raise RemoteProtocolError(
                    f"multifd: channel id {init.channel_id} is "
                    + ("out of range" if init.channel_id >= multifd_channels else "a duplicate")
                    + f" (multifd-channels is {multifd_channels})", 24, name)
            multifd[init.channel_id] = ch
        return main, multifd
    except BaseException:
        if main is not None:
            main.close()
        for ch in multifd.values():
            ch.close()
        raise
