"""Page codecs (engine.compress): conformance, errors, zero pages, QEMU 7.2 interop."""
from __future__ import annotations

import secrets
import zlib
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.compress import (
    CODECS, MULTIFD_FLAG_COMPRESSION_MASK, MULTIFD_FLAG_NOCOMP, MULTIFD_FLAG_ZLIB,
    MULTIFD_FLAG_ZSTD, codec_for_flags, find_zero_pages, get_codec,
    payload_nbytes, zero_page_mask_from_buffer,
)
from engine.compress.zlib import ISAL_LEVELS, ZlibDecoder, ZlibEncoder
from engine.errors import (
    CodecError, ConfigError, InvalidParameterError, RemoteProtocolError,
)
from engine.multifd.packet import MultiFDInit, MultiFDPacketHeader, packet_size
from tests.captures import CAPTURES

PS = 4096
STREAM_CODECS = ("zlib", "zstd")


# -- page material -------------------------------------------------------------

KINDS = ("zero", "random", "text", "byte", "sparse")
_WORDS = np.frombuffer(b"the quick brown fox jumps over a lazy dog and then some ", np.uint8)


def make_page(kind: str, seed: int, page_size: int = PS) -> np.ndarray:
    """A deterministic page of one of the kinds real guest memory has."""
    rng = np.random.default_rng(seed)
    if kind == "zero":
        return np.zeros(page_size, np.uint8)
    if kind == "random":
        return rng.integers(0, 256, page_size, dtype=np.uint8)
    if kind == "text":
        start = rng.integers(0, _WORDS.size, page_size // 8)
        return _WORDS[(start[:, None] + np.arange(8)) % _WORDS.size].reshape(-1)[:page_size].copy()
    if kind == "byte":
        return np.full(page_size, seed % 256, np.uint8)
    page = np.zeros(page_size, np.uint8)
    where = rng.integers(0, page_size, 5)
    page[where] = rng.integers(1, 256, 5, dtype=np.uint8)
    return page


def make_pages(spec) -> np.ndarray:
    rows = [make_page(kind, seed) for kind, seed in spec]
    return np.stack(rows) if rows else np.empty((0, PS), np.uint8)


page_specs = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 2**32 - 1)), max_size=10)
IN_FORMS = ("array", "sequence", "gather")
OUT_FORMS = ("array", "sequence", "scatter")


def encode_as(encoder, pages: np.ndarray, form: str):
    if form == "array":
        return encoder.encode(pages)
    if form == "sequence":
        return encoder.encode([bytes(row) for row in pages])
    # Pages spread over a bigger block, in a shuffled order.
    n = pages.shape[0]
    ram = np.full((2 * n + 3, PS), 0xAA, np.uint8)
    idx = np.random.default_rng(n).permutation(2 * n + 3)[:n]
    ram[idx] = pages
    return encoder.encode_gather(ram, idx)


def decode_as(decoder, payload, n: int, form: str) -> np.ndarray:
    if form == "array":
        out = np.full((n, PS), 0x55, np.uint8)
        decoder.decode(payload, out)
        return out
    if form == "sequence":
        bufs = [bytearray(PS) for _ in range(n)]
        decoder.decode(payload, [memoryview(b) for b in bufs])
        return np.frombuffer(b"".join(bufs), np.uint8).reshape(n, PS)
    ram = np.full((n + 5, PS), 0x55, np.uint8)
    idx = np.arange(n + 5)[::-1][:n].copy()
    decoder.decode_scatter(payload, ram, idx)
    return ram[idx]


def stream_packets(rng_seed: int, count: int, pages_per_packet: int = 128) -> list[np.ndarray]:
    """Packets whose pages repeat earlier packets' pages, so the stream has
    back-references that cross packet boundaries."""
    rng = np.random.default_rng(rng_seed)
    pool = [make_page(KINDS[i % len(KINDS)], i) for i in range(64)]
    packets = []
    for _ in range(count):
        pick = rng.integers(0, len(pool), pages_per_packet)
        packets.append(np.stack([pool[i] for i in pick]))
    return packets


# -- registry and levels -----------------------------------------------------------

