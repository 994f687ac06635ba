"""The source's parts work from what they are given, without a SourceMigration.

PostcopySource and MultifdSource get an Outbound, the RAM saver, the state
and (postcopy) the migration thread's hooks; these tests build exactly that
over a real guest and a real channel, nothing else.
"""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from engine.errors import RemoteProtocolError
from engine.migration.multifd_source import MultifdMode, MultifdSource
from engine.migration.outbound import Outbound
from engine.migration.postcopy_source import PostcopyHooks, PostcopySource
from engine.migration.ramsave import RamSaver
from engine.migration.ratelimit import RateLimiter
from engine.options import MigrationOptions
from engine.ram.guest import Guest
from engine.state import MigrationState, MigrationStatus as S
from engine.stats import StatsAccumulator
from engine.stream import returnpath as rp
from engine.transport import connect

PS = 4096
NPAGES = 64
DATA_PAGES = range(0, NPAGES, 2)        # every other page holds data, the rest are zero


@pytest.fixture
def parts():
    """(guest, ram, out, peer reader) over a real socketpair; closed afterwards."""
    guest = Guest.create([("ram0", NPAGES * PS)], vcpus=1, start=False)
    a, peer = socket.socketpair()
    received = bytearray()

    def drain():
        while chunk := peer.recv(1 << 16):
            received.extend(chunk)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        pages = guest.blocks[0].pages
        for i in DATA_PAGES:
            pages[i] = i + 1
        ram = RamSaver(guest, PS, detect_zero=True)
        ram.block_list()
        ram.sync()
        out = Outbound(StatsAccumulator(ram.total_bytes, PS), ram, threading.Lock())
        out.channel = connect(f"fd:{a.detach()}")

        def collected() -> bytes:
            assert out.channel is not None
            out.channel.close()
            reader.join(10)
            return bytes(received)
        yield guest, ram, out, collected
    finally:
        if out.channel is not None:
            out.channel.close()
        reader.join(10)
        peer.close()
        guest.close()


def _hooks(wake: threading.Event) -> PostcopyHooks:
    def unused(*args):
        raise AssertionError("not part of a page request")
    return PostcopyHooks(checkpoint=unused, wait_until=unused, wake=wake,
                         options=MigrationOptions.default, count_sync=unused,
                         device_sections=unused, end_ram_section=unused,
                         start_return_path=unused, stop_return_path=unused,
                         return_path=lambda: None)


def test_outbound_counts_a_batch_and_charges_the_phase_limit(parts):
    guest, ram, out, collected = parts
    out.limiter = limiter = RateLimiter(1 << 40)
    batch = ram.next_batch(NPAGES)
    assert batch is not None
    out.send_batch(batch)
    out.send_counted(b"\x00" * 9, b"\x01" * 7)
    info = out.stats.snapshot("active").ram
    assert info is not None
    assert (info.normal, info.duplicate) == (len(DATA_PAGES), NPAGES - len(DATA_PAGES))
    assert info.remaining == 0
    assert limiter.used == batch.wire_bytes     # the counted records are not charged
    wire = collected()
    assert len(wire) == batch.wire_bytes + 16
    assert info.transferred == len(wire)


def test_postcopy_source_checks_page_requests_from_what_it_was_given(parts):
    guest, ram, out, _ = parts
    state = MigrationState("source")
    wake = threading.Event()
    mfd = MultifdSource(out, ram, guest.blocks, MigrationOptions.default,
                        check_abort=lambda: None)
    assert mfd.mode is MultifdMode.OFF
    postcopy = PostcopySource(out, ram, state, mfd, _hooks(wake), preempt=False)

    with pytest.raises(RemoteProtocolError, match="unknown RAM block 'pc.ram'"):
        postcopy.on_page_request(rp.ReqPages(0, PS, "pc.ram"))
    with pytest.raises(RemoteProtocolError, match="not a range of whole 4096-byte pages"):
        postcopy.on_page_request(rp.ReqPages(PS // 2, PS, "ram0"))
    with pytest.raises(RemoteProtocolError, match="not a range of whole"):
        postcopy.on_page_request(rp.ReqPages((NPAGES - 1) * PS, 2 * PS, "ram0"))
    assert not wake.is_set() and not postcopy.requests

    postcopy.on_page_request(rp.ReqPages(3 * PS, 2 * PS, "ram0"))
    assert list(postcopy.requests) == [(0, 3, 2)]
    assert wake.is_set()        # the migration thread serves it
    info = out.stats.snapshot(S.POSTCOPY_ACTIVE).ram
    assert info is not None and info.postcopy_requests == 4


def test_multifd_source_without_a_pool_adds_nothing_to_the_stream(parts):
    guest, ram, out, collected = parts
    mfd = MultifdSource(out, ram, guest.blocks, MigrationOptions.default,
                        check_abort=lambda: None)
    ended = []
    mfd.setup_done()
    mfd.section_end()
    mfd.round_done(1)
    mfd.postcopy_prepare(lambda: ended.append(True))
    mfd.postcopy_sync()
    mfd.postcopy_finish()
    assert ended == [True] and mfd.mode is MultifdMode.OFF
    assert collected() == b""
    assert np.count_nonzero(ram.bitmaps[0].bits) == NPAGES     # nothing taken
