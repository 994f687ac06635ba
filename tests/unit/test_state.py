"""The migration status machine: tables, guarded moves, threads, diagram."""
from __future__ import annotations

import itertools
import re
import threading
from collections import deque

import pytest

from engine.errors import StateError
from engine.state import (
    ACTIVE_STATES,
    CANCELLABLE_STATES,
    DESTINATION_TRANSITIONS,
    POSTCOPY_STATES,
    SOURCE_TRANSITIONS,
    TERMINAL_STATES,
    MigrationState,
    MigrationStatus,
    UnexpectedStateError,
    diagram,
    transitions_for,
)

S = MigrationStatus
ROLES = ("source", "destination")

QMP_STRINGS = [
    "none", "setup", "cancelling", "cancelled", "active", "postcopy-device",
    "postcopy-active", "postcopy-paused", "postcopy-recover-setup",
    "postcopy-recover", "completed", "failed", "colo", "pre-switchover",
    "device", "wait-unplug",
]


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def path_to(role: str, target: MigrationStatus) -> list[MigrationStatus] | None:
    """Shortest list of moves from 'none' to target through the table."""
    table = transitions_for(role)
    prev: dict[MigrationStatus, MigrationStatus | None] = {S.NONE: None}
    queue = deque([S.NONE])
    while queue:
        s = queue.popleft()
        for n in sorted(table[s], key=list(S).index):
            if n not in prev:
                prev[n] = s
                queue.append(n)
    if target not in prev:
        return None
    moves = []
    while target is not S.NONE:
        moves.append(target)
        target = prev[target]
    return moves[::-1]


def state_at(role: str, target: MigrationStatus, **kw) -> MigrationState:
    st = MigrationState(role, **kw)
    for s in path_to(role, target):
        st.transition(s)
    assert st.status is target
    return st


def reachable(role: str) -> list[MigrationStatus]:
    return [s for s in S if path_to(role, s) is not None]


def legal_edges(role):
    table = transitions_for(role)
    return [(role, a, b) for a in reachable(role) for b in sorted(table[a], key=list(S).index)]


def illegal_edges(role):
    table = transitions_for(role)
    return [(role, a, b) for a in reachable(role) for b in S if b not in table[a]]


# -- the enum ---------------------------------------------------------------

def test_status_values_and_order_are_qemus():
    assert [s.value for s in S] == QMP_STRINGS
    assert len(S) == 16
    for s in S:
        assert s.name == s.value.upper().replace("-", "_")
        assert S(s.value) is s
        assert s == s.value  # a str enum compares equal to the QMP string
        assert str(s) == s.value and f"{s}" == s.value


# -- the tables -------------------------------------------------------------

@pytest.mark.parametrize("role", ROLES)
def test_tables_are_total_and_read_only(role):
    table = transitions_for(role)
    assert set(table) == set(S)
    assert all(isinstance(v, frozenset) for v in table.values())
    with pytest.raises(TypeError):
        table[S.NONE] = frozenset()  # type: ignore[index]


def test_transitions_for_rejects_unknown_role():
    with pytest.raises(ValueError):
        transitions_for("sideways")
    with pytest.raises(ValueError):
        MigrationState("sideways")  # type: ignore[arg-type]


@pytest.mark.parametrize("role", ROLES)
def test_every_state_with_successors_is_reachable(role):
    table = transitions_for(role)
    for s, nxt in table.items():
        if nxt:
            assert path_to(role, s) is not None, s


@pytest.mark.parametrize("role,old,new", legal_edges("source") + legal_edges("destination"))
def test_every_legal_edge_is_accepted(role, old, new):
    seen = []
    st = state_at(role, old, on_change=lambda a, b: seen.append((a, b)))
    assert st.can_transition(new)
    st.transition(new)
    assert st.status is new
    assert seen[-1] == (old, new)
    assert st.history[-1][1] is new


@pytest.mark.parametrize("role,old,new", illegal_edges("source") + illegal_edges("destination"))
def test_every_illegal_edge_raises(role, old, new):
    seen = []
    st = state_at(role, old)
    st._on_change = lambda a, b: seen.append((a, b))  # only count the refused move
    assert not st.can_transition(new)
    with pytest.raises(StateError) as info:
        st.transition(new.value)  # strings are accepted too
    err = info.value
    assert (err.current, err.requested, err.role) == (old.value, new.value, role)
    assert role in str(err) and old.value in str(err) and new.value in str(err)
    assert st.status is old
    assert seen == []


