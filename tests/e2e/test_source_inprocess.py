"""A failed or cancelled migration leaves the source guest as it was.

In-process: a real :class:`Guest` (vCPU processes, shared memory), a real
:class:`SourceMigration` over a real unix socket, and destinations that
misbehave on purpose (threads of this test).  After every failure the guest
must be running again - restarted if the switchover had stopped it - with
its vCPUs making progress, its memory untouched (the source only reads guest
memory), and a second migration to a good destination must complete, as in
QEMU's migration-test cancel tests.

Two guests, both on a pre-filled file-backed image: ``none`` has vCPUs that
execute nothing, so its memory must come out byte-identical; ``ab`` runs
QEMU's A-B loop, so its registers must keep advancing and the destination's
``ab`` check pass.
"""
from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from engine.migration.destination import DestinationMigration
from engine.migration.source import SourceMigration
from engine.options import MigrationOptions
from engine.ram.guest import Guest
from engine.state import MigrationStatus as S
from engine.stream import events as ev
from engine.stream import returnpath as rp
from engine.stream.decoder import StreamDecoder
from engine.transport import listen
from tests.e2e.sources import (PROFILE, TIMEOUT, SourceGuest, assert_failed,  # noqa: F401
                               run_bounded, source, statuses)

#: bound on every wait of these tests (seconds)

#: QEMU's migration-test settings for a migration that must not converge
NON_CONVERGING = {"max-bandwidth": 3_000_000, "downtime-limit": 1}


def options(caps=None, **params) -> MigrationOptions:
    return MigrationOptions.default().replace(caps or {}, {k.replace("_", "-"): v
                                                          for k, v in params.items()})


# ---------------------------------------------------------------------------
# The source guest


def assert_cancelled(info, mig: SourceMigration) -> None:
    q = info.to_qmp()
    assert q == {"status": "cancelled"}, q      # what QEMU's query-migrate shows
    assert statuses(mig)[-2:] == ["cancelling", "cancelled"]


# ---------------------------------------------------------------------------
# Destinations


class FakeDestination:
    """A unix-socket destination whose ``behave(sock)`` runs in a thread."""

    def __init__(self, tmp_path: Path, behave):
        self.path = str(tmp_path / "fake.sock")
        self.uri = f"unix:{self.path}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._listener.settimeout(TIMEOUT)
        self.error: BaseException | None = None
        self.seen: list[str] = []
        self._behave = behave
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            conn, _ = self._listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                self._behave(self, conn)
        except BaseException as exc:   # noqa: BLE001 - reported by close()
            self.error = exc

    def close(self):
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "fake destination hung"
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            Path(self.path).unlink()

    # behaviours -----------------------------------------------------------

    @staticmethod
    def drain(fake, conn):
        """Read everything until the source closes."""
        with contextlib.suppress(ConnectionResetError):
            while conn.recv(1 << 20):
                pass

    @staticmethod
    def vanish_after(nbytes: int):
        """Read ``nbytes`` and hang up: a destination host that went away."""
        def behave(fake, conn):
            got = 0
            while got < nbytes:
                chunk = conn.recv(min(1 << 16, nbytes - got))
                if not chunk:
                    raise AssertionError("source closed first")
                got += len(chunk)
        return behave

    @staticmethod
    def events(fake, conn, nvcpus: int):
        """Decode the stream; yield each event (a PING is answered with PONG first)."""
        dec = StreamDecoder(PROFILE.lookup(nvcpus), channel="fake")
        while True:
            data = conn.recv(1 << 20)
            if not data:
                dec.feed_eof()
            else:
                dec.feed(data)
            while True:
                e = dec.next_event()
                if e is ev.NEED_DATA:
                    break
                fake.seen.append(type(e).__name__)
                if isinstance(e, ev.Ping):
                    conn.sendall(rp.rp_pong(e.value))
                yield e
            if not data:
                return

    @staticmethod
    def shut_after_ping(nvcpus: int):
        """Answer the PING, then report a load error with SHUT(1) but stay
        connected, reading on: only the return path says something is wrong."""
        def behave(fake, conn):
            for e in FakeDestination.events(fake, conn, nvcpus):
                if isinstance(e, ev.Ping):
                    conn.sendall(rp.rp_shut(1))
                    break
            FakeDestination.drain(fake, conn)
        return behave

    @staticmethod
    def close_at_end_section(nvcpus: int):
        """Hang up the moment the RAM END section begins: after switchover."""
        def behave(fake, conn):
            for e in FakeDestination.events(fake, conn, nvcpus):
                if isinstance(e, ev.SectionEnd):
                    return
            raise AssertionError("no END section")
        return behave


