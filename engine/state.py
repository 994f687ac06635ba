"""The migration status machine (QEMU's ``MigrationStatus``).

Theory of operation
-------------------

A migration is always in exactly one :class:`MigrationStatus`, spelled as
QEMU spells it on QMP (``active``, ``postcopy-paused``, ...), so that a
``query-migrate`` from us and one from QEMU can be compared word for word.

Two rules keep this module auditable, in the manner of h11's ``_state.py``:

1. **Every legal move is in a table.**  :data:`SOURCE_TRANSITIONS` and
   :data:`DESTINATION_TRANSITIONS` map each status to the frozenset of
   statuses that may follow it.  Nothing else in the engine decides whether
   a move is legal; :class:`MigrationState` only looks the edge up, and
   :func:`diagram` draws the tables, so the picture cannot drift from the
   code.  A move that is not in the table raises
   :class:`~engine.errors.StateError` - it is always a bug or a command
   issued in the wrong state, never something to paper over.

2. **The tables do not know what triggers a move.**  The migration loop,
   the return-path thread and the control commands (``migrate_cancel``,
   ``migrate-continue``, ``migrate-pause``, ...) decide *when* to move;
   this module only says *whether* they may.

The source side (spec 4.2) reads, from top to bottom, like the life of an
outgoing migration::

    none -> setup [-> wait-unplug] -> active [-> pre-switchover] -> device
         -> completed                                          (precopy)
         -> postcopy-device -> postcopy-active -> completed    (postcopy,
                                                                return path)
         -> postcopy-active -> completed                       (postcopy,
                                                                no return path)

with three ways out:

* ``migrate_cancel`` moves any running *non-postcopy* status to
  ``cancelling`` and cleanup then to ``cancelled``.  Once the destination
  runs the guest (any ``postcopy-*`` status) cancelling would lose it, so
  QEMU refuses it there, and so does the table.
* An error moves any running non-postcopy status to ``failed``; the source
  still owns the authoritative guest and resumes it.  ``postcopy-device``
  counts as non-postcopy for this purpose (the destination has not started
  the guest yet: spec 4.4).  ``cancelling`` does not fail: the cancel wins.
* An error in ``postcopy-active`` cannot fail the migration - half of the
  guest's memory is on each side - so it pauses instead
  (``postcopy-paused``), and recovery (``postcopy-recover-setup`` ->
  ``postcopy-recover``) either brings it back to ``postcopy-active`` or
  falls back to ``postcopy-paused`` to be retried.

``completed``, ``failed`` and ``cancelled`` end a migration, but the source
process lives on, and QEMU lets the user migrate the same VM again (after a
failure, a cancel, or a ``cont`` after completion).  That new attempt is
modelled as the edges ``completed/failed/cancelled -> setup``.

The destination side (spec 4.3) is one-shot: a process started to receive
one migration, which ends ``completed`` or ``failed``.  It never sees
``cancelling``/``cancelled`` (a cancelled source just closes the stream, and
the destination fails), nor the source-only switchover statuses.  One edge
is ours rather than QEMU's: ``setup -> failed``.  QEMU keeps listening if a
channel handshake goes wrong; our destination is a process that owns its
listening socket and must report and exit instead.

``colo`` is entered from ``device`` when the ``x-colo`` capability makes
the completed migration go on as a COLO checkpoint loop; the engine refuses
that capability, but the edge is kept so the table is QEMU's.

Statuses a role never enters still have a (empty) row, so a lookup never
raises ``KeyError``.
"""
from __future__ import annotations

import threading
import time
from enum import Enum
from types import MappingProxyType
from typing import Callable, Literal, Mapping

from engine.trace import trace

from engine.errors import StateError, UnexpectedStateError

__all__ = [
    "MigrationStatus",
    "SOURCE_TRANSITIONS",
    "DESTINATION_TRANSITIONS",
    "ACTIVE_STATES",
    "POSTCOPY_STATES",
    "TERMINAL_STATES",
    "CANCELLABLE_STATES",
    "MigrationState",
    "UnexpectedStateError",
    "transitions_for",
    "diagram",
]