def test_registry_uses_qemu_names_and_flags():
    assert set(CODECS) == {"none", "zlib", "zstd"}
    assert {name: c.flag for name, c in CODECS.items()} == {
        "none": MULTIFD_FLAG_NOCOMP, "zlib": MULTIFD_FLAG_ZLIB, "zstd": MULTIFD_FLAG_ZSTD}
    assert (MULTIFD_FLAG_NOCOMP, MULTIFD_FLAG_ZLIB, MULTIFD_FLAG_ZSTD,
            MULTIFD_FLAG_COMPRESSION_MASK) == (0, 2, 4, 0x3E)
    for name, codec in CODECS.items():
        assert get_codec(name) is codec and codec.name == name
    assert codec_for_flags(0x01 | 0x04) is CODECS["zstd"]
    assert codec_for_flags(0x01) is CODECS["none"]
    with pytest.raises(RemoteProtocolError):
        codec_for_flags(0x08)  # qpl: not implemented
    with pytest.raises(RemoteProtocolError):
        codec_for_flags(0x06)


@pytest.mark.parametrize("name", ["qpl", "gzip", "", "ZLIB", None])
def test_unknown_codec_is_a_config_error(name):
    with pytest.raises(ConfigError, match="multifd-compression"):
        get_codec(name)


def test_levels_follow_qemu_parameters():
    assert CODECS["zlib"].default_level == 1 and CODECS["zstd"].default_level == 1
    assert CODECS["zlib"].new_encoder().level == 1
    assert CODECS["zstd"].new_encoder(None).level == 1
    for name, top in (("zlib", 9), ("zstd", 20)):
        codec = CODECS[name]
        for level in (0, top):
            enc, dec = codec.new_encoder(level), codec.new_decoder()
            pages = make_pages([("text", 1), ("random", 2)])
            assert (decode_as(dec, enc.encode(pages), 2, "array") == pages).all()
        for level in (-1, top + 1, 1.5, True):
            with pytest.raises(InvalidParameterError, match=codec.level_parameter):
                codec.new_encoder(level)


# -- conformance: round trips through one long-lived stream -------------------------------

@pytest.mark.parametrize("name", sorted(CODECS))
@settings(max_examples=100, deadline=None)
@given(packets=st.lists(
    st.tuples(page_specs, st.sampled_from(IN_FORMS), st.sampled_from(OUT_FORMS)),
    min_size=1, max_size=6))
def test_round_trip_packets_in_order(name, packets):
    codec = CODECS[name]
    encoder, decoder = codec.new_encoder(), codec.new_decoder()
    for spec, in_form, out_form in packets:
        pages = make_pages(spec)
        payload = encode_as(encoder, pages, in_form)
        if name == "none":
            assert payload_nbytes(payload) == pages.size
        got = decode_as(decoder, payload, pages.shape[0], out_form)
        assert (got == pages).all()


@pytest.mark.parametrize("name", sorted(CODECS))
def test_many_full_packets_through_one_stream(name):
    codec = CODECS[name]
    encoder, decoder = codec.new_encoder(), codec.new_decoder()
    packets = stream_packets(1, 24)
    payloads = [b"".join(bytes(b) for b in encoder.encode(p)) for p in packets]
    for pages, payload in zip(packets, payloads):
        assert (decode_as(decoder, payload, 128, "array") == pages).all()
    if name != "none":
        assert sum(map(len, payloads)) < sum(p.nbytes for p in packets) // 3
        # One stream for all packets, not one per packet: cheaper than fresh
        # streams (no headers again; zstd's window reaches back across packets).
        fresh = sum(payload_nbytes(codec.new_encoder().encode(p)) for p in packets)
        assert sum(map(len, payloads)) < fresh


@pytest.mark.parametrize("name", STREAM_CODECS)
def test_stream_packets_must_be_decoded_in_order(name):
    codec = CODECS[name]
    encoder = codec.new_encoder()
    packets = stream_packets(2, 4)
    payloads = [b"".join(encoder.encode(p)) for p in packets]

    # A packet from the middle of a stream means nothing to a fresh decoder.
    with pytest.raises(CodecError):
        codec.new_decoder().decode(payloads[2], np.empty((128, PS), np.uint8))

    # Skipping a packet either fails or yields wrong pages: never silently right.
    decoder = codec.new_decoder()
    decoder.decode(payloads[0], np.empty((128, PS), np.uint8))
    out = np.zeros((128, PS), np.uint8)
    try:
        decoder.decode(payloads[2], out)
    except CodecError:
        pass
    else:
        assert not (out == packets[2]).all()


