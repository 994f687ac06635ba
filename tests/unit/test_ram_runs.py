"""Runs of adjacent pages (engine.ram.runs), checked against a plain Python walk
over random index sets and masks."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.ram.runs import index_runs, mask_runs, run_bounds

indexes = st.lists(st.integers(0, 300), max_size=200)


def walk(values, groups=None):
    """(first position, end position) of each run, one element at a time."""
    out = []
    for i, v in enumerate(values):
        same_group = groups is None or (i and groups[i] == groups[i - 1])
        if out and v == values[i - 1] + 1 and same_group:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [tuple(r) for r in out]


@settings(max_examples=300, deadline=None)
@given(indexes, st.sampled_from([np.int64, np.uint64, np.intp, np.uint32]))
def test_run_bounds_match_a_walk(values, dtype):
    firsts, ends = run_bounds(np.array(values, dtype=dtype))
    assert list(zip(firsts.tolist(), ends.tolist())) == walk(values)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=200).map(sorted), st.integers(1, 9))
def test_runs_break_where_the_group_changes(values, per_group):
    groups = np.arange(len(values)) // per_group          # e.g. packets of a batch
    firsts, ends = run_bounds(np.array(values, dtype=np.uint64), groups)
    assert list(zip(firsts.tolist(), ends.tolist())) == walk(values, groups.tolist())


@settings(max_examples=300, deadline=None)
@given(indexes)
def test_index_runs_cover_the_indexes_in_order(values):
    starts, counts = index_runs(np.array(values, dtype=np.int64))
    rebuilt = [s + k for s, n in zip(starts.tolist(), counts.tolist()) for k in range(n)]
    assert rebuilt == values
    assert (counts > 0).all()
    # Maximal: no run continues into the next one.
    assert not any(s + n == nxt for s, n, nxt in
                   zip(starts.tolist(), counts.tolist(), starts[1:].tolist()))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=300), st.sampled_from([np.uint8, np.bool_]))
def test_mask_runs_are_the_set_entries(values, dtype):
    mask = np.array(values, dtype=dtype)
    starts, counts = mask_runs(mask)
    assert [p for s, n in zip(starts.tolist(), counts.tolist()) for p in range(s, s + n)] \
        == np.flatnonzero(mask).tolist()
    assert (starts[1:] > starts[:-1] + counts[:-1]).all()     # gaps between runs


def test_edges():
    assert [a.tolist() for a in run_bounds(np.array([], np.int64))] == [[], []]
    assert [a.tolist() for a in index_runs(np.array([7]))] == [[7], [1]]
    assert [a.tolist() for a in index_runs(np.array([3, 4, 5, 9, 2, 3]))] \
        == [[3, 9, 2], [3, 1, 2]]
    assert [a.tolist() for a in mask_runs(np.ones(4, np.uint8))] == [[0], [4]]
    assert [a.tolist() for a in mask_runs(np.zeros(0, np.uint8))] == [[], []]