def test_source_spec_rules():
    # migrate_cancel: allowed from running non-postcopy states only.
    assert CANCELLABLE_STATES == {S.SETUP, S.WAIT_UNPLUG, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE}
    for s in POSTCOPY_STATES:
        assert S.CANCELLING not in SOURCE_TRANSITIONS[s]
    # Errors fail every running state.  In postcopy only a broken channel
    # pauses; anything else (or the source giving up) fails, and then the
    # guest lives on the destination only.
    for s in (S.SETUP, S.WAIT_UNPLUG, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE, S.COLO):
        assert S.FAILED in SOURCE_TRANSITIONS[s], s
    for s in POSTCOPY_STATES:
        assert S.FAILED in SOURCE_TRANSITIONS[s], s
    # Only a running postcopy can be paused, and only a paused one resumed.
    assert {s for s in POSTCOPY_STATES if S.POSTCOPY_PAUSED in SOURCE_TRANSITIONS[s]} == \
        {S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER}
    assert SOURCE_TRANSITIONS[S.CANCELLING] == {S.CANCELLED}
    # A new migration may start after any end.
    for s in TERMINAL_STATES | {S.NONE}:
        assert SOURCE_TRANSITIONS[s] == {S.SETUP}
    # Postcopy goes through postcopy-device only with a return path; both exist.
    assert {S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE, S.COMPLETED} <= SOURCE_TRANSITIONS[S.DEVICE]
    assert SOURCE_TRANSITIONS[S.PRE_SWITCHOVER] >= {S.DEVICE}
    assert S.COMPLETED not in SOURCE_TRANSITIONS[S.ACTIVE]  # always through device
    # Recovery loop.
    assert SOURCE_TRANSITIONS[S.POSTCOPY_PAUSED] == {S.POSTCOPY_RECOVER_SETUP, S.FAILED}
    assert SOURCE_TRANSITIONS[S.POSTCOPY_RECOVER_SETUP] == {S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED,
                                                            S.FAILED}
    assert SOURCE_TRANSITIONS[S.POSTCOPY_RECOVER] == {S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.FAILED}
    assert SOURCE_TRANSITIONS[S.POSTCOPY_ACTIVE] == {S.POSTCOPY_PAUSED, S.COMPLETED, S.FAILED}


def test_destination_spec_rules():
    t = DESTINATION_TRANSITIONS
    assert t[S.NONE] == {S.SETUP}
    assert t[S.ACTIVE] == {S.COMPLETED, S.FAILED, S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE}
    assert t[S.POSTCOPY_DEVICE] == {S.POSTCOPY_ACTIVE, S.FAILED}
    assert t[S.POSTCOPY_PAUSED] == {S.POSTCOPY_RECOVER}  # no recover-setup on this side
    assert t[S.POSTCOPY_RECOVER] == {S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED}
    for s in (S.COMPLETED, S.FAILED, S.CANCELLING, S.CANCELLED, S.DEVICE,
              S.PRE_SWITCHOVER, S.WAIT_UNPLUG, S.POSTCOPY_RECOVER_SETUP):
        assert t[s] == frozenset(), s
    never = {S.CANCELLING, S.CANCELLED, S.DEVICE, S.PRE_SWITCHOVER,
             S.WAIT_UNPLUG, S.POSTCOPY_RECOVER_SETUP, S.COLO}
    assert not never & set(reachable("destination"))


def test_a_full_source_postcopy_run_with_recovery():
    st = MigrationState("source")
    for s in ["setup", "active", "pre-switchover", "device", "postcopy-device",
              "postcopy-active", "postcopy-paused", "postcopy-recover-setup",
              "postcopy-paused", "postcopy-recover-setup", "postcopy-recover",
              "postcopy-active", "completed", "setup", "active", "cancelling",
              "cancelled", "setup", "failed"]:
        st.transition(s)
    assert st.status is S.FAILED


# -- guarded commands, predicates, history ----------------------------------

def test_expect():
    st = state_at("source", S.PRE_SWITCHOVER)
    assert st.expect("pre-switchover") is S.PRE_SWITCHOVER
    assert st.expect(S.ACTIVE, S.PRE_SWITCHOVER) is S.PRE_SWITCHOVER
    with pytest.raises(UnexpectedStateError) as info:
        st.expect(S.ACTIVE, S.DEVICE)
    assert isinstance(info.value, StateError)
    assert info.value.current == "pre-switchover"
    assert info.value.requested == "active|device"
    assert "expected 'active|device'" in str(info.value)
    with pytest.raises(ValueError):
        st.expect("sideways")