@pytest.mark.parametrize("name", STREAM_CODECS)
def test_stream_encoder_snapshots_pages(name):
    """The guest may write a page while it is compressed; the payload must be
    what the pages held when encode() was called."""
    codec = CODECS[name]
    encoder, decoder = codec.new_encoder(), codec.new_decoder()
    pages = make_pages([("text", i) for i in range(8)])
    before = pages.copy()
    payload = [bytes(b) for b in encoder.encode(pages)]
    pages[:] = 0xEE
    assert (decode_as(decoder, payload, 8, "array") == before).all()


def test_nocomp_is_zero_copy():
    encoder = CODECS["none"].new_encoder()
    ram = make_pages([("random", i) for i in range(12)])
    (buf,) = encoder.encode(ram[2:6])
    assert np.shares_memory(np.frombuffer(buf, np.uint8), ram)
    bufs = encoder.encode_gather(ram, np.array([3, 4, 5, 9, 10, 2]))
    assert [memoryview(b).nbytes // PS for b in bufs] == [3, 2, 1]
    assert all(np.shares_memory(np.frombuffer(b, np.uint8), ram) for b in bufs)
    assert b"".join(bytes(b) for b in bufs) == ram[[3, 4, 5, 9, 10, 2]].tobytes()
    # Rows that are not adjacent come back one buffer per page, still views.
    spread = encoder.encode(ram[::3])
    assert len(spread) == 4 and bytes(spread[1]) == ram[3].tobytes()


@pytest.mark.parametrize("name", sorted(CODECS))
def test_empty_packet_leaves_the_stream_alone(name):
    codec = CODECS[name]
    encoder, decoder = codec.new_encoder(), codec.new_decoder()
    pages = make_pages([("text", 3)])
    assert encoder.encode(np.empty((0, PS), np.uint8)) == []
    assert encoder.encode([]) == []
    assert encoder.encode_gather(pages, np.empty(0, np.int64)) == []
    decoder.decode(b"", np.empty((0, PS), np.uint8))
    decoder.decode(b"", [])
    with pytest.raises(CodecError, match="payload"):
        codec.new_decoder().decode(b"x", [])
    assert (decode_as(decoder, encoder.encode(pages), 1, "array") == pages).all()


# -- errors ---------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CODECS))
def test_truncated_payload_is_a_codec_error(name):
    codec = CODECS[name]
    pages = make_pages([("text", i) for i in range(16)])
    payload = b"".join(bytes(b) for b in codec.new_encoder().encode(pages))
    with pytest.raises(CodecError, match="expected 65536"):
        codec.new_decoder().decode(payload[: len(payload) // 2],
                                   np.empty((16, PS), np.uint8))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_payload_for_a_different_page_count_is_a_codec_error(name):
    codec = CODECS[name]
    pages = make_pages([("text", i) for i in range(4)])
    for n in (3, 5):
        payload = b"".join(bytes(b) for b in codec.new_encoder().encode(pages))
        with pytest.raises(CodecError):
            codec.new_decoder().decode(payload, np.empty((n, PS), np.uint8))


@pytest.mark.parametrize("name", STREAM_CODECS)
def test_corrupt_payload_is_a_codec_error(name):
    codec = CODECS[name]
    pages = make_pages([("text", i) for i in range(4)])
    payload = bytearray(b"".join(codec.new_encoder().encode(pages)))
    payload[0] ^= 0xFF  # zlib header check / zstd magic
    with pytest.raises(CodecError, match=name):
        codec.new_decoder().decode(bytes(payload), np.empty((4, PS), np.uint8))
    garbage = np.random.default_rng(5).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    decoder = codec.new_decoder()
    decoder.decode(codec.new_encoder().encode(pages), np.empty((4, PS), np.uint8))
    with pytest.raises(CodecError):
        decoder.decode(garbage, np.empty((4, PS), np.uint8))


def test_zlib_stream_end_inside_a_packet_is_rejected():
    # QEMU never finishes the deflate stream; a finished one is not multifd.
    page = make_page("text", 1)
    with pytest.raises(CodecError, match="ended"):
        CODECS["zlib"].new_decoder().decode(zlib.compress(page.tobytes()), [bytearray(PS)])


@pytest.mark.parametrize("name", sorted(CODECS))
def test_bad_page_buffers_are_rejected(name):
    codec = CODECS[name]
    with pytest.raises(CodecError):
        codec.new_encoder().encode(np.zeros((2, PS), np.uint16))
    if name != "none":
        with pytest.raises(CodecError, match="bytes"):
            codec.new_encoder().encode([bytes(PS), bytes(PS - 1)])
    payload = codec.new_encoder().encode(make_pages([("text", 1), ("text", 2)]))
    with pytest.raises(CodecError, match="expected 4096"):
        codec.new_decoder().decode(payload, [bytearray(PS), bytearray(PS - 8), bytearray(8)])
    with pytest.raises(CodecError, match="index"):
        codec.new_encoder().encode_gather(np.zeros((4, PS), np.uint8), np.array([1, 4]))


# -- interop with the reference libraries ----------------------------------------------

@pytest.mark.parametrize("name", STREAM_CODECS)
def test_stream_is_what_the_reference_library_reads(name):
    """Our packets, concatenated, are one plain zlib / zstd stream; and a
    stream cut at per-packet flushes by the reference library decodes with ours."""
    codec = CODECS[name]
    packets = stream_packets(3, 6, 40)
    encoder = codec.new_encoder()
    stream = b"".join(b"".join(encoder.encode(p)) for p in packets)
    expected = b"".join(p.tobytes() for p in packets)
    if name == "zlib":
        reference = zlib.decompressobj()
    else:
        reference = zstandard.ZstdDecompressor().decompressobj()
    assert reference.decompress(stream) == expected
    assert not reference.eof  # the stream is never ended

    if name == "zlib":
        theirs = zlib.compressobj(1)
        payloads = [theirs.compress(p.tobytes()) + theirs.flush(zlib.Z_SYNC_FLUSH)
                    for p in packets]
    else:
        theirs = zstandard.ZstdCompressor(level=1).compressobj()
        payloads = [theirs.compress(p.tobytes())
                    + theirs.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for p in packets]
    decoder = codec.new_decoder()
    for pages, payload in zip(packets, payloads):
        assert (decode_as(decoder, payload, pages.shape[0], "scatter") == pages).all()


@pytest.mark.parametrize("level", range(0, 10))
def test_zlib_levels_pick_a_deflate_and_either_inflater_reads_it(level):
    """1..3 deflate with ISA-L, 0 and 4..9 with zlib; every level's stream is
    plain deflate that zlib and ISA-L both inflate, the QEMU way (per-packet
    sync flush, never ended)."""
    encoder = CODECS["zlib"].new_encoder(level)
    assert encoder.backend == ("isal" if level in ISAL_LEVELS else "zlib")
    packets = stream_packets(4, 5, 32)
    payloads = [b"".join(bytes(b) for b in encoder.encode(p)) for p in packets]
    if level == 0:
        assert sum(map(len, payloads)) > sum(p.nbytes for p in packets)  # stored
    for backend in ("zlib", "isal"):
        decoder = ZlibDecoder(backend)
        for pages, payload in zip(packets, payloads):
            assert (decode_as(decoder, payload, pages.shape[0], "scatter") == pages).all()


def test_zlib_backend_cannot_be_isal_outside_its_levels():
    with pytest.raises(CodecError, match="level 6"):
        ZlibEncoder(6, backend="isal")


def test_zlib_overrun_detected_with_isal_inflater():
    """ISA-L buffers output past max_length instead of leaving input in
    unconsumed_tail; a packet that inflates to more than its pages still fails."""
    pages = stream_packets(5, 1, 8)[0]
    payload = b"".join(bytes(b) for b in ZlibEncoder(1).encode(pages))
    with pytest.raises(CodecError, match="decompress"):
        ZlibDecoder("isal").decode(payload, np.zeros((7, PS), np.uint8))


# -- zero pages -----------------------------------------------------------------

def naive_zero_mask(pages: np.ndarray) -> np.ndarray:
    return np.array([not row.any() for row in pages], dtype=bool)


def planted(n: int, seed: int, page_size: int = PS) -> np.ndarray:
    """Random pages, about half of them zero, some with a single non-zero byte
    at the first, last or a random position (the cases a shortcut would miss)."""
    rng = np.random.default_rng(seed)
    pages = rng.integers(0, 256, (n, page_size), dtype=np.uint8)
    kind = rng.integers(0, 5, n)
    pages[kind <= 1] = 0
    lone = np.flatnonzero(kind == 2)
    pages[lone] = 0
    pos = rng.choice([0, page_size - 1, int(rng.integers(page_size))], lone.size)
    pages[lone, pos] = rng.integers(1, 256, lone.size, dtype=np.uint8)
    return pages


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_find_zero_pages_matches_naive(n, seed):
    pages = planted(n, seed)
    mask = find_zero_pages(pages)
    assert mask.dtype == bool and mask.shape == (n,)
    assert (mask == naive_zero_mask(pages)).all()


@given(pos=st.integers(0, PS - 1), value=st.integers(1, 255))
def test_any_single_non_zero_byte_is_seen(pos, value):
    pages = np.zeros((3, PS), np.uint8)
    pages[1, pos] = value
    assert find_zero_pages(pages).tolist() == [True, False, True]


@pytest.mark.parametrize("view", ["every_other_row", "odd_page_size", "column_stride",
                                  "unaligned"])
def test_find_zero_pages_on_unusual_layouts(view):
    base = planted(64, 7, 200)
    if view == "every_other_row":
        pages = planted(64, 7)[::2]
    elif view == "odd_page_size":
        pages = planted(50, 8, 100)
    elif view == "column_stride":
        pages = base[:, ::2]
    else:
        flat = np.zeros(64 * PS + 3, np.uint8)
        pages = flat[3:].reshape(64, PS)
        pages[:] = planted(64, 9)
    assert (find_zero_pages(pages) == naive_zero_mask(pages)).all()


def test_find_zero_pages_rejects_non_page_arrays():
    for bad in (np.zeros(PS, np.uint8), np.zeros((2, 8), np.uint64), b"\0" * PS):
        with pytest.raises(ConfigError):
            find_zero_pages(bad)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 400),
       order=st.sampled_from(["sorted", "shuffled", "runs", "duplicates"]))
