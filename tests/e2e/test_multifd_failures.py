"""Multifd failures: a worker or a channel lost mid-migration, bad packets, cancel.

In-process tests run a real :class:`SourceMigration` (its own send workers)
against a real :class:`DestinationMigration` (its own receive workers) or a
fake destination, over unix sockets, with the source guest of
test_source_inprocess: a pre-filled image that must come out byte-identical
(``none``) or whose ``ab`` loop must keep running (``ab``).  After every
failure:

* the migration failed (or was cancelled) with an error naming the channel;
* the source guest runs, memory intact;
* the destination failed and did not resume its guest;
* every worker process of both sides is gone (and, by the suite's checks,
  every segment);
* a second migration of the same guest to a good destination completes.

Bad bytes on a multifd channel come from a fake source (this test) talking
to ``engine incoming --cap multifd=on``: the command must exit 1 with an
error naming the channel and what was wrong, and leave nothing behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import re
import selectors
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import psutil
import pytest

from engine.errors import ChannelBrokenError
from engine.machine import RAM_SECTION_ID
from engine.migration.channels import accept_channels
from engine.migration.destination import DestinationMigration
from engine.migration.source import SourceMigration
from engine.multifd.packet import (MULTIFD_INIT_SIZE, MULTIFD_MAGIC, MultiFDInit,
                                   MultiFDPacketHeader)
from engine.options import MigrationOptions
from engine.ram.guest import Guest
from engine.stream import encoder as enc
from engine.stress import leaks
from engine.stream.constants import RAM_SECTION_IDSTR, RAM_SECTION_VERSION
from engine.transport import listen
from tests.e2e.sources import (PROFILE, TIMEOUT, SourceGuest, assert_failed,  # noqa: F401
                               run_bounded, source, statuses)
from tests.conftest import _leaked_shm, _shm_names

PAGE = 4096
#: bound on every wait of these tests (seconds)
CHANNELS = 3
#: the channel that fails (not the first, not the last)
VICTIM = 1
#: QEMU's migration-test settings for a migration that must not converge
NON_CONVERGING = {"max-bandwidth": 3_000_000, "downtime-limit": 1}
ENGINE = [sys.executable, "-m", "engine"]


def options(caps=None, **params) -> MigrationOptions:
    caps = {"multifd": True, **(caps or {})}
    params = {"multifd-channels": CHANNELS,
              **{k.replace("_", "-"): v for k, v in params.items()}}
    return MigrationOptions.default().replace(caps, params)


# ---------------------------------------------------------------------------
# Processes


def live_children() -> set[int]:
    """Pids of this test's live descendants (zombies and stdlib helpers aside)."""
    return set(leaks.live_children())


