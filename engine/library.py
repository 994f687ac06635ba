"""Migrate your own program's shared memory, live.

The command line migrates a synthetic guest; this module is for programs
whose state already lives in shared memory (a numpy array over a
``SharedMemory`` segment, say) and that want to move it to another process
or host while they keep writing to it.

The program's writer threads play the part of vCPUs.  They follow the
dirty-log contract -- store, then ``log.mark(page)`` -- and take a
:class:`WriteGate` around each write, so the migration can stop them for the
switchover (QEMU's vm_stop) and let them go again if the migration fails.

Sending side::

    gate = WriteGate()
    # in every writer thread:
    with gate:
        arr[i] = value
        log.mark(i * arr.itemsize // 4096)
    # in the migrating thread:
    info = migrate(guest, "tcp:otherhost:4444", gate=gate)

Receiving side::

    guest, info = receive("tcp:0.0.0.0:4444")
    arr = guest.block("state").array.view(np.float64)
"""
from __future__ import annotations

import threading
from typing import Mapping

from engine.errors import MigrationError
from engine.machine import get_profile
from engine.migration.destination import DestinationMigration
from engine.migration.source import SourceMigration
from engine.options import MigrationOptions
from engine.ram.seams import SourceGuest
from engine.stats import MigrationInfo
from engine.transport import connect, listen

__all__ = ["WriteGate", "migrate", "receive", "make_options"]


class WriteGate:
    """Lets writer threads run until the migration needs memory to hold still.

    ``with gate:`` around each write (store and dirty mark together).
    :meth:`close` blocks new writes and returns once the writes in progress
    have finished; :meth:`open` lets writers continue.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._writing = 0

    def __enter__(self) -> "WriteGate":
        with self._cond:
            while not self._open:
                self._cond.wait()
            self._writing += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._writing -= 1
            if self._writing == 0:
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._open = False
            while self._writing:
                self._cond.wait()

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    @property
    def is_open(self) -> bool:
        return self._open


class _GatedGuest:
    """A guest whose "vCPUs" are the program's threads behind a WriteGate."""

    def __init__(self, guest: SourceGuest, gate: WriteGate):
        self._guest, self._gate = guest, gate

    def __getattr__(self, name):
        return getattr(self._guest, name)

    @property
    def running(self) -> bool:
        return self._gate.is_open

    def stop(self, timeout: float = 10.0) -> None:
        self._gate.close()

    def start(self) -> None:
        self._gate.open()


def make_options(capabilities: Mapping[str, bool] | None = None,
                 parameters: Mapping[str, object] | None = None) -> MigrationOptions:
    """QEMU-named capabilities and parameters, validated."""
    opts = MigrationOptions.default()
    if capabilities:
        opts = opts.with_capabilities(dict(capabilities))
    if parameters:
        opts = opts.with_parameters(dict(parameters))
    return opts


def migrate(guest: SourceGuest, uri: str, *, gate: WriteGate | None = None,
            options: MigrationOptions | None = None, machine: str = "engine",
            connect_timeout: float = 30) -> MigrationInfo:
    """Migrate ``guest`` to a destination listening on ``uri``; blocks until done.

    Returns the final query-migrate record (``status`` is ``completed``,
    ``failed`` or ``cancelled``; the source's memory is never modified, and
    writers are let go again if the migration did not complete).
    """
    target = guest if gate is None else _GatedGuest(guest, gate)
    mig = SourceMigration(target, get_profile(machine), options or make_options(),
                          vcpus=getattr(guest, "nvcpus", 0),
                          runstate="running" if target.running else "paused")
    with connect(uri, timeout=connect_timeout) as channel:
        info = mig.run(channel)
    if info.status == "completed" and gate is not None:
        # The program's writers now belong to the destination: the source
        # stays stopped, as QEMU's does after a completed migration.
        pass
    return info


def receive(uri: str, *, options: MigrationOptions | None = None, machine: str = "engine",
            vcpus: int = 0, mem_path: str | None = None, timeout: float | None = None,
            on_listening=None):
    """Wait on ``uri`` for one migration; returns ``(guest, info)``.

    The guest is built from the block list the stream announces (the first
    block file-backed at ``mem_path`` if given); the caller owns it and must
    ``close()`` it.  Raises :class:`MigrationError` if the migration failed.
    """
    from engine.ram.guest import Guest

    made: list = []

    def factory(announced):
        blocks = [(b.idstr, b.used_length, mem_path if i == 0 else None)
                  for i, b in enumerate(announced.blocks)]
        made.append(Guest.create(blocks, vcpus=vcpus, start=False))
        return made[-1]

    with listen(uri) as listener:
        if on_listening is not None:
            on_listening(listener.uri)
        channel = listener.accept(timeout=timeout)
    mig = DestinationMigration(get_profile(machine), options or make_options(),
                               guest_factory=factory, vcpus=vcpus, resume=False)
    with channel:
        info = mig.run(channel)
    if info.status != "completed":
        for g in made:
            g.close()
        raise MigrationError(f"incoming migration {info.status}: {info.error_desc}")
    return made[0], info
