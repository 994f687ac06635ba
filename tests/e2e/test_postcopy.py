"""Postcopy end to end: real vCPU processes faulting on missing pages.

The guest runs QEMU's `ab` loop at full speed with a 1 ms downtime limit, so
precopy can never converge; postcopy starts after one pass and the
destination's vCPUs carry on from the migrated registers, faulting in what
they touch.  The `ab` check on the destination is the proof that no page was
lost or applied out of order.
"""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from engine.library import make_options
from engine.machine import get_profile
from engine.migration.destination import DestinationMigration
from engine.migration.source import SourceMigration
from engine import uffd
from engine.ram.guest import Guest
from engine.ram.workloads import REG_CHUNKS, WorkloadSpec
from engine.state import MigrationStatus as S
from engine.transport import connect, listen

HAVE_UFFD, UFFD_REASON = uffd.probe()
FAULT_MODES = [pytest.param("userfaultfd", marks=pytest.mark.skipif(
    not HAVE_UFFD, reason=f"userfaultfd: {UFFD_REASON}")), "software"]

RAM = 64 << 20
TIMEOUT = 120
PROFILE = get_profile("engine")
WORKLOAD = WorkloadSpec("ab", dirty_rate_mbps=0)


def run_cli(*args, timeout=TIMEOUT):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True,
                          text=True, timeout=timeout)


# -- the command line ---------------------------------------------------------------