def assert_gone(pids, baseline: set[int]) -> None:
    """Every pid in ``pids`` has exited and no process beyond ``baseline`` runs."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        alive = {pid for pid in pids if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE}
        extra = live_children() - baseline
        if not alive and not extra:
            return
        assert time.monotonic() < deadline, \
            f"multifd workers still running: {sorted(alive)}, new processes: {sorted(extra)}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# The source guest


class FirstAck:
    """A migration's ``on_multifd_ack``: :meth:`arm`'s ``act()`` runs in the
    migration thread once the first batch has been acknowledged.

    The hook sits in the acknowledgement path, so the failure lands
    mid-stream at the same point however fast the machine is: the channels
    are open, pages have moved, more are on their way.
    """

    def __init__(self):
        self._act = None

    def arm(self, mig: SourceMigration, act) -> None:
        def run():
            assert mig.state.status.value == "active"
            act()
        self._act = run

    def __call__(self) -> None:
        act, self._act = self._act, None
        if act is not None:
            act()


def kill(proc) -> None:
    """SIGKILL a worker and wait until it is dead."""
    proc.kill()
    proc.join(TIMEOUT)
    assert proc.exitcode is not None


# ---------------------------------------------------------------------------
# Destinations


class Destination:
    """A DestinationMigration with its receive workers, in a thread, on a unix socket."""

    def __init__(self, tmp_path: Path, src: SourceGuest, opts: MigrationOptions,
                 name: str = "dst"):
        g = src.guest
        self.guest = Guest.create([(b.idstr, b.used_length, None) for b in g.blocks],
                                  vcpus=g.nvcpus, workload=g.workload, start=False)
        self.listener = listen(f"unix:{tmp_path / name}.sock")
        self.uri = self.listener.uri
        self.mig = DestinationMigration(PROFILE, opts, guest=self.guest, vcpus=g.nvcpus,
                                        verify=True, ab_check=src.kind == "ab")
        self.mig.prepare()           # workers start in the test's thread
        self.worker_pids = [p.pid for p in self.mig.pool.procs]
        self.info = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            with self.listener:
                main, multifd = accept_channels(self.listener, CHANNELS, timeout=TIMEOUT)
            with main:
                self.info = self.mig.run(main, multifd)
        except BaseException as exc:   # noqa: BLE001 - reported by join()
            self.error = exc

    def join(self):
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "destination hung"
        assert self.error is None, self.error
        return self.info

    def assert_failed(self) -> str:
        info = self.join()
        q = info.to_qmp()
        assert q["status"] == "failed", q
        assert not self.guest.running, "a failed destination resumed its guest"
        return q["error-desc"]

    def close(self):
        self.listener.close()
        self._thread.join(TIMEOUT)
        self.mig.close()         # in case run() never ran
        self.guest.close()


def migrate_again(tmp_path: Path, src: SourceGuest) -> None:
    """A second multifd migration of the same guest to a good destination completes."""
    src.assert_intact()
    opts = options({"return-path": True})
    dest = Destination(tmp_path, src, opts, name="again")
    try:
        mig = src.migration(opts)
        mig.compute_digests = True
        info = run_bounded(mig, dest.uri)
        assert info.status == "completed", info.to_qmp()
        dinfo = dest.join()
        assert dinfo.status == "completed", dinfo.to_qmp()
        assert info.to_qmp()["ram"]["multifd-bytes"] > 0
        assert mig.switchover_digests == dest.mig.digests
        if src.kind == "ab":
            assert dest.mig.ab_result.ok, dest.mig.ab_result
        else:
            assert mig.switchover_digests["ram0"] == src.digest
    finally:
        dest.close()


# ---------------------------------------------------------------------------
# A worker dies


def test_source_worker_killed(tmp_path, source):
    opts = options({"return-path": True}, **NON_CONVERGING)
    dest = Destination(tmp_path, source, opts)
    try:
        first = FirstAck()
        mig = source.migration(opts, on_multifd_ack=first)
        workers = [p.pid for p in mig.pool.procs]
        baseline = live_children() - set(workers) - set(dest.worker_pids)
        first.arm(mig, lambda: kill(mig.pool.procs[VICTIM]))
        info = run_bounded(mig, dest.uri)
        desc = assert_failed(info, mig)
        assert f"multifd channel {VICTIM}: send worker process killed by signal 9" in desc, \
            desc
        dest.assert_failed()
        assert_gone(workers + dest.worker_pids, baseline)
    finally:
        dest.close()
    source.assert_intact()
    migrate_again(tmp_path, source)


def test_destination_worker_killed(tmp_path, source):
    opts = options({"return-path": True}, **NON_CONVERGING)
    dest = Destination(tmp_path, source, opts)
    try:
        first = FirstAck()
        mig = source.migration(opts, on_multifd_ack=first)
        workers = [p.pid for p in mig.pool.procs]
        baseline = live_children() - set(workers) - set(dest.worker_pids)
        first.arm(mig, lambda: kill(dest.mig.pool.procs[VICTIM]))
        info = run_bounded(mig, dest.uri)
        # The source learns it from its own channel (the socket closed under
        # it) or from the destination's SHUT, whichever comes first.
        desc = assert_failed(info, mig)
        assert re.search(r"multifd channel \d|SHUT 1", desc), desc
        ddesc = dest.assert_failed()
        assert f"multifd channel {VICTIM}: receive worker process killed by signal 9" \
            in ddesc, ddesc
        assert_gone(workers + dest.worker_pids, baseline)
    finally:
        dest.close()
    source.assert_intact()
    migrate_again(tmp_path, source)


# ---------------------------------------------------------------------------
# A channel drops


def struct_magic(head: bytes) -> int:
    return int.from_bytes(head[:4], "big")


def unread(ch) -> int:
    """Bytes waiting in ``ch``'s receive queue."""
    return int.from_bytes(fcntl.ioctl(ch.fileno(), termios.FIONREAD, bytes(4)), "little")