class MigrationStatus(str, Enum):
    """QEMU's ``MigrationStatus``; the value is the QMP string.

    Declared in QEMU 10.2's enum order (ordinals shifted in 10.2 when
    ``postcopy-device`` was inserted, which is why only the strings matter).
    """

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_DEVICE = "postcopy-device"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"

    def __str__(self) -> str:
        # f-strings and error messages should show 'active', not the member.
        return self.value


_S = MigrationStatus

# fmt: off
SOURCE_TRANSITIONS: Mapping[MigrationStatus, frozenset[MigrationStatus]] = MappingProxyType({
    _S.NONE:                   frozenset({_S.SETUP}),
    _S.SETUP:                  frozenset({_S.WAIT_UNPLUG, _S.ACTIVE, _S.CANCELLING, _S.FAILED}),
    _S.WAIT_UNPLUG:            frozenset({_S.ACTIVE, _S.CANCELLING, _S.FAILED}),
    _S.ACTIVE:                 frozenset({_S.PRE_SWITCHOVER, _S.DEVICE, _S.CANCELLING, _S.FAILED}),
    _S.PRE_SWITCHOVER:         frozenset({_S.DEVICE, _S.CANCELLING, _S.FAILED}),
    _S.DEVICE:                 frozenset({_S.COMPLETED, _S.POSTCOPY_DEVICE, _S.POSTCOPY_ACTIVE,
                                          _S.COLO, _S.CANCELLING, _S.FAILED}),
    _S.POSTCOPY_DEVICE:        frozenset({_S.POSTCOPY_ACTIVE, _S.FAILED}),
    # failed from a postcopy state: an error that is not a broken channel
    # (QEMU's migration_detect_error), or the source giving up (Ctrl-C); the
    # guest then lives on the destination and the source's copy is stale.
    _S.POSTCOPY_ACTIVE:        frozenset({_S.POSTCOPY_PAUSED, _S.COMPLETED, _S.FAILED}),
    _S.POSTCOPY_PAUSED:        frozenset({_S.POSTCOPY_RECOVER_SETUP, _S.FAILED}),
    _S.POSTCOPY_RECOVER_SETUP: frozenset({_S.POSTCOPY_RECOVER, _S.POSTCOPY_PAUSED, _S.FAILED}),
    _S.POSTCOPY_RECOVER:       frozenset({_S.POSTCOPY_ACTIVE, _S.POSTCOPY_PAUSED, _S.FAILED}),
    _S.COLO:                   frozenset({_S.COMPLETED, _S.FAILED}),
    _S.CANCELLING:             frozenset({_S.CANCELLED}),
    # A new migration of the same VM starts over from an ended one.
    _S.COMPLETED:              frozenset({_S.SETUP}),
    _S.FAILED:                 frozenset({_S.SETUP}),
    _S.CANCELLED:              frozenset({_S.SETUP}),
})
"""Legal source-side moves (spec 4.2): status -> statuses that may follow."""

DESTINATION_TRANSITIONS: Mapping[MigrationStatus, frozenset[MigrationStatus]] = MappingProxyType({
    _S.NONE:                   frozenset({_S.SETUP}),
    # setup -> failed is ours, not QEMU's: see the module docstring.
    _S.SETUP:                  frozenset({_S.ACTIVE, _S.FAILED}),
    _S.ACTIVE:                 frozenset({_S.COMPLETED, _S.POSTCOPY_DEVICE, _S.POSTCOPY_ACTIVE,
                                          _S.FAILED}),
    _S.POSTCOPY_DEVICE:        frozenset({_S.POSTCOPY_ACTIVE, _S.FAILED}),
    _S.POSTCOPY_ACTIVE:        frozenset({_S.POSTCOPY_PAUSED, _S.COMPLETED, _S.FAILED}),
    _S.POSTCOPY_PAUSED:        frozenset({_S.POSTCOPY_RECOVER}),
    _S.POSTCOPY_RECOVER:       frozenset({_S.POSTCOPY_ACTIVE, _S.POSTCOPY_PAUSED}),
    # Never entered by a destination.
    _S.POSTCOPY_RECOVER_SETUP: frozenset(),
    _S.WAIT_UNPLUG:            frozenset(),
    _S.PRE_SWITCHOVER:         frozenset(),
    _S.DEVICE:                 frozenset(),
    _S.COLO:                   frozenset(),
    _S.CANCELLING:             frozenset(),
    _S.CANCELLED:              frozenset(),
    # One migration per destination process.
    _S.COMPLETED:              frozenset(),
    _S.FAILED:                 frozenset(),
})
"""Legal destination-side moves (spec 4.3): status -> statuses that may follow."""
# fmt: on