@pytest.mark.parametrize("faults", FAULT_MODES)
@pytest.mark.parametrize("extra", [
    pytest.param([], id="plain"),
    pytest.param(["--cap", "postcopy-preempt=on"], id="preempt"),
    pytest.param(["--cap", "multifd=on", "--param", "multifd-channels=2"], id="multifd"),
    pytest.param(["--cap", "multifd=on", "--cap", "postcopy-preempt=on"], id="multifd+preempt"),
])
def test_cli_postcopy_ab_guest_that_precopy_cannot_converge(tmp_path, faults, extra):
    report = tmp_path / "report.json"
    r = run_cli("migrate", "--ram", "64M", "--vcpus", "2", "--workload", "ab",
                "--dirty-rate", "0", "--cap", "postcopy-ram=on",
                "--cap", "postcopy-blocktime=on",       # QEMU's fault figures
                "--param", "downtime-limit=1", "--param", "max-bandwidth=256M",
                "--postcopy-after", "1", "--postcopy-faults", faults,
                "--json", str(report), *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(report.read_text())
    assert rep["migration"]["status"] == "completed"
    assert rep["verification"]["ab"]["ok"] is True
    assert rep["verification"]["memory_equal"] is None     # the destination ran meanwhile
    dest = rep["destination"]["migration"]
    assert dest["status"] == "completed"
    assert dest["x-postcopy-faults"] == faults
    # The destination's vCPUs did fault on pages that were still missing.
    assert dest["ram"]["postcopy-requests"] > 0
    assert dest["postcopy-latency"] > 0                     # ns
    assert 0 < dest["x-postcopy-latency-p50"] <= dest["x-postcopy-latency-p99"]
    assert len(dest["postcopy-vcpu-blocktime"]) == 2        # ms
    assert dest["postcopy-non-vcpu-latency"] == 0
    assert rep["migration"]["ram"]["postcopy-requests"] > 0


def test_cli_refuses_postcopy_after_without_the_capability():
    r = run_cli("migrate", "--ram", "16M", "--postcopy-after", "1")
    assert r.returncode != 0
    assert "postcopy-ram" in r.stderr


def test_cli_refuses_userfaultfd_mode_name_typo():
    r = run_cli("migrate", "--ram", "16M", "--postcopy-faults", "hardware")
    assert r.returncode != 0
    assert "invalid choice" in r.stderr


# -- library: POSTCOPY_DEVICE and recovery ----------------------------------------------


class Proxy:
    """A TCP relay for the main channel that a test can cut (a network failure)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                a, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            host, port = self.upstream.split(":")[1:]
            b = socket.create_connection((host, int(port)))
            self._socks += [a, b]
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b):
        try:
            while True:
                r, _, _ = select.select([a, b], [], [], 0.1)
                if self._stop.is_set() or a.fileno() < 0 or b.fileno() < 0:
                    return
                for s in r:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):   # cut() closed the sockets under us
            return

    def cut(self):
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._socks = []

    def close(self):
        self._stop.set()
        self.cut()
        self.listener.close()
        self.thread.join(5)


def _wait_status(mig, statuses, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while mig.state.status not in statuses:
        assert time.monotonic() < deadline, f"stuck in {mig.state.status}"
        time.sleep(0.01)


def _vcpus_progress(guest):
    regs = guest.registers
    before = regs[:, REG_CHUNKS].copy()
    deadline = time.monotonic() + 30
    while not (regs[:, REG_CHUNKS] > before).all():
        assert time.monotonic() < deadline, "vCPUs do not run"
        time.sleep(0.01)


@pytest.fixture
def pair():
    made = []

    def make(src_vcpus=2, dst_vcpus=2):
        sg = Guest.create([("ram0", RAM)], vcpus=src_vcpus, workload=WORKLOAD, start=True)
        made.append(sg)
        dg = Guest.create([("ram0", RAM)], vcpus=dst_vcpus, workload=WORKLOAD, start=False)
        made.append(dg)
        return sg, dg

    yield make
    for g in made:
        g.close()


def _start_destination(dg, opts, faults, listener):
    dst = DestinationMigration(PROFILE, opts, guest=dg, vcpus=dg.nvcpus, verify=True,
                               ab_check=True, postcopy_faults=faults)
    dst.prepare()
    result = {}

    def serve():
        try:
            ch = listener.accept(timeout=30)
            with ch:
                result["info"] = dst.run(ch, listener=listener)
        finally:
            dst.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return dst, t, result


def _postcopy_into(dg, sg, opts, faults):
    """Migrate ``sg`` into ``dg``, postcopy after the first pass; returns the
    source migration, the destination, the source's info and the destination's
    result."""
    listener = listen("tcp:127.0.0.1:0")
    dst, t, result = _start_destination(dg, opts, faults, listener)
    src = SourceMigration(sg, PROFILE, opts, vcpus=sg.nvcpus, postcopy_after=1)
    with connect(listener.uri) as ch:
        info = src.run(ch, listener.uri)
    t.join(TIMEOUT)
    listener.close()
    return src, dst, info, result


@pytest.mark.parametrize("faults", FAULT_MODES)
def test_postcopy_device_failure_resumes_the_source_which_migrates_again(pair, faults):
    """The destination cannot load the device state inside the package (it has
    one vCPU, the source two): the source is still in postcopy-device, so it
    takes the precopy error path: failed, guest running, memory its own."""
    sg, bad = pair(src_vcpus=2, dst_vcpus=1)
    opts = make_options({"postcopy-ram": True}, {"downtime-limit": 1})
    src, dst, info, result = _postcopy_into(bad, sg, opts, faults)
    seen = [s for _, s in src.state.history]
    assert info.status == "failed", seen
    assert S.POSTCOPY_DEVICE in seen and S.POSTCOPY_ACTIVE not in seen
    assert result["info"].status == "failed"
    assert "cpu" in (result["info"].error_desc or "")
    assert sg.running
    _vcpus_progress(sg)

    # The same source guest migrates again, to a destination that fits.
    good = Guest.create([("ram0", RAM)], vcpus=2, workload=WORKLOAD, start=False)
    try:
        src, dst, info, result = _postcopy_into(good, sg, opts, faults)
        assert info.status == "completed", info.error_desc
        assert result["info"].status == "completed", result["info"].error_desc
        assert dst.ab_result is not None and dst.ab_result.ok
    finally:
        good.close()


@pytest.mark.parametrize("faults", FAULT_MODES)
@pytest.mark.parametrize("first_attempt", ["none", "refused", "cut-again"])
def test_postcopy_recovery_after_a_channel_cut(pair, faults, first_attempt):
    sg, dg = pair()
    # As QEMU's recovery test: postcopy so slow it cannot end on its own.
    opts = make_options({"postcopy-ram": True},
                        {"downtime-limit": 1, "max-postcopy-bandwidth": 256 << 10})
    listener = listen("tcp:127.0.0.1:0")
    dst, t, result = _start_destination(dg, opts, faults, listener)
    proxy = Proxy(listener.uri)
    src = SourceMigration(sg, PROFILE, opts, vcpus=2, postcopy_after=1)
    done = {}
    runner = threading.Thread(target=lambda: done.setdefault(
        "info", src.run(connect(proxy.uri), listener.uri)), daemon=True)
    runner.start()
    try:
        _wait_status(src, {S.POSTCOPY_ACTIVE})
        _wait_status(dst, {S.POSTCOPY_ACTIVE})
        time.sleep(0.3)
        proxy.cut()
        _wait_status(src, {S.POSTCOPY_PAUSED})
        _wait_status(dst, {S.POSTCOPY_PAUSED})
        # Paused, the destination keeps running what it has (vCPUs that touch
        # a missing page wait); nothing is thrown away on either side.
        assert dg.running

        if first_attempt == "refused":
            free = socket.create_server(("127.0.0.1", 0))
            port = free.getsockname()[1]
            free.close()
            src.resume(f"tcp:127.0.0.1:{port}")
            seen = lambda: [s for _, s in src.state.history]   # noqa: E731
            deadline = time.monotonic() + 30
            while S.POSTCOPY_RECOVER_SETUP not in seen() or \
                    src.state.status is not S.POSTCOPY_PAUSED:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        elif first_attempt == "cut-again":
            proxy2 = Proxy(dst.recover("tcp:127.0.0.1:0"))
            src.resume(proxy2.uri)
            _wait_status(dst, {S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE})
            proxy2.close()
            _wait_status(src, {S.POSTCOPY_PAUSED})
            _wait_status(dst, {S.POSTCOPY_PAUSED})

        src.set_parameters({"max-postcopy-bandwidth": 0})
        uri = dst.recover("tcp:127.0.0.1:0")
        src.resume(uri)
        runner.join(TIMEOUT)
        t.join(TIMEOUT)
        assert done["info"].status == "completed", done["info"].error_desc
        assert result["info"].status == "completed", result["info"].error_desc
        seen = [s for _, s in src.state.history]
        assert S.POSTCOPY_RECOVER_SETUP in seen and S.POSTCOPY_RECOVER in seen
        assert dst.ab_result is not None and dst.ab_result.ok, dst.ab_result
    finally:
        proxy.close()
        listener.close()
        if runner.is_alive():
            src.cancel()


def test_cli_destination_killed_in_postcopy_fails_instead_of_hanging(tmp_path, tmp_shm_path):
    """No monitor, so no migrate-recover: a paused postcopy whose destination
    is gone is given up, with the reason, instead of waiting forever."""
    import psutil
    from engine.ram.image import write_mixed_image
    report = tmp_path / "report.json"
    # Data outside the ab region too, so the background stream has megabytes
    # to send at 1 MB/s (zero pages cost nine bytes each).
    write_mixed_image(tmp_shm_path, 256 << 20, seed=5)
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "migrate", "--ram", "256M", "--vcpus", "2",
         "--mem-path", str(tmp_shm_path),
         "--workload", "ab", "--dirty-rate", "0", "--cap", "postcopy-ram=on",
         "--param", "downtime-limit=1", "--param", "max-postcopy-bandwidth=1M",
         "--postcopy-after", "0", "--json", str(report), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # the destination is SIGKILLed below: nothing of it can remove its
        # temporary directory, so that lands in the test's own tmp_path
        env=dict(os.environ, TMPDIR=str(tmp_path)))
    try:
        deadline = time.monotonic() + TIMEOUT
        victim = None
        while victim is None:
            assert time.monotonic() < deadline and proc.poll() is None
            for child in psutil.Process(proc.pid).children():
                if "incoming" in " ".join(child.cmdline()):
                    victim = child
            time.sleep(0.05)
        time.sleep(3)       # postcopy from the start: 130 MB of data at 1 MB/s
        victim.kill()
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, out + err
    rep = json.loads(report.read_text())
    assert rep["migration"]["status"] == "failed"
    desc = rep["migration"]["error-desc"]
    assert "destination exited" in desc and "stale" in desc, desc


def test_postcopy_capability_but_precopy_converges(pair):
    """postcopy-ram on both sides, nobody switches: an ordinary precopy end
    (ADVISE was sent, the destination must not expect postcopy's EOF)."""
    sg = Guest.create([("ram0", 16 << 20)], vcpus=1, workload=WorkloadSpec("ab", 8),
                      start=True)
    dg = Guest.create([("ram0", 16 << 20)], vcpus=1, workload=WorkloadSpec("ab", 8),
                      start=False)
    try:
        opts = make_options({"postcopy-ram": True}, {"downtime-limit": 1000})
        listener = listen("tcp:127.0.0.1:0")
        dst, t, result = _start_destination(dg, opts, "auto", listener)
        src = SourceMigration(sg, PROFILE, opts, vcpus=1)
        with connect(listener.uri) as ch:
            info = src.run(ch, listener.uri)
        t.join(TIMEOUT)
        listener.close()
        assert info.status == "completed", info.error_desc
        assert result["info"].status == "completed", result["info"].error_desc
        assert dst.ab_result.ok
        assert S.POSTCOPY_ACTIVE not in [s for _, s in src.state.history]
    finally:
        sg.close()
        dg.close()
