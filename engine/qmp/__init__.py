"""QEMU's Machine Protocol (QMP), as QEMU 10.2 speaks it, for an engine guest:
``engine vm``'s monitor.

* :mod:`engine.qmp.errors` - QEMU's error classes and :class:`QMPError`.
* :mod:`engine.qmp.protocol` - sans-I/O server connection: greeting,
  capabilities negotiation, JSON framing, replies, errors, events, OOB.
* :mod:`engine.qmp.schema` - argument checking with QEMU's error texts.
* :mod:`engine.qmp.channels` - ``migrate``'s ``channels`` argument: QEMU's
  MigrationChannel, checked and turned into the engine's URIs.
* :mod:`engine.qmp.server` - threads and sockets around the protocol: many
  clients on ``unix:`` or ``tcp:``, in-band commands in order, OOB at once,
  events to every negotiated client.
* :mod:`engine.qmp.runstate` - QEMU's VM run states (``query-status``).
* :mod:`engine.qmp.machine` - the VM behind the monitor: one guest, its
  run state, outgoing and incoming migrations, the events they raise.
* :mod:`engine.qmp.commands` - the command table (QEMU's names, arguments
  and return shapes) mapping requests to the machine.
* :mod:`engine.qmp.yank` - ``yank`` for the multifd channels, which are
  sockets of worker processes.
* :mod:`engine.qmp.client` - a small synchronous client (``engine info``).
"""
from __future__ import annotations

from engine.qmp.errors import (QMPError, ERROR_CLASS_COMMAND_NOT_FOUND,
                               ERROR_CLASS_GENERIC)

__all__ = ["QMPError", "ERROR_CLASS_GENERIC", "ERROR_CLASS_COMMAND_NOT_FOUND"]