POSTCOPY_STATES: frozenset[MigrationStatus] = frozenset({
    _S.POSTCOPY_DEVICE, _S.POSTCOPY_ACTIVE, _S.POSTCOPY_PAUSED,
    _S.POSTCOPY_RECOVER_SETUP, _S.POSTCOPY_RECOVER,
})
"""Statuses in which the switch to postcopy has happened."""

ACTIVE_STATES: frozenset[MigrationStatus] = frozenset({
    _S.SETUP, _S.WAIT_UNPLUG, _S.ACTIVE, _S.PRE_SWITCHOVER, _S.DEVICE,
}) | POSTCOPY_STATES
"""Statuses in which a migration is under way (capabilities are frozen)."""

TERMINAL_STATES: frozenset[MigrationStatus] = frozenset({
    _S.COMPLETED, _S.FAILED, _S.CANCELLED,
})
"""Statuses that end a migration."""

CANCELLABLE_STATES: frozenset[MigrationStatus] = frozenset(
    s for s, nxt in SOURCE_TRANSITIONS.items() if _S.CANCELLING in nxt)
"""Source statuses from which ``migrate_cancel`` may move to ``cancelling``."""

Role = Literal["source", "destination"]


def transitions_for(role: str) -> Mapping[MigrationStatus, frozenset[MigrationStatus]]:
    """The transition table of ``role`` (``"source"`` or ``"destination"``)."""
    if role == "source":
        return SOURCE_TRANSITIONS
    if role == "destination":
        return DESTINATION_TRANSITIONS
    raise ValueError(f"role must be 'source' or 'destination', not {role!r}")