class GoodDestination:
    """A DestinationMigration in a thread, into a paused guest of the same shape."""

    def __init__(self, tmp_path: Path, src: SourceGuest):
        g = src.guest
        # Made here, in the test's thread: vCPUs die with the thread that made them.
        self.guest = Guest.create([(b.idstr, b.used_length, None) for b in g.blocks],
                                  vcpus=g.nvcpus, workload=g.workload, start=False)
        self.listener = listen(f"unix:{tmp_path / 'good.sock'}")
        self.uri = self.listener.uri
        self.mig = DestinationMigration(PROFILE, MigrationOptions.default(), guest=self.guest,
                                        vcpus=g.nvcpus, verify=True,
                                        ab_check=src.kind == "ab")
        self.info = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            with self.listener:
                channel = self.listener.accept(timeout=TIMEOUT)
            with channel:
                self.info = self.mig.run(channel)
        except BaseException as exc:   # noqa: BLE001 - reported by join()
            self.error = exc

    def join(self):
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "destination hung"
        assert self.error is None, self.error
        return self.info

    def close(self):
        self.listener.close()
        self._thread.join(TIMEOUT)
        self.guest.close()


def migrate_again(tmp_path: Path, src: SourceGuest) -> None:
    """A second migration of the same guest to a good destination completes."""
    src.assert_intact()
    dest = GoodDestination(tmp_path, src)
    try:
        mig = src.migration(options())
        mig.compute_digests = True
        info = run_bounded(mig, dest.uri)
        assert info.status == "completed", info.to_qmp()
        dinfo = dest.join()
        assert dinfo.status == "completed", dinfo.to_qmp()
        assert mig.switchover_digests == dest.mig.digests
        if src.kind == "ab":
            assert dest.mig.ab_result.ok, dest.mig.ab_result
        else:
            assert mig.switchover_digests["ram0"] == src.digest
        # QEMU leaves a migrated-away source paused; ours keeps its guest
        # stopped after completion as well
        assert not src.guest.running
    finally:
        dest.close()


# ---------------------------------------------------------------------------
# Failures


def test_destination_vanishes_mid_stream(tmp_path, source):
    fake = FakeDestination(tmp_path, FakeDestination.vanish_after(1 << 20))
    mig = source.migration(options())
    info = run_bounded(mig, fake.uri)
    fake.close()
    assert fake.error is None, fake.error
    desc = assert_failed(info, mig)
    assert fake.uri in desc, desc           # the error names the channel
    source.assert_intact()
    migrate_again(tmp_path, source)


def test_destination_answers_shut_1(tmp_path, source):
    fake = FakeDestination(tmp_path, FakeDestination.shut_after_ping(source.guest.nvcpus))
    mig = source.migration(options({"return-path": True}, **NON_CONVERGING))
    info = run_bounded(mig, fake.uri)
    fake.close()
    assert fake.error is None, fake.error
    assert fake.seen[:4] == ["FileHeader", "Configuration", "OpenReturnPath", "Ping"]
    desc = assert_failed(info, mig)
    assert "SHUT 1" in desc, desc
    assert mig.pongs == [1]
    source.assert_intact()
    migrate_again(tmp_path, source)


