"""The source side of postcopy, against a scripted destination.

A real :class:`Guest` (vCPU processes, file-backed RAM) and a real
:class:`SourceMigration` over unix sockets; the destination is a set of
threads of this test built from :class:`StreamDecoder` and the return-path
encoders.  It keeps its own copy of guest memory, applies DISCARDs (a
discarded page is garbage until it arrives again), answers PINGs, asks for
pages with REQ_PAGES_ID / REQ_PAGES, answers RECV_BITMAP and POSTCOPY_RESUME
after a recovery, and says SHUT(0) after EOF.  Each test judges what came
on which channel, in which order, and that the destination's memory ends up
equal to the source's at switchover (the source guest stays stopped after
a postcopy, so its memory at the end is that).

The background is throttled with ``max-postcopy-bandwidth`` (one page per
100 ms window) while the destination asks for pages at the end of the
block, so the pages can only come as answers to the requests; the test then
lifts the limit to let the migration finish.
"""
from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InvalidCapabilityError, StateError
from engine.machine import RAM_SECTION_ID
from engine.migration.ramsave import discard_commands
from engine.ram.runs import mask_runs
from engine.migration.source import SourceMigration
from engine.options import MigrationOptions
from engine.state import MigrationStatus as S
from engine.stream import encoder as enc
from engine.stream import events as ev
from engine.stream import returnpath as rp
from engine.stream.constants import RAM_SECTION_IDSTR, RAM_SECTION_VERSION
from engine.stream.decoder import StreamDecoder
from engine.migration.channels import accept_channels
from engine.multifd.pool import RecvPool
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog
from engine.transport import connect, listen
from tests.e2e.sources import PROFILE, TIMEOUT, SourceGuest, statuses
from tests.e2e.sources import source  # noqa: F401 - the fixture

PS = 4096
#: precopy that cannot converge on its own (QEMU's migrate_ensure_non_converge)
NON_CONVERGING = {"max-bandwidth": 3_000_000, "downtime-limit": 1}
#: a postcopy background of about one page per 100 ms window
CRAWL = {"max-postcopy-bandwidth": 4096}
#: what a discarded page holds on the destination until it arrives again
GARBAGE = 0xEE


def options(caps=None, **params) -> MigrationOptions:
    return MigrationOptions.default().replace(caps or {}, {k.replace("_", "-"): v
                                                          for k, v in params.items()})


def postcopy_caps(preempt: bool) -> dict:
    return {"postcopy-ram": True, "postcopy-preempt": preempt}


