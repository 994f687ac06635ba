"""XBZRLE codec: round trips, QEMU's byte layout and overflow rule, bad encodings."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.compress.xbzrle import (XbzrleError, decode_into, encode_page, encode_pages,
                                    uleb128_decode_small, uleb128_encode_small)

PAGE = 4096


def reference_encode(old: bytes, new: bytes, dlen: int) -> bytes | None:
    """QEMU's encoder, byte by byte (its word-at-a-time loops find the same runs)."""
    out = bytearray()
    i, n = 0, len(new)
    while i < n:
        if len(out) + 2 > dlen:
            return None
        z = 0
        while i < n and old[i] == new[i]:
            z += 1
            i += 1
        if z == n:
            return b""
        if i == n:
            return bytes(out)
        out += uleb128_encode_small(z)
        if len(out) + 2 > dlen:
            return None
        start = i
        while i < n and old[i] != new[i]:
            i += 1
        if len(out) + (i - start) + 2 > dlen:
            return None
        out += uleb128_encode_small(i - start)
        out += new[start:i]
    return bytes(out)


def test_uleb128_small_round_trip():
    for n in (0, 1, 0x7F, 0x80, 0x1234, 0x3FFF):
        enc = uleb128_encode_small(n)
        assert len(enc) == (1 if n < 0x80 else 2)
        assert uleb128_decode_small(enc, 0) == (n, len(enc))
    with pytest.raises(ValueError):
        uleb128_encode_small(0x4000)
    assert uleb128_decode_small(b"\x80\x80\x01", 0) == (-1, 0)


def test_known_layout():
    old = bytes(PAGE)
    new = bytearray(old)
    new[0:2] = b"\x01\x02"          # first run starts at 0: zrun 0
    new[200:203] = b"abc"           # zrun 198 (two bytes), nzrun 3
    assert encode_page(old, bytes(new)) == (b"\x00\x02\x01\x02" + b"\xc6\x01" + b"\x03abc")


def test_unchanged_page_encodes_to_nothing():
    page = np.random.default_rng(1).integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    assert encode_page(page, page) == b""


def test_random_page_overflows():
    rng = np.random.default_rng(2)
    old = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    new = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
    assert encode_page(old, new) is None
    assert reference_encode(old, new, PAGE) is None


@st.composite
def edited_pages(draw):
    size = draw(st.sampled_from([64, 256, PAGE]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 4, size, dtype=np.uint8)  # small alphabet: equal bytes by chance
    new = old.copy()
    for _ in range(draw(st.integers(0, 40))):
        at = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, 64))
        new[at:at + length] = rng.integers(0, 4, min(length, size - at), dtype=np.uint8)
    return old.tobytes(), new.tobytes()


@settings(max_examples=1500, deadline=None)
@given(edited_pages())
def test_matches_qemu_and_round_trips(pair):
    old, new = pair
    ours = encode_page(old, new)
    assert ours == reference_encode(old, new, len(new))
    if ours:
        page = bytearray(old)
        assert decode_into(ours, page) <= len(page)
        assert bytes(page) == new


@settings(max_examples=50, deadline=None)
@given(st.lists(edited_pages(), min_size=1, max_size=8))
def test_batches_encode_each_page_alone(pairs):
    size = len(pairs[0][0])
    pairs = [p for p in pairs if len(p[0]) == size]
    old = np.stack([np.frombuffer(o, np.uint8) for o, _ in pairs])
    new = np.stack([np.frombuffer(n, np.uint8) for _, n in pairs])
    enc = encode_pages(old, new)
    for i, (o, n) in enumerate(pairs):
        alone = encode_page(o, n)
        assert enc.lengths[i] == (-1 if alone is None else len(alone))
        if alone is not None:
            assert bytes(enc.page(i)) == alone


@pytest.mark.parametrize("bad, why", [
    (b"\x00", "truncated"),                       # one byte: no room for a pair
    (b"\x05\x00\x00", "bad changed-run"),         # nzrun of 0
    (b"\x00\x01a\x00\x01b", "bad unchanged-run"),  # a later zrun of 0
    (b"\xff\x7f\x01a", "past the page"),          # zrun beyond the page
    (b"\x00\x05ab", "overruns"),                  # nzrun longer than the encoding
    (b"\x80\x80\x80", "bad unchanged-run"),       # a length of more than 14 bits
])
def test_bad_encodings_are_refused(bad, why):
    with pytest.raises(XbzrleError, match=why):
        decode_into(bad, bytearray(PAGE))


# -- the page cache -----------------------------------------------------------

from engine.ram.pagecache import PageCache, cache_slots  # noqa: E402


def test_cache_slots_round_down_to_a_power_of_two():
    assert cache_slots(64 << 20, PAGE) == 16384
    assert cache_slots(3 * PAGE, PAGE) == 2
    with pytest.raises(ValueError):
        cache_slots(PAGE - 1, PAGE)


def test_cache_hits_misses_and_fresh_slots():
    cache = PageCache(4 * PAGE, PAGE)
    pages = np.arange(3 * PAGE, dtype=np.uint64).astype(np.uint8).reshape(3, PAGE)
    addrs = np.array([0, PAGE, 5 * PAGE], dtype=np.int64)   # 5*PAGE shares slot 1 with PAGE
    hit, _ = cache.lookup(addrs, generation=1)
    assert not hit.any()
    stored = cache.insert(addrs[:2], pages[:2], generation=1)
    assert stored.all()
    # PAGE's slot is fresh (used in generation 1): 5*PAGE may not take it yet
    assert not cache.insert(addrs[2:], pages[2:], generation=2).any()
    hit, slots = cache.lookup(addrs, generation=2)
    assert hit.tolist() == [True, True, False]
    assert np.array_equal(cache.pages(slots[:2]), pages[:2])
    # two generations after its last use the slot is free for another page
    assert cache.insert(addrs[2:], pages[2:], generation=4).all()
    assert cache.lookup(addrs, generation=4)[0].tolist() == [True, False, True]


def test_cache_resize_keeps_the_newest():
    cache = PageCache(4 * PAGE, PAGE)
    pages = np.full((4, PAGE), 7, dtype=np.uint8)
    pages[:, 0] = [0, 1, 2, 3]
    addrs = np.arange(4, dtype=np.int64) * PAGE
    for i in range(4):
        cache.insert(addrs[i:i + 1], pages[i:i + 1], generation=i)
    small = cache.resize(2 * PAGE)
    assert small.slots == 2
    hit, slots = small.lookup(addrs, generation=9)
    assert hit.tolist() == [False, False, True, True]   # 2 and 3 are newer than 0 and 1
    assert small.pages(slots[hit])[:, 0].tolist() == [2, 3]


@pytest.mark.parametrize("changed_tail", [False, True])
def test_overflow_boundary_is_qemus(changed_tail):
    # Alternate changed/unchanged bytes: every run costs 3 bytes; find the
    # page sizes around dlen where QEMU's encoder starts to give up.
    size = 64
    for dlen in range(30, 64):
        for nchanges in range(1, 32):
            old = bytes(size)
            new = bytearray(size)
            for k in range(nchanges):
                new[size - 1 - 2 * k if changed_tail else size - 2 - 2 * k] = 1
            assert encode_page(old, bytes(new), dlen) == reference_encode(old, bytes(new), dlen)