def test_destination_hangs_up_after_switchover(tmp_path, source):
    """The guest was stopped for the switchover when it failed: restarted."""
    fake = FakeDestination(tmp_path, FakeDestination.close_at_end_section(source.guest.nvcpus))
    mig = source.migration(options({"return-path": True}))
    info = run_bounded(mig, fake.uri)
    fake.close()
    assert fake.error is None, fake.error
    assert_failed(info, mig)
    assert "device" in statuses(mig)
    source.assert_intact()
    migrate_again(tmp_path, source)


# ---------------------------------------------------------------------------
# migrate_cancel


def _cancel_on(status: S):
    holder: list[SourceMigration] = []

    def on_status(old, new):
        if new is status:
            holder[0].cancel()
    return holder, on_status


@pytest.mark.parametrize("state", [S.SETUP, S.PRE_SWITCHOVER, S.DEVICE])
def test_cancel_in_state(tmp_path, source, state):
    """migrate_cancel the moment the migration enters ``state``; the last two
    come after the switchover stopped the guest."""
    fake = FakeDestination(tmp_path, FakeDestination.drain)
    holder, on_status = _cancel_on(state)
    caps = {"pause-before-switchover": state is S.PRE_SWITCHOVER}
    mig = source.migration(options(caps), on_status=on_status)
    holder.append(mig)
    info = run_bounded(mig, fake.uri)
    fake.close()
    assert_cancelled(info, mig)
    # cancelled in that state, not later
    assert statuses(mig)[-3:] == [state.value, "cancelling", "cancelled"]
    source.assert_intact()
    migrate_again(tmp_path, source)


def _when_streaming(mig: SourceMigration, act) -> threading.Thread:
    """``act()`` once ``mig`` is active and has sent a MiB (from another thread)."""
    def watch():
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            q = mig.info().to_qmp()
            if q.get("status") == "active" and q["ram"]["transferred"] > 1 << 20:
                act()
                return
            if mig.state.is_terminal():
                return
            time.sleep(0.01)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_cancel_while_active_not_converging(tmp_path, source):
    fake = FakeDestination(tmp_path, FakeDestination.drain)
    mig = source.migration(options(**NON_CONVERGING))
    watcher = _when_streaming(mig, mig.cancel)
    info = run_bounded(mig, fake.uri)
    watcher.join(TIMEOUT)
    fake.close()
    assert_cancelled(info, mig)
    assert statuses(mig)[-3:] == ["active", "cancelling", "cancelled"]
    source.assert_intact()
    migrate_again(tmp_path, source)


def test_ctrl_c_while_active_not_converging(tmp_path, source):
    """KeyboardInterrupt in the migration thread: cancel, then re-raise."""
    fake = FakeDestination(tmp_path, FakeDestination.drain)
    mig = source.migration(options(**NON_CONVERGING))
    main = threading.main_thread().ident
    assert threading.get_ident() == main
    watcher = _when_streaming(mig, lambda: signal.pthread_kill(main, signal.SIGINT))
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_bounded(mig, fake.uri)
        watcher.join(TIMEOUT)
    finally:
        signal.signal(signal.SIGINT, old)
    fake.close()
    assert_cancelled(mig.info(), mig)
    source.assert_intact()
    migrate_again(tmp_path, source)


def test_ctrl_c_while_switchover_stops_the_vcpus(tmp_path, source, monkeypatch):
    """A Ctrl-C that lands in the switchover's vm_stop, after the vCPUs were
    told to pause: the guest is restarted all the same."""
    fake = FakeDestination(tmp_path, FakeDestination.drain)
    real_stop = source.guest.stop
    stopped = []

    def stop_then_interrupt(*args, **kw):
        real_stop(*args, **kw)
        stopped.append(source.guest.running)
        raise KeyboardInterrupt
    monkeypatch.setattr(source.guest, "stop", stop_then_interrupt)
    mig = source.migration(options())
    with pytest.raises(KeyboardInterrupt):
        run_bounded(mig, fake.uri)
    monkeypatch.undo()
    fake.close()
    assert stopped == [False]
    assert_cancelled(mig.info(), mig)
    source.assert_intact()
    migrate_again(tmp_path, source)