def test_zero_page_mask_from_buffer_matches_naive(seed, n, order):
    rng = np.random.default_rng(seed)
    pages = planted(256, seed)
    if order == "sorted":
        rows = np.sort(rng.integers(0, 256, n))
    elif order == "shuffled":
        rows = rng.integers(0, 256, n)
    elif order == "runs":  # long adjacent stretches, crossing the gather chunks
        start = int(rng.integers(0, 256))
        rows = (start + np.arange(n)) % 256
    else:
        rows = np.repeat(rng.integers(0, 256, max(n // 3, 1)), 3)[:n]
    offsets = rows.astype(np.uint64) * PS
    expected = naive_zero_mask(pages)[rows]
    assert (zero_page_mask_from_buffer(pages.tobytes(), offsets, PS) == expected).all()
    assert (zero_page_mask_from_buffer(pages, offsets, PS) == expected).all()


def test_zero_page_mask_from_buffer_checks_offsets():
    buf = bytearray(4 * PS + 100)  # a trailing partial page is not a page
    with pytest.raises(ConfigError, match="multiples"):
        zero_page_mask_from_buffer(buf, [PS + 8])
    with pytest.raises(ConfigError, match="range"):
        zero_page_mask_from_buffer(buf, [4 * PS])
    with pytest.raises(ConfigError, match="range"):
        zero_page_mask_from_buffer(buf, np.array([-PS]))
    assert zero_page_mask_from_buffer(buf, np.array([], np.uint64)).shape == (0,)
    assert zero_page_mask_from_buffer(buf, [3 * PS, 0]).tolist() == [True, True]


def test_zero_pages_in_shared_memory():
    shm = SharedMemory(name=f"engine-test-zero-{secrets.token_hex(4)}",
                       create=True, size=128 * PS)
    try:
        pages = np.ndarray((128, PS), np.uint8, buffer=shm.buf)
        pages[:] = planted(128, 11)
        expected = naive_zero_mask(pages)
        assert (find_zero_pages(pages) == expected).all()
        offsets = np.arange(0, 128 * PS, 3 * PS, dtype=np.uint64)
        assert (zero_page_mask_from_buffer(shm.buf, offsets, PS)
                == expected[::3]).all()
        del pages
    finally:
        shm.close()
        shm.unlink()


# -- QEMU 7.2 captures ------------------------------------------------------------

needs_captures = pytest.mark.skipif(
    not (CAPTURES / "ram-4MiB.img").is_file(), reason=f"no QEMU 7.2 captures in {CAPTURES}")


def read_channel(path: Path):
    """(MultiFDInit, [(header, payload)]) of one captured multifd channel."""
    data = memoryview(path.read_bytes())
    init = MultiFDInit.unpack(data, channel=path.name)
    pos, packets, size = 64, [], packet_size(128)
    while pos < len(data):
        header = MultiFDPacketHeader.unpack(
            data[pos:pos + size], channel=path.name, stream_offset=pos,
            used_length=4 << 20)
        pos += size
        packets.append((header, data[pos:pos + header.payload_size]))
        pos += header.payload_size
    assert pos == len(data)
    return init, packets


@needs_captures
@pytest.mark.parametrize("name", sorted(CODECS))
def test_decode_qemu_7_2_multifd_channels(name):
    codec = CODECS[name]
    image = np.fromfile(CAPTURES / "ram-4MiB.img", np.uint8).reshape(-1, PS)
    ram = np.zeros_like(image)
    carried = np.zeros(image.shape[0], bool)
    for conn in (1, 2):
        _, packets = read_channel(CAPTURES / f"multifd2-{name}.conn{conn}")
        decoder = codec.new_decoder()  # one per channel, fed in channel order
        for header, payload in packets:
            header.check_compression(codec.flag, channel=conn)
            idx = (header.normal_offsets // PS).astype(np.intp)
            decoder.decode_scatter(payload, ram, idx)
            carried[idx] = True  # 7.2 may send a page twice (page 558 here)
    assert carried.sum() > 400
    assert (ram[carried] == image[carried]).all()
    # Whatever multifd did not carry went as ZERO records on the main channel.
    assert find_zero_pages(image[~carried]).all()


@needs_captures
@pytest.mark.parametrize("name", sorted(CODECS))
def test_reencode_qemu_7_2_pages(name):
    """Our encoder, fed the pages QEMU put in each packet, produces payloads
    that our decoder and the reference library turn back into those pages."""
    codec = CODECS[name]
    image = np.fromfile(CAPTURES / "ram-4MiB.img", np.uint8).reshape(-1, PS)
    for conn in (1, 2):
        _, packets = read_channel(CAPTURES / f"multifd2-{name}.conn{conn}")
        encoder, decoder = codec.new_encoder(), codec.new_decoder()
        # zlib's own deflate (levels 0, 4..9 use it; 1..3 use ISA-L) must
        # reproduce QEMU's bytes; ISA-L's differ but inflate the same.
        same_lib = ZlibEncoder(1, backend="zlib") if name == "zlib" else None
        ours, expected, identical = [], [], True
        for header, qemu_payload in packets:
            idx = (header.normal_offsets // PS).astype(np.intp)
            payload = b"".join(bytes(b) for b in encoder.encode_gather(image, idx))
            if same_lib is not None:
                theirs = b"".join(bytes(b) for b in same_lib.encode_gather(image, idx))
                identical &= theirs == bytes(qemu_payload)
            else:
                identical &= payload == bytes(qemu_payload)
            out = np.zeros((idx.size, PS), np.uint8)
            decoder.decode(payload, out)
            assert (out == image[idx]).all()
            ours.append(payload)
            expected.append(image[idx].tobytes())
        stream, plain = b"".join(ours), b"".join(expected)
        if name == "zlib":
            assert zlib.decompressobj().decompress(stream) == plain
            if zlib.ZLIB_RUNTIME_VERSION == "1.2.13":
                # Same zlib as Debian 12's QEMU 7.2, same parameters, same
                # per-packet sync flush: the bytes are QEMU's own.
                assert identical
        elif name == "zstd":
            assert zstandard.ZstdDecompressor().decompressobj().decompress(stream) == plain
        else:
            assert identical


@pytest.mark.parametrize("name", STREAM_CODECS)
def test_decode_bytes_gives_the_packet_as_one_buffer(name):
    """What the receiver writes to the block's file: the pages back to back,
    and the same size checks as decode()."""
    codec = CODECS[name]
    packets = stream_packets(6, 3, 16)
    encoder, decoder = codec.new_encoder(), codec.new_decoder()
    for pages in packets:
        payload = encoder.encode(pages)
        assert bytes(decoder.decode_bytes(payload, pages.shape[0], PS)) == pages.tobytes()
    payload = codec.new_encoder().encode(packets[0])
    with pytest.raises(CodecError, match="expected"):
        codec.new_decoder().decode_bytes(payload, packets[0].shape[0] + 1, PS)