def _as_status(value: MigrationStatus | str) -> MigrationStatus:
    try:
        return MigrationStatus(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a migration status") from None


class MigrationState:
    """The status of one side of one migration, moved only along the table.

    Thread-safe: the migration loop moves it while the return-path thread
    and the QMP server read it (or move it, e.g. ``postcopy-device`` ->
    ``postcopy-active`` when PONG arrives).

    ``on_change(old, new)`` is called for each move, under the state's lock
    so that callbacks see moves in order; it may read the state but must not
    block on another thread that would need it.  ``clock`` supplies the
    timestamps of :attr:`history` (seconds, as :func:`time.monotonic`).
    """

    def __init__(self, role: Role,
                 on_change: Callable[[MigrationStatus, MigrationStatus], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._table = transitions_for(role)
        self.role: str = role
        self._on_change = on_change
        self._clock = clock
        # RLock: on_change runs under the lock and may read .status.
        self._cond = threading.Condition(threading.RLock())
        self._status = MigrationStatus.NONE
        self._history: list[tuple[float, MigrationStatus]] = [(clock(), self._status)]

    def __repr__(self) -> str:
        return f"<MigrationState {self.role} {self._status.value}>"

    @property
    def status(self) -> MigrationStatus:
        """The current status."""
        with self._cond:
            return self._status

    @property
    def status_nowait(self) -> MigrationStatus:
        """The current status without taking the lock: one attribute load, which
        is atomic, for per-record checks on a hot path (an RLock per record
        costs more than the check)."""
        return self._status

    @property
    def history(self) -> list[tuple[float, MigrationStatus]]:
        """A copy of every ``(time, status)`` entered, starting with ``none``."""
        with self._cond:
            return list(self._history)

    def can_transition(self, new: MigrationStatus | str) -> bool:
        """Whether moving to ``new`` now would be legal."""
        new = _as_status(new)
        with self._cond:
            return new in self._table[self._status]

    def transition(self, new: MigrationStatus | str) -> None:
        """Move to ``new``; raise :class:`StateError` if the table forbids it."""
        new = _as_status(new)
        with self._cond:
            self._move(new)

    def compare_and_transition(self, expected: MigrationStatus | str,
                               new: MigrationStatus | str) -> bool:
        """Move to ``new`` only if the status is still ``expected``.

        QEMU's ``migrate_set_state(old, new)``: when two threads race (the
        migration loop failing while ``migrate_cancel`` arrives), the loser
        sees ``False`` and leaves the winner's status alone.  The edge
        ``expected -> new`` must be legal, whether or not the move happens,
        so that a wrong call is caught even when it loses the race.
        """
        expected, new = _as_status(expected), _as_status(new)
        with self._cond:
            if new not in self._table[expected]:
                raise StateError(expected.value, new.value, self.role)
            if self._status is not expected:
                return False
            self._move(new)
            return True

    def _move(self, new: MigrationStatus) -> None:
        old = self._status
        if new not in self._table[old]:
            raise StateError(old.value, new.value, self.role)
        self._status = new
        self._history.append((self._clock(), new))
        trace("migrate_set_state", role=self.role, old=old.value, new=new.value)
        self._cond.notify_all()
        if self._on_change is not None:
            self._on_change(old, new)

    def expect(self, *statuses: MigrationStatus | str) -> MigrationStatus:
        """Return the status if it is one of ``statuses``, else raise.

        The guard of commands that name the status they expect, like
        ``migrate-continue state=pre-switchover``.  Raises
        :class:`UnexpectedStateError` (a :class:`StateError`).
        """
        wanted = [_as_status(s) for s in statuses]
        with self._cond:
            if self._status not in wanted:
                raise UnexpectedStateError(self._status.value,
                                           [s.value for s in wanted], self.role)
            return self._status

    def wait_for(self, *statuses: MigrationStatus | str,
                 timeout: float | None = None) -> MigrationStatus | None:
        """Block until the status is one of ``statuses``; return it.

        Returns ``None`` if ``timeout`` (seconds) passes first.
        """
        wanted = {_as_status(s) for s in statuses}
        with self._cond:
            if self._cond.wait_for(lambda: self._status in wanted, timeout):
                return self._status
            return None

    def is_active(self) -> bool:
        """True while a migration is under way (see :data:`ACTIVE_STATES`)."""
        return self.status in ACTIVE_STATES

    def is_postcopy(self) -> bool:
        """True once the migration switched to postcopy and has not ended."""
        return self.status in POSTCOPY_STATES

    def is_terminal(self) -> bool:
        """True in ``completed``, ``failed`` or ``cancelled``."""
        return self.status in TERMINAL_STATES


def diagram(role: str | None = None) -> str:
    """Graphviz ``dot`` text of the transition tables, generated from them.

    ``role`` selects one table; by default both are drawn as two clusters.
    Statuses a role never enters are left out of its cluster.
    """
    roles = [role] if role is not None else ["source", "destination"]
    lines = ["digraph migration_status {", "    rankdir=LR;",
             '    node [shape=box, style=rounded, fontname="monospace"];']
    for r in roles:
        table = transitions_for(r)
        used = {s for s, nxt in table.items() if nxt} | {
            n for nxt in table.values() for n in nxt}
        prefix = r[0]
        lines.append(f"    subgraph cluster_{r} {{")
        lines.append(f'        label="{r}";')
        for s in MigrationStatus:
            if s in used:
                shape = ", peripheries=2" if s in TERMINAL_STATES else ""
                lines.append(f'        {prefix}_{s.name} [label="{s.value}"{shape}];')
        for s in MigrationStatus:
            for n in sorted(table[s], key=list(MigrationStatus).index):
                lines.append(f"        {prefix}_{s.name} -> {prefix}_{n.name};")
        lines.append("    }")
    lines.append("}")
    return "\n".join(lines) + "\n"
