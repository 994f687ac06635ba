"""The VM's run state (QEMU's ``RunState``, what ``query-status`` reports).

Only the moves a monitored engine guest makes are in the table, each of
them one that QEMU's own table (runstate.c) allows too::

    prelaunch ---cont---> running <---cont--- paused, postmigrate
    running ---stop---> paused
    running, paused, prelaunch ---switchover---> finish-migrate
    finish-migrate ---completed---> postmigrate
    finish-migrate ---failed, cancelled---> running (it ran before) or postmigrate
    inmigrate ---incoming done---> running, paused, prelaunch, postmigrate
    anything ---quit---> shutdown

``-S`` starts in ``prelaunch``, ``--incoming`` in ``inmigrate``.  A move
outside the table raises :class:`~engine.errors.StateError`: a bug, never
something a client can cause.
"""
from __future__ import annotations

import threading
from enum import Enum
from types import MappingProxyType
from typing import Mapping

from engine.errors import StateError

__all__ = ["RunState", "RUNSTATE_TRANSITIONS", "RunStateMachine"]


class RunState(str, Enum):
    """QEMU's RunState; the value is the QMP string."""
    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"

    def __str__(self) -> str:
        return self.value


_R = RunState

# fmt: off
RUNSTATE_TRANSITIONS: Mapping[RunState, frozenset[RunState]] = MappingProxyType({
    _R.PRELAUNCH:      frozenset({_R.RUNNING, _R.FINISH_MIGRATE, _R.INMIGRATE, _R.SHUTDOWN}),
    _R.INMIGRATE:      frozenset({_R.RUNNING, _R.PAUSED, _R.PRELAUNCH, _R.POSTMIGRATE,
                                  _R.FINISH_MIGRATE, _R.SHUTDOWN}),
    _R.RUNNING:        frozenset({_R.PAUSED, _R.FINISH_MIGRATE, _R.SHUTDOWN,
                                  _R.INTERNAL_ERROR}),
    _R.PAUSED:         frozenset({_R.RUNNING, _R.FINISH_MIGRATE, _R.POSTMIGRATE,
                                  _R.PRELAUNCH, _R.SHUTDOWN}),
    _R.FINISH_MIGRATE: frozenset({_R.RUNNING, _R.PAUSED, _R.POSTMIGRATE, _R.PRELAUNCH,
                                  _R.SHUTDOWN}),
    _R.POSTMIGRATE:    frozenset({_R.RUNNING, _R.FINISH_MIGRATE, _R.PRELAUNCH, _R.SHUTDOWN}),
    _R.INTERNAL_ERROR: frozenset({_R.PAUSED, _R.RUNNING, _R.SHUTDOWN}),
    _R.SHUTDOWN:       frozenset(),
})
"""Run-state moves an engine VM makes: state -> states that may follow."""
# fmt: on


class RunStateMachine:
    """The current run state, moved only along :data:`RUNSTATE_TRANSITIONS`."""

    def __init__(self, initial: RunState):
        self._lock = threading.Lock()
        self._state = initial

    @property
    def state(self) -> RunState:
        with self._lock:
            return self._state

    def set(self, new: RunState) -> RunState:
        """Move to ``new`` (staying put is always allowed); returns the old state."""
        with self._lock:
            old = self._state
            if new is not old and new not in RUNSTATE_TRANSITIONS.get(old, frozenset()):
                raise StateError(old.value, new.value, "run state")
            self._state = new
            return old

    def is_running(self) -> bool:
        return self.state is RunState.RUNNING