class DroppingDestination:
    """Accepts the main and the multifd channels itself and reads them all, except
    that channel ``VICTIM`` is closed after ``after`` bytes of packets."""

    def __init__(self, tmp_path: Path, after: int):
        self.listener = listen(f"unix:{tmp_path / 'drop.sock'}")
        self.uri = self.listener.uri
        self.after = after
        self.dropped = threading.Event()
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self):
        try:
            for _ in range(CHANNELS + 1):
                ch = self.listener.accept(timeout=TIMEOUT)
                t = threading.Thread(target=self._serve, args=(ch,), daemon=True)
                t.start()
                self._threads.append(t)
        except BaseException as exc:   # noqa: BLE001 - reported by close()
            self.errors.append(exc)

    def _serve(self, ch):
        try:
            with ch:
                ch.settimeout(TIMEOUT)
                victim = False
                if struct_magic(ch.peek(4)) == MULTIFD_MAGIC:
                    init = MultiFDInit.unpack(ch.read_exactly(MULTIFD_INIT_SIZE))
                    victim = init.channel_id == VICTIM
                got = 0
                while not victim or got < self.after:
                    n = len(ch.recv(1 << 16))
                    if n == 0:
                        return
                    got += n
                ch.shutdown()
                self.dropped.set()
        except BaseException as exc:   # noqa: BLE001 - reported by close()
            self.errors.append(exc)

    def close(self):
        self.listener.close()
        self._acceptor.join(TIMEOUT)
        for t in self._threads:
            t.join(TIMEOUT)
            assert not t.is_alive(), "fake destination hung"


def test_multifd_channel_drops(tmp_path, source):
    fake = DroppingDestination(tmp_path, after=256 << 10)
    try:
        mig = source.migration(options(**NON_CONVERGING))
        workers = [p.pid for p in mig.pool.procs]
        baseline = live_children() - set(workers)
        info = run_bounded(mig, fake.uri)
        desc = assert_failed(info, mig)
        assert fake.dropped.is_set()
        assert f"multifd channel {VICTIM}" in desc, desc
        # The worker's failure keeps its kind across the process line.
        assert isinstance(mig.error, ChannelBrokenError), repr(mig.error)
        assert "peer closed the connection" in desc, desc
        assert_gone(workers, baseline)
    finally:
        fake.close()
    assert not fake.errors, fake.errors
    source.assert_intact()
    migrate_again(tmp_path, source)


# ---------------------------------------------------------------------------
# migrate_cancel


def test_cancel_during_multifd_migration(tmp_path, source):
    opts = options({"return-path": True}, **NON_CONVERGING)
    dest = Destination(tmp_path, source, opts)
    try:
        first = FirstAck()
        mig = source.migration(opts, on_multifd_ack=first)
        workers = [p.pid for p in mig.pool.procs]
        baseline = live_children() - set(workers) - set(dest.worker_pids)
        first.arm(mig, mig.cancel)
        info = run_bounded(mig, dest.uri)
        assert info.to_qmp() == {"status": "cancelled"}, info.to_qmp()
        assert statuses(mig)[-3:] == ["active", "cancelling", "cancelled"]
        dest.assert_failed()
        assert_gone(workers + dest.worker_pids, baseline)
    finally:
        dest.close()
    source.assert_intact()
    migrate_again(tmp_path, source)


class StalledDestination:
    """Accepts every channel and reads the main one, never the multifd ones:
    the send workers block in sendmsg with full socket buffers."""

    def __init__(self, tmp_path: Path):
        self.listener = listen(f"unix:{tmp_path / 'stall.sock'}")
        self.uri = self.listener.uri
        self.channels: list = []
        self.multifd: list = []
        self.accepted = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        with contextlib.suppress(Exception):
            main = None
            for _ in range(CHANNELS + 1):
                ch = self.listener.accept(timeout=TIMEOUT)
                self.channels.append(ch)
                if struct_magic(ch.peek(4)) != MULTIFD_MAGIC:
                    main = ch
                else:
                    self.multifd.append(ch)
            self.accepted.set()
            main.settimeout(TIMEOUT)
            while main.recv(1 << 16):
                pass

    def stalled(self) -> bool:
        """Pages are waiting on every multifd channel: the workers have batches
        (4 MiB each, far more than a socket buffer) they cannot finish."""
        return self.accepted.is_set() and all(unread(ch) > MULTIFD_INIT_SIZE
                                              for ch in self.multifd)

    def close(self):
        self.listener.close()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "fake destination hung"
        for ch in self.channels:
            ch.close()


def test_cancel_while_multifd_channels_are_stalled(tmp_path, source):
    """migrate_cancel must not wait for workers stuck on a destination that does
    not read: QEMU shuts the channels down; here the workers are killed."""
    fake = StalledDestination(tmp_path)
    try:
        mig = source.migration(options())
        workers = [p.pid for p in mig.pool.procs]
        baseline = live_children() - set(workers)

        stuck = []

        def cancel_when_stuck():
            deadline = time.monotonic() + TIMEOUT
            while not fake.stalled() and time.monotonic() < deadline:
                time.sleep(0.01)
            stuck.append(fake.stalled())
            mig.cancel()
        canceller = threading.Thread(target=cancel_when_stuck, daemon=True)
        canceller.start()
        info = run_bounded(mig, fake.uri)     # without the fix: hangs, then fails
        canceller.join(TIMEOUT)
        assert stuck == [True]
        assert info.to_qmp() == {"status": "cancelled"}, info.to_qmp()
        assert_gone(workers, baseline)
    finally:
        fake.close()
    source.assert_intact()
    migrate_again(tmp_path, source)