def test_compare_and_transition():
    st = state_at("source", S.ACTIVE)
    assert st.compare_and_transition(S.ACTIVE, S.CANCELLING) is True
    # The loser of a race leaves the winner's status alone...
    assert st.compare_and_transition(S.ACTIVE, S.FAILED) is False
    assert st.status is S.CANCELLING
    # ...but an edge that could never be legal is still an error.
    with pytest.raises(StateError):
        st.compare_and_transition(S.POSTCOPY_ACTIVE, S.CANCELLING)


def test_predicates():
    for role in ROLES:
        for s in reachable(role):
            st = state_at(role, s)
            assert st.is_active() == (s in ACTIVE_STATES)
            assert st.is_terminal() == (s in {S.COMPLETED, S.FAILED, S.CANCELLED})
            assert st.is_postcopy() == s.value.startswith("postcopy-")
    assert ACTIVE_STATES >= {S.SETUP, S.ACTIVE, S.DEVICE, S.PRE_SWITCHOVER} | POSTCOPY_STATES
    assert not ACTIVE_STATES & (TERMINAL_STATES | {S.NONE, S.CANCELLING})


def test_history_uses_the_injected_clock():
    clock = FakeClock(10.0)
    st = MigrationState("destination", clock=clock)
    clock.t = 11.5
    st.transition(S.SETUP)
    clock.t = 12.0
    st.transition(S.ACTIVE)
    assert st.history == [(10.0, S.NONE), (11.5, S.SETUP), (12.0, S.ACTIVE)]
    st.history.append((0, S.FAILED))  # a copy: the state is not affected
    assert len(st.history) == 3
    assert "destination" in repr(st) and "active" in repr(st)


def test_wait_for():
    st = state_at("source", S.ACTIVE)
    assert st.wait_for(S.DEVICE, timeout=0.01) is None
    t = threading.Thread(target=lambda: (st.transition(S.DEVICE), st.transition(S.COMPLETED)))
    t.start()
    assert st.wait_for(S.COMPLETED, S.FAILED, timeout=10) is S.COMPLETED
    t.join()


def test_on_change_may_read_the_state():
    reads = []
    holder: list[MigrationState] = []
    st = MigrationState("source", on_change=lambda a, b: reads.append(holder[0].status))
    holder.append(st)
    st.transition(S.SETUP)
    assert reads == [S.SETUP]


# -- threads ---------------------------------------------------------------

def test_racing_threads_keep_the_history_legal():
    """Threads race to push a source around a cycle; no move is lost or illegal."""
    cycle = {S.NONE: S.SETUP, S.SETUP: S.ACTIVE, S.ACTIVE: S.CANCELLING,
             S.CANCELLING: S.CANCELLED, S.CANCELLED: S.SETUP}
    changes: list[tuple[MigrationStatus, MigrationStatus]] = []
    st = MigrationState("source", on_change=lambda a, b: changes.append((a, b)))
    wins = [0] * 6
    stop = threading.Event()

    def mover(i: int) -> None:
        for _ in range(400):
            cur = st.status
            if st.compare_and_transition(cur, cycle[cur]):
                wins[i] += 1

    def reader() -> None:
        while not stop.is_set():
            hist = st.history
            assert hist[0][1] is S.NONE
            assert st.status in cycle

    threads = [threading.Thread(target=mover, args=(i,)) for i in range(6)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()

    hist = [s for _, s in st.history]
    assert len(hist) - 1 == sum(wins) == len(changes)
    for a, b in zip(hist, hist[1:]):
        assert b in SOURCE_TRANSITIONS[a]
    # Callbacks ran in order: each one starts where the previous ended.
    assert changes[0][0] is S.NONE
    for (_, b), (c, _) in itertools.pairwise(changes):
        assert b is c


# -- diagram --------------------------------------------------------------

@pytest.mark.parametrize("role", ROLES)
def test_diagram_is_generated_from_the_table(role):
    text = diagram(role)
    assert text.startswith("digraph") and text.rstrip().endswith("}")
    p = role[0]
    edges = set(re.findall(rf"{p}_(\w+) -> {p}_(\w+);", text))
    expected = {(a.name, b.name) for a, nxt in transitions_for(role).items() for b in nxt}
    assert edges == expected
    declared = set(re.findall(rf'{p}_(\w+) \[label="([\w-]+)"', text))
    assert {name for name, _ in declared} == {n for e in edges for n in e}
    for name, label in declared:
        assert S[name].value == label


def test_diagram_of_both_roles():
    text = diagram()
    assert "cluster_source" in text and "cluster_destination" in text
    assert "d_CANCELLING" not in text  # a destination never cancels
    assert "s_CANCELLING -> s_CANCELLED;" in text
