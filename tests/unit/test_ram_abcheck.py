"""The ab checker (QEMU's check_guests_ram), on synthetic memory."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import ConfigError
from engine.ram.abcheck import ab_slices, check_ab

PAGE = 64   # only byte 0 matters; small pages keep the arrays small


def memory(column) -> np.ndarray:
    """Pages whose byte 0 is *column*, with noise in every other byte."""
    col = np.asarray(column, dtype=np.uint8)
    pages = np.random.default_rng(0).integers(0, 256, (col.size, PAGE), dtype=np.uint8)
    pages[:, 0] = col
    return pages


def ab_column(npages: int, nslices: int, state) -> np.ndarray:
    """What an ab run leaves: per slice, (passes, pc) -> v+1 before pc, v after."""
    col = np.empty(npages, dtype=np.uint8)
    bounds = ab_slices(npages, nslices)
    for k, (passes, pc) in enumerate(state):
        lo, hi = bounds[k], bounds[k + 1]
        col[lo:lo + pc] = (passes + 1) % 256
        col[lo + pc:hi] = passes % 256
    return col


def test_slices_cover_the_pages():
    assert ab_slices(10, 3).tolist() == [0, 3, 6, 10]
    assert ab_slices(2, 4).tolist() == [0, 0, 1, 1, 2]
    with pytest.raises(ConfigError):
        ab_slices(10, 0)


def test_uniform_memory_passes_without_edge():
    result = check_ab(memory([7] * 20), PAGE)
    assert result.ok and result.bad_pages == 0 and result.edges == []


def test_one_edge_passes_and_is_reported():
    result = check_ab(memory([4] * 5 + [3] * 10), PAGE)
    assert result.ok and result.edges == [5]


def test_edge_across_the_wrap():
    result = check_ab(memory([0] * 3 + [255] * 3), PAGE)
    assert result.ok and result.edges == [3]


def test_flat_and_2d_inputs_agree():
    pages = memory([4] * 5 + [3] * 10)
    assert check_ab(pages.reshape(-1), PAGE) == check_ab(pages, PAGE)
    with pytest.raises(ConfigError):
        check_ab(pages.reshape(-1)[:-1], PAGE)
    with pytest.raises(ConfigError):
        check_ab(pages.astype(np.uint16), PAGE)


def test_lost_page_is_bad():
    col = [9] * 4 + [8] * 8
    col[6] = 7            # a stale page behind the edge
    result = check_ab(memory(col), PAGE)
    assert not result.ok
    assert result.bad_pages == 2
    assert result.first_bad == [(6, 8, 7), (7, 7, 8)]


def test_out_of_order_step_up_is_bad():
    result = check_ab(memory([5] * 4 + [6] * 4), PAGE)
    assert not result.ok and result.first_bad == [(4, 5, 6)]


def test_second_edge_is_bad():
    result = check_ab(memory([6] * 3 + [5] * 3 + [4] * 3), PAGE)
    assert not result.ok and result.bad_pages == 1
    assert result.edges == [3] and result.first_bad == [(6, 5, 4)]
    assert "inconsistency at page 6" in result.report()


def test_reports_at_most_ten():
    result = check_ab(memory(np.arange(0, 60, 2)), PAGE)
    assert result.bad_pages == 29 and len(result.first_bad) == 10


def test_slices_are_checked_independently():
    col = np.concatenate([[3] * 5 + [2] * 5, [200] * 4 + [199] * 6])
    assert check_ab(memory(col), PAGE, slices=2).ok
    assert check_ab(memory(col), PAGE, slices=2).edges == [5, 14]
    assert not check_ab(memory(col), PAGE, slices=1).ok
    # Two edges inside one slice stay bad with slices.
    col2 = np.concatenate([[3] * 3 + [2] * 3 + [1] * 4, [9] * 10])
    assert not check_ab(memory(col2), PAGE, slices=2).ok


def test_tiny_inputs():
    assert check_ab(memory([]), PAGE).ok
    assert check_ab(memory([1]), PAGE).ok
    assert check_ab(memory([1, 2]), PAGE, slices=2).ok     # one page per slice


@st.composite
def ab_states(draw):
    npages = draw(st.integers(2, 300))
    nslices = draw(st.integers(1, 6))
    bounds = ab_slices(npages, nslices)
    state = [(draw(st.integers(0, 10_000)),
              draw(st.integers(0, max(0, int(bounds[k + 1] - bounds[k]) - 1))))
             for k in range(nslices)]
    return npages, nslices, state


@settings(max_examples=200, deadline=None)
@given(ab_states())
def test_any_ab_snapshot_passes(case):
    npages, nslices, state = case
    result = check_ab(memory(ab_column(npages, nslices, state)), PAGE, nslices)
    assert result.ok, result.report()
    bounds = ab_slices(npages, nslices)
    expected_edges = [int(bounds[k] + pc) for k, (_, pc) in enumerate(state) if pc]
    assert result.edges == expected_edges


@settings(max_examples=200, deadline=None)
@given(ab_states(), st.data())
def test_any_corrupted_page_fails(case, data):
    npages, nslices, state = case
    col = ab_column(npages, nslices, state)
    page = data.draw(st.integers(0, npages - 1))
    delta = data.draw(st.integers(2, 254))      # +-1 can just move the edge
    col[page] = (int(col[page]) + delta) % 256
    slice_len = np.diff(ab_slices(npages, nslices))
    if slice_len.max() < 2:
        return                                   # nothing to compare with
    owner = np.searchsorted(ab_slices(npages, nslices), page, side="right") - 1
    if slice_len[owner] < 2:
        return
    assert not check_ab(memory(col), PAGE, nslices).ok
