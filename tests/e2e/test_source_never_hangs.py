"""The source never hangs on a destination that stopped reading, or died.

Each test puts the source in front of a peer that does not move - a
listener that accepts and never reads, a SIGSTOPped destination process, a
destination that closed its main channel while multifd channels stay full -
and then asks the source to stop: migrate_cancel (QMP or the library),
quit or SIGTERM of ``engine vm``, Ctrl-C or SIGTERM of ``engine migrate``.
Every one must end within a few seconds (QEMU shuts the migration's
channels down on cancel), with the source guest running and its memory
untouched, and nothing left behind: no process, no segment (the suite's
leak checks), no temp directory (a private TMPDIR here).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from engine.migration.source import SourceMigration
from engine.options import MigrationOptions
from engine.ram.guest import Guest
from engine.ram.image import write_mixed_image
from engine.ram.workloads import WorkloadSpec
from engine.state import MigrationStatus as S
from engine.transport import connect
from tests.conftest import ENGINE_CMD
from tests.e2e.sources import PROFILE
from tests.qemu import ManagedProcess

#: guest RAM: much more than the socket buffers of a peer that does not read
RAM = 64 << 20
#: bound on the waits that are not the point of the test
WAIT = 60.0
#: how long a stop may take (the issue: "within a second" for a cancel)
CANCEL_SECONDS = 1.0
#: and an exit of a whole command (its processes reaped, segments unlinked)
EXIT_SECONDS = 8.0


def _options(caps=None, **params) -> MigrationOptions:
    return MigrationOptions.default().replace(caps or {}, params)


class SilentPeer:
    """A unix listener that accepts every connection and never reads.

    ``close_main()`` hangs up the first connection (the main channel: the
    source connects it before any multifd channel); ``close_all()`` hangs up
    every one, as a destination process that died."""

    def __init__(self, tmp_path: Path):
        self.path = str(tmp_path / "silent.sock")
        self.uri = f"unix:{self.path}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(64)
        self.conns: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        self._sock.settimeout(0.05)
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.conns.append(conn)

    def close_main(self):
        self.conns[0].close()

    def close_all(self):
        for c in self.conns:
            c.close()

    def close(self):
        self._stop = True
        self._thread.join(5)
        self.close_all()
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@pytest.fixture
def guest(tmp_shm_path):
    write_mixed_image(tmp_shm_path, RAM, seed=7)
    g = Guest.create([("ram0", RAM, str(tmp_shm_path))], vcpus=1,
                     workload=WorkloadSpec("none"), start=True)
    try:
        yield g
    finally:
        g.close()


def _digest(guest) -> str:
    return hashlib.sha256(guest.blocks[0].buf).hexdigest()


def _wait_stalled(sent, alive, what: str) -> None:
    """Until ``sent()`` stops growing for 0.3 s (the peer's buffers are full)."""
    deadline = time.monotonic() + WAIT
    last, since = -1, time.monotonic()
    while True:
        assert alive(), f"{what} ended before it stalled"
        now, value = time.monotonic(), sent()
        if value != last:
            last, since = value, now
        elif value > 0 and now - since > 0.3:
            return
        assert now < deadline, f"{what} never stalled"
        time.sleep(0.02)


def _run_in_thread(mig: SourceMigration, uri: str):
    out: dict = {}
    channel = connect(uri)

    def body():
        try:
            out["info"] = mig.run(channel, uri)
        except BaseException as exc:    # noqa: BLE001 - the test reports it
            out["exc"] = exc
        finally:
            channel.close()
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, channel, out


# ---------------------------------------------------------------------------
# migrate_cancel with a send blocked (library)


@pytest.mark.parametrize("multifd", [False, True], ids=["single", "multifd"])
def test_cancel_while_a_send_blocks_on_a_peer_that_never_reads(tmp_path, guest, multifd):
    """QEMU's migrate_cancel shuts the channel down; so does ours: the blocked
    sendmsg fails at once and the migration is ``cancelled`` within a second."""
    before = _digest(guest)
    peer = SilentPeer(tmp_path)
    caps = {"multifd": True} if multifd else {}
    mig = SourceMigration(guest, PROFILE, _options(caps), vcpus=guest.nvcpus)
    mig.prepare()
    try:
        t, channel, out = _run_in_thread(mig, peer.uri)
        sent = (lambda: mig.info().to_qmp().get("ram", {}).get("transferred", 0)) \
            if multifd else (lambda: channel.bytes_sent)
        _wait_stalled(sent, t.is_alive, "the migration")
        assert mig.state.status is S.ACTIVE
        start = time.monotonic()
        mig.cancel()
        t.join(WAIT)
        took = time.monotonic() - start
        assert not t.is_alive()
        assert "exc" not in out, out
        assert out["info"].to_qmp() == {"status": "cancelled"}
        assert took < CANCEL_SECONDS, f"cancel took {took:.2f} s"
        assert guest.running
        assert _digest(guest) == before, "the source wrote guest memory"
    finally:
        peer.close()


# ---------------------------------------------------------------------------
# A destination that gives up while multifd channels are full


@pytest.mark.parametrize("how", ["closes-main-channel", "dies"])
def test_multifd_notices_a_destination_that_gave_up(tmp_path, guest, how):
    """The workers are blocked on channels nobody reads; the destination then
    closes its main channel (a QEMU that rejected the stream) or all of them
    (it died).  The source fails within seconds, not after the pool's
    acknowledgement timeout (120 s), and the guest runs on."""
    before = _digest(guest)
    peer = SilentPeer(tmp_path)
    mig = SourceMigration(guest, PROFILE, _options({"multifd": True}), vcpus=guest.nvcpus)
    mig.prepare()
    try:
        t, channel, out = _run_in_thread(mig, peer.uri)
        _wait_stalled(lambda: mig.info().to_qmp().get("ram", {}).get("transferred", 0),
                      t.is_alive, "the migration")
        start = time.monotonic()
        if how == "dies":
            peer.close_all()
        else:
            peer.close_main()
        t.join(WAIT)
        took = time.monotonic() - start
        assert not t.is_alive()
        assert "exc" not in out, out
        q = out["info"].to_qmp()
        assert q["status"] == "failed", q
        assert "destination" in q["error-desc"], q
        assert took < 5.0, f"the source took {took:.1f} s to notice"
        assert guest.running
        assert _digest(guest) == before
    finally:
        peer.close()


# ---------------------------------------------------------------------------
# engine vm: migrate_cancel, quit and SIGTERM


def _engine_vm(tmp_path, name, *args, events: bool = True):
    pytest.importorskip("qemu.qmp")
    from tests.e2e.test_qmp_harness import EngineVM
    vm = EngineVM(tmp_path, name, "--ram", "64M", "--vcpus", "1", "--workload", "none",
                  *args)
    if events:
        try:
            vm.set_caps(events=True)
        except BaseException:
            vm.close(quit=False)
            raise
    return vm


def _quiet_digests(vm) -> dict:
    """The guest's memory digests, taken stopped (the monitor's rule); running after."""
    vm.cmd("stop")
    try:
        return vm.cmd("x-engine-memory-digests")
    finally:
        vm.cmd("cont")


@pytest.mark.parametrize("peer_kind", ["silent-listener", "stopped-destination"])
def test_qmp_migrate_cancel_with_a_stalled_destination(tmp_path, peer_kind):
    """query-migrate reaches ``cancelled`` within a second; the guest runs, its
    memory is what it was (the digests migrate_cancel returns, again)."""
    src = _engine_vm(tmp_path, "src", "--param", "zero-page-detection=none")
    peer = dst = None
    try:
        if peer_kind == "silent-listener":
            peer = SilentPeer(tmp_path)
            uri = peer.uri
        else:
            dst = _engine_vm(tmp_path, "dst", "--incoming", f"unix:{tmp_path}/dst.sock",
                             "--param", "zero-page-detection=none", events=False)
            uri = f"unix:{tmp_path}/dst.sock"
        before = _quiet_digests(src)
        src.cmd("migrate", {"uri": uri})
        src.wait_status("active")
        if dst is not None:
            os.kill(dst.proc.pid, signal.SIGSTOP)

        def sent():
            return src.cmd("query-migrate").get("ram", {}).get("transferred", 0)
        _wait_stalled(sent, lambda: src.cmd("query-migrate")["status"] == "active",
                      "the migration")
        start = time.monotonic()
        src.cmd("migrate_cancel")
        while src.cmd("query-migrate")["status"] != "cancelled":
            assert time.monotonic() - start < CANCEL_SECONDS, src.cmd("query-migrate")
            time.sleep(0.01)
        assert src.cmd("query-status")["status"] == "running"
        assert _quiet_digests(src) == before
    finally:
        if dst is not None:
            os.kill(dst.proc.pid, signal.SIGCONT)
            dst.close()
        src.close()
        if peer is not None:
            peer.close()


@pytest.mark.parametrize("how,multifd", [("quit", False), ("sigterm", False),
                                         ("quit", True)])
def test_engine_vm_exits_promptly_during_a_stalled_migration(tmp_path, how, multifd):
    """quit over QMP, or SIGTERM: the VM cancels its migration (the blocked
    send fails at once; multifd workers blocked on their channels are given
    up) and exits 0 within seconds, not after its close timeouts (70 s before)."""
    peer = SilentPeer(tmp_path)
    src = _engine_vm(tmp_path, "src", "--param", "zero-page-detection=none",
                     *(["--cap", "multifd=on"] if multifd else []))
    try:
        src.cmd("migrate", {"uri": peer.uri})
        src.wait_status("active")

        def sent():
            return src.cmd("query-migrate").get("ram", {}).get("transferred", 0)
        _wait_stalled(sent, lambda: src.cmd("query-migrate")["status"] == "active",
                      "the migration")
        start = time.monotonic()
        if how == "quit":
            with contextlib.suppress(Exception):
                src.cmd("quit")
        else:
            os.kill(src.proc.pid, signal.SIGTERM)
        rc = src.proc.wait(WAIT)
        took = time.monotonic() - start
        assert rc == 0, src.proc.describe()
        assert took < EXIT_SECONDS, f"exit took {took:.1f} s\n{src.proc.describe()}"
    finally:
        src.close(quit=False)
        peer.close()


# ---------------------------------------------------------------------------
# engine migrate: Ctrl-C twice, Ctrl-C in postcopy, SIGTERM with a stopped destination


def _private_tmp(tmp_path) -> tuple[Path, dict]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return tmp, {**os.environ, "TMPDIR": str(tmp), "ENGINE_TRACE": "migrate_set_state"}


def _clean_exit(proc: ManagedProcess, tmp: Path, start: float) -> None:
    rc = proc.wait(WAIT)
    took = time.monotonic() - start
    err = Path(proc.stderr_path).read_text()
    assert took < EXIT_SECONDS, f"exit took {took:.1f} s\n{proc.describe()}"
    assert rc != 0, proc.describe()
    for bad in ("BufferError", "resource_tracker", "Traceback"):
        assert bad not in err, proc.describe()
    left = sorted(p.name for p in tmp.iterdir())
    assert not left, f"left behind in TMPDIR: {left}"


def _wait_trace(proc: ManagedProcess, needle: str) -> None:
    deadline = time.monotonic() + WAIT
    while needle not in Path(proc.stderr_path).read_text():
        assert proc.poll() is None, proc.describe()
        assert time.monotonic() < deadline, f"no {needle!r}\n{proc.describe()}"
        time.sleep(0.02)


def _interrupt(proc: ManagedProcess, signum: int) -> None:
    """As a terminal's Ctrl-C: the signal to the command's whole process group
    (its vCPUs and workers too; the local destination has a session of its own)."""
    os.killpg(proc.pid, signum)


def test_engine_migrate_ctrl_c_twice(tmp_path):
    tmp, env = _private_tmp(tmp_path)
    proc = ManagedProcess([*ENGINE_CMD, "migrate", "--ram", "256M", "--vcpus", "1",
                           "--workload", "ab", "--param", "max-bandwidth=32M",
                           "--param", "zero-page-detection=none",
                           "--cap", "multifd=on"],
                          tmp_path, "migrate", env=env)
    try:
        _wait_trace(proc, "new=active")
        time.sleep(0.3)
        start = time.monotonic()
        _interrupt(proc, signal.SIGINT)
        time.sleep(0.05)
        _interrupt(proc, signal.SIGINT)
        _clean_exit(proc, tmp, start)
    finally:
        proc.close()


@pytest.mark.parametrize("vcpus", [
    0,
    1,
])
def test_engine_migrate_ctrl_c_in_postcopy(tmp_path, vcpus):
    """Ctrl-C once the destination runs the guest: the source fails at once
    (nothing can restart the guest here), the destination loses its source
    and is told to end; both clean up."""
    tmp, env = _private_tmp(tmp_path)
    proc = ManagedProcess([*ENGINE_CMD, "migrate", "--ram", "256M", "--vcpus", str(vcpus),
                           "--workload", "ab" if vcpus else "none", "--cap", "postcopy-ram=on",
                           "--postcopy-after", "0", "--param", "max-postcopy-bandwidth=16M",
                           "--param", "zero-page-detection=none"],
                          tmp_path, "migrate", env=env)
    try:
        _wait_trace(proc, "source old=postcopy-device new=postcopy-active")
        time.sleep(0.2)
        start = time.monotonic()
        _interrupt(proc, signal.SIGINT)
        _clean_exit(proc, tmp, start)
        err = Path(proc.stderr_path).read_text()
        assert "source old=postcopy-active new=failed" in err, proc.describe()
    finally:
        proc.close()


def test_engine_migrate_sigterm_with_a_stopped_destination(tmp_path):
    tmp, env = _private_tmp(tmp_path)
    dest_uri = f"unix:{tmp_path}/dest.sock"
    dest = ManagedProcess([*ENGINE_CMD, "incoming", dest_uri, "--ram", "256M",
                           "--vcpus", "1", "--quiet"], tmp_path, "incoming", env=env)
    proc = None
    try:
        deadline = time.monotonic() + WAIT
        while not os.path.exists(f"{tmp_path}/dest.sock"):
            assert dest.poll() is None, dest.describe()
            assert time.monotonic() < deadline, dest.describe()
            time.sleep(0.02)
        proc = ManagedProcess([*ENGINE_CMD, "migrate", "--to", dest_uri, "--ram", "256M",
                               "--vcpus", "1", "--workload", "ab",
                               "--param", "max-bandwidth=64M",
                               "--param", "zero-page-detection=none"],
                              tmp_path, "migrate", env=env)
        _wait_trace(proc, "new=active")
        os.kill(dest.pid, signal.SIGSTOP)
        time.sleep(0.5)
        start = time.monotonic()
        _interrupt(proc, signal.SIGTERM)
        rc = proc.wait(WAIT)
        took = time.monotonic() - start
        assert took < EXIT_SECONDS, f"exit took {took:.1f} s\n{proc.describe()}"
        assert rc != 0, proc.describe()
        err = Path(proc.stderr_path).read_text()
        for bad in ("BufferError", "resource_tracker", "Traceback"):
            assert bad not in err, proc.describe()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(dest.pid, signal.SIGCONT)
        if proc is not None:
            proc.close()
        # The destination lost its source: it fails and cleans up by itself.
        with contextlib.suppress(subprocess.TimeoutExpired, TimeoutError):
            dest.wait(WAIT)
        dest.close()
    left = sorted(p.name for p in tmp.iterdir())
    assert not left, f"left behind in TMPDIR: {left}"