# ---------------------------------------------------------------------------
# Bad bytes from a fake source, to `engine incoming --cap multifd=on`

IN_CHANNELS = 2
IN_VICTIM = 1
IN_RAM = 16 << 20


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no output within {timeout} s")
    return proc.stdout.readline()


def main_stream_start() -> bytes:
    """What a real source sends first on the main channel: header, configuration
    and the RAM setup section's block list; the section stays open, as if its
    pages were on their way over the multifd channels."""
    return (enc.file_header() + enc.configuration("none")
            + enc.section_start(RAM_SECTION_ID, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION)
            + enc.ram_block_list([("m0", IN_RAM)]))


def packet(normal=(), zero=(), ramblock="m0", packet_num=1, page_count=128,
           **fields) -> bytes:
    """A packet header (and the payload it announces) with ``fields`` overridden."""
    h = MultiFDPacketHeader.ram(flags=0, packet_num=packet_num, ramblock=ramblock,
                                normal=normal, zero=zero,
                                next_packet_size=len(normal) * PAGE)
    raw = bytearray(h.pack(page_count))
    layout = {"magic": (0, 4), "version": (4, 4), "flags": (8, 4), "pages_alloc": (12, 4),
              "normal_pages": (16, 4), "next_packet_size": (20, 4)}
    for name, value in fields.items():
        at, size = layout[name]
        raw[at:at + size] = value.to_bytes(size, "big")
    return bytes(raw) + bytes(range(256)) * (16 * len(normal))


def _truncated_header():
    return MultiFDInit(bytes(16), IN_VICTIM).pack() + packet(normal=[0])[:700]