def wait_until(cond, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def count_status(mig: SourceMigration, status: S) -> int:
    return sum(1 for _, s in mig.state.history if s is status)


# ---------------------------------------------------------------------------
# The destination's memory


class Image:
    """The destination's copy of guest RAM and what it knows about each page.

    ``blocks``: the destination's own RAM blocks to write into (for multifd
    workers to write into them too); by default private arrays.
    """

    def __init__(self, guest, blocks=None):
        if blocks is None:
            self.pages = {b.idstr: np.zeros((b.npages, PS), np.uint8) for b in guest.blocks}
        else:
            self.pages = {b.idstr: b.pages for b in blocks}
        self.received = {b.idstr: np.zeros(b.npages, bool) for b in guest.blocks}
        self.discarded = {b.idstr: np.zeros(b.npages, bool) for b in guest.blocks}
        #: how often each page came after the discards (any channel)
        self.after_discard = {b.idstr: np.zeros(b.npages, np.int32) for b in guest.blocks}
        #: (block, page) -> channels it came on after the discards
        self.arrivals: dict[tuple[str, int], list[str]] = {}
        self.discard_seen = False
        self.lock = threading.Lock()

    def place(self, block: str, offset: int, data, channel: str) -> None:
        page = offset // PS
        with self.lock:
            if data is None:
                self.pages[block][page] = 0
            else:
                self.pages[block][page] = np.frombuffer(data, np.uint8)
            self.received[block][page] = True
            if self.discard_seen:
                self.after_discard[block][page] += 1
                self.arrivals.setdefault((block, page), []).append(channel)

    def discard(self, block: str, ranges) -> None:
        with self.lock:
            self.discard_seen = True
            for start, length in ranges:
                assert start % PS == 0 and length % PS == 0 and length > 0, (start, length)
                first, end = start // PS, (start + length) // PS
                assert not self.discarded[block][first:end].any(), "discarded twice"
                self.discarded[block][first:end] = True
                self.received[block][first:end] = False
                self.pages[block][first:end] = GARBAGE

    def missing(self, block: str) -> np.ndarray:
        with self.lock:
            return np.flatnonzero(~self.received[block])

    def has(self, block: str, first: int, count: int = 1) -> bool:
        with self.lock:
            return bool(self.received[block][first:first + count].all())

    def assert_equals(self, guest) -> None:
        for b in guest.blocks:
            assert self.received[b.idstr].all(), \
                f"{int((~self.received[b.idstr]).sum())} pages never arrived"
            differ = np.flatnonzero((self.pages[b.idstr] != b.pages).any(axis=1))
            assert len(differ) == 0, f"{len(differ)} pages differ, first {differ[:8]}"

    def assert_sent_once_after_discard(self) -> None:
        for block, counts in self.after_discard.items():
            assert counts.max(initial=0) <= 1, \
                f"pages sent twice after the discard: {np.flatnonzero(counts > 1)[:8]}"
            # exactly the discarded pages, each once
            assert np.array_equal(counts.astype(bool), self.discarded[block])


# ---------------------------------------------------------------------------
# The scripted destination


class Cut(Exception):
    """The script hangs up on purpose."""


class SourceGone(Exception):
    """The source hung up while the script was answering."""


class Destination:
    """Listens on a unix socket; main channel (and preempt channel) in threads.

    ``resumed``: the main channel is a recovery's (no header; RAM section
    known from before).  ``fail_in_package``: hang up on reading PING 0x42
    inside the package, before answering it.  ``hang_up_on_recv_bitmap``:
    hang up on reading the first RECV_BITMAP.
    """

    def __init__(self, tmp_path: Path, name: str, image: Image, nvcpus: int, *,
                 preempt: bool = False, resumed: bool = False, fail_in_package: bool = False,
                 hang_up_on_recv_bitmap: bool = False, block_list=None, multifd=None):
        self.path = str(tmp_path / f"{name}.sock")
        self.uri = f"unix:{self.path}"
        self.image = image
        self.lookup = PROFILE.lookup(nvcpus)
        self.preempt = preempt
        self.resumed = resumed
        self.fail_in_package = fail_in_package
        self.hang_up_on_recv_bitmap = hang_up_on_recv_bitmap
        self.block_list = block_list          # RamBlockInfo tuple, for a resumed channel
        self.events: list[str] = []           # main channel, RAM records left out
        self.package: list[str] = []
        self.advise = None
        self.blocks_known = threading.Event()
        self.packaged = threading.Event()
        self.finished = threading.Event()     # EOF read, SHUT(0) sent
        self.source_hung_up = threading.Event()
        self.preempt_eos = False
        self.closing = False
        self._closed = False
        self.errors: list[BaseException] = []
        self.conns: list[socket.socket] = []
        self._rp_lock = threading.Lock()
        self._main: socket.socket | None = None
        self._rp_open = resumed
        #: (RecvPool, received DirtyLogs): multifd channels go to the pool's
        #: workers until the "postcopy prepare" section's sync
        self.multifd = multifd
        self._keep: list = []                 # engine Channels whose sockets we use
        self.multifd_live = multifd is not None
        self.multifd_syncing = False
        self.multifd_pages = 0
        if multifd is not None:
            self._listener = listen(self.uri)
        else:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(self.path)
            self._listener.listen(4)
            self._listener.settimeout(TIMEOUT)
        self._threads = [threading.Thread(target=self._guard, args=(self._accept,), daemon=True)]
        self._threads[0].start()

    # -- plumbing ------------------------------------------------------------------
    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Cut:
            self.cut()
        except SourceGone:
            pass
        except BaseException as exc:    # noqa: BLE001 - reported by close()
            if not self.closing:
                self.errors.append(exc)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=self._guard, args=(fn, *args), daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_one(self) -> socket.socket:
        if self.multifd is None:
            conn, _ = self._listener.accept()
        else:
            ch = self._listener.accept(timeout=TIMEOUT)
            self._keep.append(ch)
            conn = ch.sock
        self.conns.append(conn)
        return conn

    def _accept(self) -> None:
        if self.multifd is None:
            conn = self._accept_one()
        else:
            pool = self.multifd[0]
            main, channels = accept_channels(self._listener, pool.n, timeout=TIMEOUT)
            for channel_id, ch in sorted(channels.items()):
                pool.attach(channel_id, ch.sock)
                ch.close()
            self._keep.append(main)
            conn = main.sock
            self.conns.append(conn)
        self._main = conn
        self._spawn(self._read_main, conn)
        if self.preempt:
            self._spawn(self._read_preempt, self._accept_one())

    def send_rp(self, data: bytes) -> None:
        with self._rp_lock:
            assert self._main is not None and self._rp_open, "no return path"
            try:
                self._main.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                self.source_hung_up.set()
                raise SourceGone from None

    def request(self, block: str, first: int, count: int = 1, *, named: bool) -> None:
        """REQ_PAGES_ID (``named``) or REQ_PAGES for ``count`` pages at ``first``."""
        if named:
            self.send_rp(rp.rp_req_pages_id(first * PS, count * PS, block))
        else:
            self.send_rp(rp.rp_req_pages(first * PS, count * PS))

    def cut(self) -> None:
        """Hang up every channel: a network failure, as the source sees it."""
        self.closing = True
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Hang up first: after a failed test the source may still be sending.
        self.cut()
        for t in self._threads:
            t.join(TIMEOUT)
            assert not t.is_alive(), "destination thread hung"
        for c in self.conns:
            c.close()
        for ch in self._keep:
            ch.close()
        with contextlib.suppress(FileNotFoundError):
            Path(self.path).unlink()
        assert not self.errors, self.errors

    # -- the main channel ------------------------------------------------------------
    def _read_main(self, conn: socket.socket) -> None:
        dec = StreamDecoder(self.lookup, expect_header=not self.resumed, channel="main")
        if self.resumed:
            # A recovered channel goes on with the RAM section the first one
            # started: replay that start so the decoder knows it.
            blocks = [(b.idstr, b.used_length) for b in self.block_list]
            dec.feed(enc.section_start(RAM_SECTION_ID, RAM_SECTION_IDSTR, 0,
                                       RAM_SECTION_VERSION)
                     + enc.ram_block_list(blocks) + enc.ram_eos()
                     + enc.section_footer(RAM_SECTION_ID))
            while dec.next_event() is not ev.NEED_DATA:
                pass
            self.blocks_known.set()
        while True:
            data = conn.recv(1 << 20)
            if not data:
                if not self.finished.is_set():
                    self.source_hung_up.set()
                return
            dec.feed(data)
            while True:
                e = dec.next_event()
                if e is ev.NEED_DATA:
                    break
                self._on_main(conn, e)

    def _on_main(self, conn, e) -> None:
        if isinstance(e, ev.RamPage):
            self.image.place(e.block, e.offset, e.data, "main")
            return
        if isinstance(e, ev.RamZero):
            self.image.place(e.block, e.offset, None, "main")
            return
        if isinstance(e, ev.RamEOS):
            if self.multifd is not None and self.multifd_live:
                self.multifd[0].sync()      # QEMU 7.2: every RAM section's EOS
            elif self.multifd is not None and self.multifd_syncing:
                self.multifd[0].sync_open()     # ... in postcopy too, no pages
            return
        name = type(e).__name__
        self.events.append(f"Ping({e.value})" if isinstance(e, ev.Ping) else name)
        if self.multifd_live and isinstance(e, (ev.PostcopyRamDiscard, ev.Ping)) \
                and (isinstance(e, ev.PostcopyRamDiscard) or e.value == 2):
            self._end_multifd()         # after the prepare section, before the discards
        if isinstance(e, ev.OpenReturnPath):
            self._rp_open = True
        elif isinstance(e, ev.Ping):
            self.send_rp(rp.rp_pong(e.value))
        elif isinstance(e, ev.RamBlockList):
            self.block_list = e.blocks
            self.blocks_known.set()
        elif isinstance(e, ev.PostcopyAdvise):
            self.advise = (e.page_size_summary, e.target_page_size)
        elif isinstance(e, ev.PostcopyRamDiscard):
            self.image.discard(e.block, e.ranges)
        elif isinstance(e, ev.Packaged):
            self._load_package(e.data)
        elif isinstance(e, ev.RecvBitmap):
            if self.hang_up_on_recv_bitmap:
                raise Cut
            with self.image.lock:
                bits = self.image.received[e.block].copy()
            self.send_rp(rp.rp_recv_bitmap(e.block) + rp.encode_recv_bitmap(bits))
        elif isinstance(e, ev.PostcopyResume):
            self.send_rp(rp.rp_resume_ack(1))
        elif isinstance(e, ev.Eof):
            if self._rp_open:
                self.send_rp(rp.rp_shut(0))
            if self.multifd is not None and self.multifd_syncing:
                self.multifd[0].finish()    # the source says BYE after SHUT
                self.multifd_syncing = False
            self.finished.set()

    def _end_multifd(self) -> None:
        """After the prepare section's sync every multifd page is in place;
        what they delivered counts as received.  The channels stay open and
        keep syncing at each EOS (QEMU 7.2) until the end."""
        pool, logs = self.multifd
        self.multifd_live = False
        self.multifd_syncing = True
        with self.image.lock:
            for log, received in zip(logs, self.image.received.values()):
                self.multifd_pages += int(np.count_nonzero(log.log))
                received |= log.log.astype(bool)

    def _load_package(self, blob: bytes) -> None:
        dec = StreamDecoder(self.lookup, expect_header=False, channel="package")
        dec.feed(blob)
        dec.feed_eof()
        while True:
            e = dec.next_event()
            if e is ev.NEED_DATA:
                break
            self.package.append(f"Ping({e.value})" if isinstance(e, ev.Ping)
                                else type(e).__name__)
            if isinstance(e, ev.Ping):
                if e.value == 0x42 and self.fail_in_package:
                    raise Cut
                self.send_rp(rp.rp_pong(e.value))
        assert dec.finished
        self.packaged.set()

    # -- the preempt channel -----------------------------------------------------------
    def _read_preempt(self, conn: socket.socket) -> None:
        assert self.blocks_known.wait(TIMEOUT)
        dec = StreamDecoder(self.lookup, ram_records_only=True, ram_blocks=self.block_list,
                            channel="preempt")
        while True:
            data = conn.recv(1 << 16)
            if not data:
                return
            dec.feed(data)
            while True:
                e = dec.next_event()
                if e is ev.NEED_DATA:
                    break
                if isinstance(e, ev.RamPage):
                    self.image.place(e.block, e.offset, e.data, "preempt")
                elif isinstance(e, ev.RamZero):
                    self.image.place(e.block, e.offset, None, "preempt")
                elif isinstance(e, ev.RamEOS):
                    self.preempt_eos = True
                else:
                    raise AssertionError(f"{e!r} on the preempt channel")


class Runner:
    """``mig.run`` in a thread, over a new connection to ``uri``."""

    def __init__(self, mig: SourceMigration, uri: str):
        self.mig = mig
        self.info = None
        self.error: BaseException | None = None
        self.channel = connect(uri)
        self._thread = threading.Thread(target=self._run, args=(uri,), daemon=True)
        self._thread.start()

    def _run(self, uri):
        try:
            self.info = self.mig.run(self.channel, uri)
        except BaseException as exc:    # noqa: BLE001 - reported by join()
            self.error = exc

    def join(self):
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), f"the migration hung in {self.mig.state.status}"
        self.channel.close()
        assert self.error is None, self.error
        return self.info


