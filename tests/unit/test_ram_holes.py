"""Holes of a RAM block's file: zero pages found without reading them."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from engine.compress.zeropage import zero_page_mask_from_buffer
from engine.migration.ramsave import encode_batch
from engine.migration.verify import block_digest
from engine.ram import holes
from engine.ram.block import RamBlock
from engine.ram.holes import block_fd, hole_mask
from engine.stream.encoder import RamRecordEncoder

PS = 4096
DATA = (3, 10, 11, 12, 40)


@pytest.fixture
def sparse(tmp_shm_path):
    """A 64-page tmpfs file with data in DATA only."""
    fd = os.open(tmp_shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 64 * PS)
        for page in DATA:
            os.pwrite(fd, bytes([page + 1]) * PS, page * PS)
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def exact(monkeypatch):
    """Look at the page after every page with data: every hole is found."""
    monkeypatch.setattr(holes, "STRIDE", 1)


def test_pages_outside_data_are_holes(sparse, exact):
    mask = hole_mask(sparse, np.arange(64), PS)
    assert np.flatnonzero(~mask).tolist() == list(DATA)
    pick = np.array([3, 4, 11, 13, 40, 63])
    assert hole_mask(sparse, pick, PS).tolist() == [False, True, False, True, False, True]


def test_steps_grow_over_data_and_never_call_data_a_hole(sparse):
    """With the default stride a hole right after a run of data may be missed
    (read like data: slower, never wrong), by less than the run's length; a
    lone data page costs nothing more."""
    mask = hole_mask(sparse, np.arange(64), PS)
    assert not mask[list(DATA)].any()
    assert np.flatnonzero(~mask).tolist() == [3, 10, 11, 12, 13, 40]


def test_a_partly_written_page_is_data(sparse, exact):
    os.pwrite(sparse, b"\1", 20 * PS + 100)
    assert not hole_mask(sparse, np.array([20]), PS)    # None: nothing to gain
    assert hole_mask(sparse, np.array([19, 20, 21]), PS).tolist() == [True, False, True]


def test_fallocated_but_unwritten_pages_read_as_zero_and_count_as_holes(sparse, exact):
    os.posix_fallocate(sparse, 20 * PS, 4 * PS)         # what RamBlock.create reserves
    assert hole_mask(sparse, np.arange(20, 24), PS).all()
    assert os.pread(sparse, 4 * PS, 20 * PS) == bytes(4 * PS)


def test_nothing_to_gain_gives_none(sparse, tmp_path, exact):
    assert hole_mask(None, np.arange(4), PS) is None
    assert hole_mask(sparse, np.array([], dtype=np.int64), PS) is None
    assert hole_mask(sparse, np.array([10, 11, 12]), PS) is None   # all data
    dense = tmp_path / "dense"
    dense.write_bytes(b"\1" * 8 * PS)
    with open(dense, "rb") as f:
        assert hole_mask(f.fileno(), np.arange(8), PS) is None


def test_a_fragmented_span_stops_early_and_counts_the_rest_as_data(sparse, exact,
                                                                  monkeypatch):
    monkeypatch.setattr(holes, "MAX_PROBES", 3)
    mask = hole_mask(sparse, np.arange(64), PS)
    # Looks at 0 (hole to 3), 4 (hole to 10), 11 (data): nothing from 12 on is
    # claimed to be a hole.
    assert np.flatnonzero(mask).tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_a_dense_span_costs_a_few_looks(sparse, monkeypatch):
    calls = []
    real = os.lseek

    def counting(fd, pos, how):
        calls.append(pos)
        return real(fd, pos, how)

    os.pwrite(sparse, b"\1" * 64 * PS, 0)              # every page data
    monkeypatch.setattr(holes.os, "lseek", counting)
    assert hole_mask(sparse, np.arange(64), PS) is None
    # Steps 1, 2, 4 ... 32: never SEEK_HOLE, which would walk to the end of file.
    assert [c // PS for c in calls] == [0, 1, 3, 7, 15, 31, 63]


def test_known_zero_pages_are_not_read():
    buf = np.full((4, PS), 7, np.uint8)
    buf[1] = 0
    offsets = np.arange(4, dtype=np.uint64) * np.uint64(PS)
    known = np.array([False, False, True, False])
    # Page 2 holds data, but it is declared a hole: reported zero, unread.
    got = zero_page_mask_from_buffer(buf, offsets, PS, known_zero=known)
    assert got.tolist() == [False, True, True, False]


def test_encode_batch_turns_holes_into_zero_records_unread():
    pages = np.full((8, PS), 9, np.uint8)
    pages[5] = 0
    idx = np.array([1, 2, 5, 6])
    known = np.array([False, True, False, False])      # page 2: a hole (unread)
    res = encode_batch("m0", pages, idx, PS, True, encoder=RamRecordEncoder(PS),
                       known_zero=known)
    assert (res.normal, res.zero) == (2, 2)
    plain = encode_batch("m0", np.where(np.arange(8)[:, None] == 2, 0, pages).astype(np.uint8),
                         idx, PS, True, encoder=RamRecordEncoder(PS))
    assert b"".join(bytes(b) for b in res.buffers) == b"".join(bytes(b) for b in plain.buffers)
    # Without zero detection a hole is sent like any page (QEMU's "none").
    none = encode_batch("m0", pages, idx, PS, False, encoder=RamRecordEncoder(PS),
                        known_zero=known)
    assert (none.normal, none.zero) == (4, 0)


def test_block_digest_reads_the_file_and_leaves_holes_alone(tmp_shm_path, exact):
    with RamBlock.create("m0", 64 * PS, mem_path=str(tmp_shm_path)) as block:
        block.pages[list(DATA), :] = 5
        before = hole_mask(block.fd, np.arange(64), PS)
        assert before.sum() == 64 - len(DATA)
        digest = block_digest(block)
        assert np.array_equal(hole_mask(block.fd, np.arange(64), PS), before)
        # Through the mapping, last: that read fills the holes.
        assert digest == hashlib.sha256(bytes(block.buf)).hexdigest()
        assert block_fd(block) == block.fd
    assert block_fd(object()) is None


def test_a_hole_map_asks_once_per_hole_during_a_pass(sparse, exact, monkeypatch):
    """Batch by batch through a block: one SEEK_DATA per hole, not per batch
    (from inside a hole of fallocated tmpfs pages each call walks to the hole's
    end, page by page); the answers are those of hole_mask."""
    calls = []
    real = os.lseek

    def counting(fd, pos, how):
        calls.append(pos // PS)
        return real(fd, pos, how)

    os.posix_fallocate(sparse, 0, 64 * PS)              # as RamBlock.create reserves
    expected = hole_mask(sparse, np.arange(64), PS)
    monkeypatch.setattr(holes.os, "lseek", counting)
    hmap = holes.HoleMap(sparse, PS)
    got = np.concatenate([hmap.mask(np.arange(b, b + 4)) for b in range(0, 64, 4)])
    assert np.array_equal(got, expected)
    # One look per hole and one per data page at a batch's edge, instead of
    # one or more in every one of the 16 batches.
    assert calls == [0, 4, 11, 12, 13, 40, 41]


def test_a_hole_map_forgets_at_a_new_pass(sparse, exact):
    hmap = holes.HoleMap(sparse, PS)
    assert hmap.mask(np.arange(20, 24)).all()
    os.pwrite(sparse, b"\1" * PS, 22 * PS)
    # Within the pass the write comes after the look: the page is dirty again
    # and goes in the next pass, so the map may still call it a hole...
    assert hmap.mask(np.array([22])).all()
    hmap.forget()
    # ...but the next pass looks again.
    assert hmap.mask(np.arange(20, 24)).tolist() == [True, True, False, True]