def _truncated_payload():
    return MultiFDInit(bytes(16), IN_VICTIM).pack() + packet(normal=[0, PAGE])[:-PAGE // 2]


def _with_packet(**kw):
    return lambda: MultiFDInit(bytes(16), IN_VICTIM).pack() + packet(**kw)


def _init_field(at: int, value: int):
    def make():
        raw = bytearray(MultiFDInit(bytes(16), IN_VICTIM).pack())
        raw[at:at + 4] = value.to_bytes(4, "big")
        return bytes(raw)
    return make


#: where a packet starts on the channel: after the 64-byte MultiFDInit
P0 = MULTIFD_INIT_SIZE

#: name -> (bytes of channel IN_VICTIM, whether it is then closed, the error,
#: the offset in the channel the error must name)
BAD_CHANNELS = {
    "normal-pages-over-pages-alloc": (
        _with_packet(normal=[0], normal_pages=200), False,
        r"packet with 200 normal pages, expected at most 128", P0 + 16),
    "pages-alloc-over-page-count": (
        _with_packet(normal=[0], pages_alloc=4096), False,
        r"packet with 4096 pages, expected at most 128", P0 + 12),
    "unknown-block": (
        _with_packet(normal=[0], ramblock="pc.ram"), False, r"unknown RAM block 'pc.ram'",
        P0 + 64),
    "offset-past-block": (
        _with_packet(normal=[IN_RAM]), False,
        rf"normal page offset {IN_RAM:#x} \(entry 0\) invalid for block 'm0'", P0 + 320),
    "unaligned-offset": (
        _with_packet(zero=[0, PAGE + 8]), False,
        rf"zero page offset {PAGE + 8:#x} \(entry 1\) invalid for block 'm0'", P0 + 328),
    "payload-size-mismatch": (
        _with_packet(normal=[0], next_packet_size=100), False,
        r"payload of 100 bytes for 1 pages", P0 + 20),
    "packet-wrong-magic": (
        _with_packet(normal=[0], magic=0x11223345), False,
        r"received magic 0x11223345, expected 0x11223344", P0),
    "packet-wrong-version": (
        _with_packet(normal=[0], version=2), False, r"received version 2, expected 1",
        P0 + 4),
    "truncated-header": (
        _truncated_header, True,
        r"stream truncated at offset \d+: expected a multifd packet header", P0 + 700),
    "truncated-payload": (
        _truncated_payload, True, r"stream truncated at offset \d+: expected page data",
        P0 + 1344 + 2 * PAGE - PAGE // 2),
    "init-wrong-version": (
        _init_field(4, 7), False, r"multifd: received version 7, expected 1", 4),
    "init-wrong-magic": (
        _init_field(0, 0x11223345), False, r"unknown channel magic 0x11223345", 0),
}


class FakeSource:
    """Connects the channels of a multifd migration and sends what it is given."""

    def __init__(self, path: str):
        self.path = path
        self.socks: list[socket.socket] = []

    def open(self, data: bytes) -> socket.socket | None:
        """A new connection that sends ``data``; None if the destination is gone."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socks.append(s)
        s.settimeout(TIMEOUT)
        try:
            s.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None     # it failed on an earlier channel and stopped listening
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        return s

    def wait_closed(self, s: socket.socket | None) -> None:
        """Until the destination closes ``s`` (bounded by the socket timeout)."""
        if s is None:
            return
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while s.recv(1 << 16):
                pass

    def close(self):
        for s in self.socks:
            s.close()


def incoming(tmp_path: Path, victim: bytes, close_victim: bool,
             main_data: bytes | None = None, channel0: bytes = b""):
    """``engine incoming`` fed a good main channel (:func:`main_stream_start`
    unless ``main_data``), a good channel 0 (its MultiFDInit, then ``channel0``)
    and a bad channel ``IN_VICTIM``; returns (exit code, stderr, report,
    worker pids)."""
    sock, report = tmp_path / "in.sock", tmp_path / "in.json"
    proc = subprocess.Popen(
        ENGINE + ["incoming", f"unix:{sock}", "--machine", "none", "--ram", "16M",
                  "--vcpus", "0", "--cap", "multifd=on",
                  "--param", f"multifd-channels={IN_CHANNELS}",
                  "--json", str(report), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    fake = FakeSource(str(sock))
    try:
        line = _read_line(proc, TIMEOUT)
        assert line.startswith("listening on "), line
        workers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)
                   if not leaks.is_helper(p)]
        assert len(workers) == IN_CHANNELS      # started before anyone connected
        # QEMU's order: the multifd channels, then the main channel.
        fake.open(MultiFDInit(bytes(16), 0).pack() + channel0)
        bad = fake.open(victim)
        if close_victim and bad is not None:
            bad.shutdown(socket.SHUT_WR)
        main = fake.open(main_stream_start() if main_data is None else main_data)
        fake.wait_closed(main)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        fake.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    rep = json.loads(report.read_text()) if report.exists() else None
    return proc.returncode, err, rep, workers


@pytest.mark.parametrize("case", list(BAD_CHANNELS))
def test_incoming_refuses_bad_multifd_channel(tmp_path, case):
    shm_before = _shm_names()
    make, close_victim, pattern, offset = BAD_CHANNELS[case]
    rc, err, rep, workers = incoming(tmp_path, make(), close_victim)
    assert rc == 1, err
    assert "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert re.findall(r"offset (\d+)", err)[-1] == str(offset), err
    if case == "init-wrong-magic":
        # Not a multifd channel at all: its id is unknown, the connection is named.
        assert "in.sock" in err, err
    else:
        assert re.search(rf"multifd (channel )?{IN_VICTIM}\b", err), err
    if rep is not None:
        assert rep["migration"]["status"] == "failed", rep
        assert re.search(pattern, rep["migration"]["error-desc"])
    assert_gone(workers, set())
    assert not _leaked_shm(shm_before), "the destination left segments behind"
    assert not (tmp_path / "in.sock").exists()


def test_incoming_refuses_multifd_channel_closed_before_its_sync(tmp_path):
    """A channel that ends cleanly after a packet (a source worker gone at a packet
    boundary) while the main channel asks for a sync: that channel's SYNC
    will never come, and the destination says so at once."""
    shm_before = _shm_names()
    main = (enc.file_header() + enc.configuration("none")
            + enc.ram_setup_section(RAM_SECTION_ID, [("m0", IN_RAM)]))       # its EOS: sync now
    sync0 = MultiFDPacketHeader.sync(2).pack()
    victim = MultiFDInit(bytes(16), IN_VICTIM).pack() + packet(normal=[0, PAGE])
    rc, err, rep, workers = incoming(tmp_path, victim, True, main_data=main, channel0=sync0)
    assert rc == 1, err
    assert "Traceback" not in err, err
    assert (f"multifd channel {IN_VICTIM}: the channel ended while waiting for "
            "multifd channels to sync") in err, err
    assert rep["migration"]["status"] == "failed", rep
    assert_gone(workers, set())
    assert not _leaked_shm(shm_before), "the destination left segments behind"