def start_postcopy_when_streaming(mig: SourceMigration, nbytes: int = 1 << 20) -> None:
    """migrate-start-postcopy once precopy has sent ``nbytes``."""
    wait_until(lambda: mig.state.status is S.ACTIVE and mig.stats.transferred >= nbytes,
               "precopy to stream")
    mig.start_postcopy()


def far_missing_pages(image: Image, block: str) -> tuple[int, int, int]:
    """Three requests' first pages among the pages still missing, far from the
    background scan (which starts at the beginning of the block): the last
    missing page, one before it, and the start of a 3-page missing run."""
    missing = image.missing(block)
    assert len(missing) > 1000, f"only {len(missing)} pages left for postcopy"
    last = int(missing[-1])
    second = int(missing[-100])
    # p with p, p + 1 and p + 2 all missing, between the middle and ``second``
    threes = missing[:-2][missing[2:] - missing[:-2] == 2]
    threes = threes[(threes > missing[len(missing) // 2]) & (threes < second - 3)]
    assert len(threes), "no run of 3 missing pages"
    return last, second, int(threes[-1])


# ---------------------------------------------------------------------------
# Pure parts


@pytest.mark.parametrize("seed", range(5))
def test_discard_commands_match_the_encoder(seed):
    rng = np.random.default_rng(seed)
    bits = rng.random(rng.integers(1, 3000)) < rng.random()
    starts, counts = mask_runs(bits)
    expect = np.zeros_like(bits)
    for s, n in zip(starts, counts):
        expect[s:s + n] = True
        assert not bits[s - 1] if s else True
    assert np.array_equal(expect, bits)
    ranges = [(int(s) * PS, int(n) * PS) for s, n in zip(starts, counts)]
    got = discard_commands("pc.ram", starts.astype(np.uint64) * PS, counts.astype(np.uint64) * PS)
    assert got == enc.postcopy_ram_discard("pc.ram", ranges)


def test_start_postcopy_needs_the_capability(tmp_shm_path):
    g = SourceGuest("none", tmp_shm_path)
    try:
        mig = SourceMigration(g.guest, PROFILE, options(), vcpus=g.guest.nvcpus)
        with pytest.raises(InvalidCapabilityError, match="postcopy-ram"):
            mig.start_postcopy()
        with pytest.raises(InvalidCapabilityError, match="postcopy-ram"):
            SourceMigration(g.guest, PROFILE, options(), postcopy_after=1)
        mig = SourceMigration(g.guest, PROFILE, options({"postcopy-ram": True}))
        with pytest.raises(StateError):
            mig.start_postcopy()        # no migration yet
        with pytest.raises(StateError):
            mig.pause()
        with pytest.raises(StateError):
            mig.resume("unix:/nonexistent")
    finally:
        g.close()


# ---------------------------------------------------------------------------
# A whole postcopy


@pytest.mark.parametrize("preempt", [False, True], ids=["main", "preempt"])
def test_postcopy_serves_requests_and_completes(tmp_path, source, preempt):
    g = source.guest
    image = Image(g)
    dest = Destination(tmp_path, "dest", image, g.nvcpus, preempt=preempt)
    try:
        mig = source.migration(options(postcopy_caps(preempt), **NON_CONVERGING, **CRAWL))
        run = Runner(mig, dest.uri)
        start_postcopy_when_streaming(mig)
        assert dest.packaged.wait(TIMEOUT)
        assert mig.state.wait_for(S.POSTCOPY_ACTIVE, timeout=TIMEOUT)
        with pytest.raises(StateError, match="cannot cancel"):
            mig.cancel()
        with pytest.raises(StateError):
            mig.start_postcopy()

        block = g.blocks[0].idstr
        last, second, run3 = far_missing_pages(image, block)
        asked = [(last, 1, True), (second, 1, False), (run3, 3, False), (last, 1, False)]
        for first, count, named in asked:
            dest.request(block, first, count, named=named)
            wait_until(lambda: image.has(block, first, count), f"page {first} to arrive")
        channel = "preempt" if preempt else "main"
        for first, count, _ in asked:
            for page in range(first, first + count):
                # once (the repeated request finds the page sent), on its channel
                assert image.arrivals[(block, page)] == [channel], (page, image.arrivals)

        mig.set_parameters({"max-postcopy-bandwidth": 0})
        info = run.join()
        assert dest.finished.wait(TIMEOUT)
        q = info.to_qmp()
        assert q["status"] == "completed", q
        assert q["ram"]["postcopy-requests"] == len(asked)
        assert q["ram"]["postcopy-bytes"] > 0
        assert statuses(mig)[-5:] == ["active", "device", "postcopy-device",
                                      "postcopy-active", "completed"]
    finally:
        dest.close()

    # the main channel, in order
    assert dest.events[:5] == ["FileHeader", "Configuration", "OpenReturnPath", "Ping(1)",
                               "PostcopyAdvise"]
    assert dest.advise == (PS, PS)
    i2, ipkg = dest.events.index("Ping(2)"), dest.events.index("Packaged")
    ndiscard = dest.events.count("PostcopyRamDiscard")
    assert ndiscard >= 1
    # the prepare section, the discards right before PING 2, then the package
    assert dest.events[i2 - ndiscard - 2:i2] == ["SectionPart", "SectionFooter"] \
        + ["PostcopyRamDiscard"] * ndiscard
    assert dest.events[i2:ipkg + 2] == ["Ping(2)", "Packaged", "Ping(4)"]
    assert dest.events[-3:] == ["SectionEnd", "SectionFooter", "Eof"]
    ndev = len(PROFILE.devices(g.nvcpus))
    assert dest.package == ["PostcopyListen"] + ["DeviceState", "SectionFooter"] * ndev \
        + ["Ping(3)", "Ping(66)", "PostcopyRun"]
    assert dest.preempt_eos is preempt
    assert mig.pongs[:4] == [1, 2, 3, 0x42] and 4 in mig.pongs

    # the memory: every page right, each discarded page sent exactly once
    assert not g.running, "the source guest must stay stopped after a postcopy"
    image.assert_equals(g)
    image.assert_sent_once_after_discard()


# ---------------------------------------------------------------------------
# Failures


def test_failure_while_loading_the_package_restarts_the_source(tmp_path, source):
    """The destination hangs up before answering PING 0x42: in postcopy-device
    the source still owns the guest, so it fails as a precopy would."""
    g = source.guest
    dest = Destination(tmp_path, "dest", Image(g), g.nvcpus, fail_in_package=True)
    try:
        mig = source.migration(options(postcopy_caps(False)), postcopy_after=0)
        info = Runner(mig, dest.uri).join()
    finally:
        dest.close()
    q = info.to_qmp()
    assert q["status"] == "failed", q
    assert q.get("error-desc"), q
    assert "postcopy-device" in statuses(mig)
    assert "postcopy-active" not in statuses(mig)
    assert dest.package[-2:] == ["Ping(3)", "Ping(66)"]      # read, never answered
    assert 0x42 not in mig.pongs
    source.assert_intact()

    # the same guest migrates again (postcopy once more)
    image = Image(g)
    dest = Destination(tmp_path, "again", image, g.nvcpus)
    try:
        mig = source.migration(options(postcopy_caps(False)), postcopy_after=1)
        info = Runner(mig, dest.uri).join()
    finally:
        dest.close()
    assert info.status == "completed", info.to_qmp()
    assert "postcopy-active" in statuses(mig)
    image.assert_equals(g)


def _postcopy_crawling(tmp_path, sg: SourceGuest, image: Image, preempt: bool):
    """A migration in postcopy-active, its background crawling, one page
    requested and delivered; returns the destination, the migration, its
    runner and the page."""
    dest = Destination(tmp_path, "first", image, sg.guest.nvcpus, preempt=preempt)
    mig = sg.migration(options(postcopy_caps(preempt), **NON_CONVERGING, **CRAWL))
    run = Runner(mig, dest.uri)
    start_postcopy_when_streaming(mig)
    assert mig.state.wait_for(S.POSTCOPY_ACTIVE, timeout=TIMEOUT)
    block = sg.guest.blocks[0].idstr
    last, _, _ = far_missing_pages(image, block)
    dest.request(block, last, named=True)
    wait_until(lambda: image.has(block, last), "the requested page")
    return dest, mig, run, last


@pytest.mark.parametrize("preempt", [False, True], ids=["main", "preempt"])
@pytest.mark.parametrize("how", ["cut", "migrate-pause"])
def test_recovery_after_a_broken_channel(tmp_path, tmp_shm_path, preempt, how):
    sg = SourceGuest("none", tmp_shm_path)
    image = Image(sg.guest)
    nv = sg.guest.nvcpus
    dests = []
    try:
        dest, mig, run, asked = _postcopy_crawling(tmp_path, sg, image, preempt)
        dests.append(dest)
        if how == "cut":
            dest.cut()
        else:
            mig.pause()
            assert dest.source_hung_up.wait(TIMEOUT)
        assert mig.state.wait_for(S.POSTCOPY_PAUSED, timeout=TIMEOUT)
        # Bytes in flight when the channel broke never arrive: say the last
        # page asked for and the first precopy pages were among them.  Only
        # the received bitmaps can tell the source to send them again.
        dest.close()            # its threads are done with the image
        block = sg.guest.blocks[0].idstr
        lost = np.r_[asked, 0:8]
        with image.lock:
            assert image.received[block][lost].all()
            image.received[block][lost] = False
            image.pages[block][lost] = GARBAGE
        assert mig.info().status == "postcopy-paused"
        with pytest.raises(StateError):
            mig.cancel()
        with pytest.raises(StateError):
            mig.pause()

        # 1. nobody listens there: back to postcopy-paused
        mig.resume(f"unix:{tmp_path / 'nobody.sock'}")
        wait_until(lambda: count_status(mig, S.POSTCOPY_PAUSED) == 2, "a second pause")
        assert statuses(mig)[-2:] == ["postcopy-recover-setup", "postcopy-paused"]

        # 2. the new channel breaks during the recovery: back again
        bad = Destination(tmp_path, "bad", image, nv, resumed=True,
                          hang_up_on_recv_bitmap=True, block_list=dest.block_list)
        dests.append(bad)
        mig.resume(bad.uri)
        wait_until(lambda: count_status(mig, S.POSTCOPY_PAUSED) == 3, "a third pause")
        assert statuses(mig)[-3:] == ["postcopy-recover-setup", "postcopy-recover",
                                      "postcopy-paused"]

        # 3. a good one: bitmaps, resume, the rest, done
        mig.set_parameters({"max-postcopy-bandwidth": 0})
        good = Destination(tmp_path, "good", image, nv, resumed=True, preempt=preempt,
                           block_list=dest.block_list)
        dests.append(good)
        mig.resume(good.uri)
        info = run.join()
        assert info.status == "completed", info.to_qmp()
        assert good.finished.wait(TIMEOUT)
        for d in dests:
            d.close()
        nblocks = len(sg.guest.blocks)
        assert good.events[:nblocks + 1] == ["RecvBitmap"] * nblocks + ["PostcopyResume"]
        assert good.events[-3:] == ["SectionEnd", "SectionFooter", "Eof"]
        assert good.preempt_eos is preempt
        assert statuses(mig)[-4:] == ["postcopy-recover-setup", "postcopy-recover",
                                      "postcopy-active", "completed"]
        image.assert_equals(sg.guest)
    finally:
        for d in dests:
            d.close()
        sg.close()


def test_ctrl_c_in_postcopy_active_fails_without_restarting(tmp_path, tmp_shm_path):
    """The destination runs the guest: Ctrl-C cannot give it back to the source.

    The migration ends saying so, the source guest stays stopped with its
    memory as it was, and nothing is left running."""
    sg = SourceGuest("none", tmp_shm_path)
    dest = None
    main = threading.main_thread().ident
    assert threading.get_ident() == main
    try:
        dest = Destination(tmp_path, "dest", Image(sg.guest), sg.guest.nvcpus, preempt=True)
        mig = sg.migration(options(postcopy_caps(True), **NON_CONVERGING, **CRAWL))

        def interrupt():
            start_postcopy_when_streaming(mig)
            assert mig.state.wait_for(S.POSTCOPY_ACTIVE, timeout=TIMEOUT)
            signal.pthread_kill(main, signal.SIGINT)
        watcher = threading.Thread(target=interrupt, daemon=True)
        old = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            watcher.start()
            with connect(dest.uri) as channel, pytest.raises(KeyboardInterrupt):
                mig.run(channel, dest.uri)
            watcher.join(TIMEOUT)
        finally:
            signal.signal(signal.SIGINT, old)
        assert dest.source_hung_up.wait(TIMEOUT)
        dest.close()
        assert not sg.guest.running, "the source guest must not run a second time"
        assert sg._digest() == sg.digest, "the source wrote guest memory"
        assert mig.preempt_channel is None and mig.return_path is None
        assert "split" in str(mig.error) and "stale" in str(mig.error), mig.error
        q = mig.info().to_qmp()
        assert q["status"] == "failed", q
        assert "split" in q["error-desc"]
    finally:
        if dest is not None:
            dest.close()
        sg.close()


def test_multifd_in_precopy_then_postcopy(tmp_path, tmp_shm_path):
    """Multifd carries the precopy pages; the "postcopy prepare" section's sync
    puts them in place, the channels only sync from then on, and postcopy pages (background and
    requested) come on the main channel."""
    sg = SourceGuest("none", tmp_shm_path)
    nch = 2
    blocks, logs, pool, dest = [], [], None, None
    try:
        for b in sg.guest.blocks:
            blocks.append(RamBlock.create(b.idstr, b.used_length))
            logs.append(DirtyLog.create(b.npages))
        pool = RecvPool(nch, blocks, logs)
        image = Image(sg.guest, blocks)
        dest = Destination(tmp_path, "dest", image, sg.guest.nvcpus, multifd=(pool, logs))
        g = sg.guest.blocks[0]

        def rewrite(passes):
            # The guest rewrites the last quarter of its memory during the
            # first pass (multifd's rate limit sees bytes only once they are
            # acknowledged, so throttling cannot keep pages for postcopy).
            tail = np.arange(g.npages * 3 // 4, g.npages)
            g.pages[tail] = np.random.default_rng(1).integers(0, 256, (len(tail), PS),
                                                              dtype=np.uint8)
            sg.guest.dirty_log(g.idstr).mark_pages(tail)
        mig = sg.migration(options({"postcopy-ram": True, "multifd": True},
                                   multifd_channels=nch, **CRAWL),
                           on_pass=rewrite, postcopy_after=1)
        run = Runner(mig, dest.uri)
        assert mig.state.wait_for(S.POSTCOPY_ACTIVE, timeout=TIMEOUT)
        block = sg.guest.blocks[0].idstr
        last, second, _ = far_missing_pages(image, block)
        for first, named in ((last, True), (second, False)):
            dest.request(block, first, named=named)
            wait_until(lambda: image.has(block, first), f"page {first} to arrive")
            assert image.arrivals[(block, first)] == ["main"]
        mig.set_parameters({"max-postcopy-bandwidth": 0})
        info = run.join()
        assert info.status == "completed", info.to_qmp()
        assert dest.finished.wait(TIMEOUT)
        dest.close()
        assert dest.multifd_pages > 0 and not dest.multifd_live
        assert info.ram.multifd_bytes > 0
        image.assert_equals(sg.guest)
        image.assert_sent_once_after_discard()
    finally:
        if dest is not None:
            dest.close()
        if pool is not None:
            pool.kill()
        for x in blocks + logs:
            x.close()
            x.unlink()
        sg.close()
