"""QEMU 10's QMP on real ``engine vm`` processes, with the qemu.qmp client.

* ``migrate`` / ``migrate-incoming`` with ``channels`` (tcp and unix), the
  refusals of ``uri`` with ``channels``, of neither, of a ``cpr`` channel;
* ``query-migrationthreads`` naming the migration thread and the multifd
  worker processes while a (rate-limited) migration runs, and nothing after;
* ``yank``: a running precopy fails at once and the source guest runs on
  with its memory intact; a postcopy pauses and recovers; ``query-yank``
  lists the migration while it runs and not after;
* QEMU 10.1's postcopy fault figures in ``query-migrate``, present with the
  ``postcopy-blocktime`` capability and absent without it;
* against QEMU 10: QEMU listens with ``migrate-incoming`` given ``channels``
  and the engine migrates to it with ``channels`` (the same JSON), and QEMU
  answers the same bad requests with the same texts as the engine.

Guests are 16 MiB.  Guest RAM is a file filled with guest-like pages
(:func:`tests.qemu.fill_image`) where the proof is equal RAM files.
"""
from __future__ import annotations

import time

import psutil
import pytest

from tests.e2e.test_qmp_harness import WAIT, EngineVM
from tests.qemu import QemuVM, QMPCommandError, fill_image, image_differences

qemu_qmp = pytest.importorskip("qemu.qmp")

SIZE = "16M"
FAST = 1_000_000_000
#: slow enough that a 16 MiB mixed image takes several seconds
SLOW = 1_000_000
#: a vCPU-less guest: nothing but the migration touches its RAM
QUIET = ("--ram", SIZE, "--vcpus", "0", "--workload", "none")
#: a guest precopy cannot converge with a 1 ms downtime limit
BUSY = ("--ram", SIZE, "--vcpus", "1", "--workload", "ab")


def main(addr: dict) -> dict:
    return {"channel-type": "main", "addr": addr}


def inet(port: int | str) -> dict:
    return {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": str(port)}


def unix(path) -> dict:
    return {"transport": "socket", "type": "unix", "path": str(path)}


def refused(vm, command: str, arguments: dict) -> str:
    from qemu.qmp import ExecuteError
    with pytest.raises(ExecuteError) as info:
        vm.cmd(command, arguments)
    return str(info.value)


def _port(info: dict) -> int:
    [addr] = info["socket-address"]
    assert addr["type"] == "inet"
    return int(addr["port"])


def _listen(dst, transport: str, tmp_path) -> dict:
    """migrate-incoming with channels; the address the source is to use."""
    addr = inet(0) if transport == "tcp" else unix(tmp_path / "mig.sock")
    dst.cmd("migrate-incoming", {"channels": [main(addr)]})
    return inet(_port(dst.cmd("query-migrate"))) if transport == "tcp" else addr


def _multifd(*vms) -> None:
    for vm in vms:
        vm.set_caps(events=True, multifd=True)
        vm.set_params(multifd_channels=2)


def _descendants(pid: int) -> set[int]:
    return {p.pid for p in psutil.Process(pid).children(recursive=True)}


def _gone(pids, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.05)
    return False


# -- channels -----------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_migrate_and_migrate_incoming_with_channels(transport, tmp_shm_path, tmp_path):
    src_ram = tmp_shm_path
    dst_ram = tmp_shm_path.with_name(tmp_shm_path.name + "-dst")
    fill_image(src_ram, SIZE, seed=11)
    try:
        with EngineVM(tmp_path, "src", *QUIET, "--mem-path", str(src_ram)) as src, \
                EngineVM(tmp_path, "dst", *QUIET, "--mem-path", str(dst_ram),
                         "--incoming", "defer") as dst:
            for vm in (src, dst):
                vm.set_caps(events=True)
            addr = _listen(dst, transport, tmp_path)
            src.set_params(max_bandwidth=FAST)
            src.cmd("migrate", {"channels": [main(addr)]})
            src.wait_status("completed")
            dst.wait_status("completed")
            assert src.timeline() == ["setup", "active", "STOP", "device", "completed"]
            assert image_differences(src_ram, dst_ram) is None
    finally:
        dst_ram.unlink(missing_ok=True)


def test_uri_and_channels_refusals(tmp_path):
    sock = unix(tmp_path / "x.sock")
    cpr = {"channel-type": "cpr", "addr": unix(tmp_path / "cpr.sock")}
    with EngineVM(tmp_path, "src", *QUIET) as src, \
            EngineVM(tmp_path, "dst", *QUIET, "--incoming", "defer") as dst:
        assert src.cmd("query-status") == {"status": "running", "running": True}
        assert src.cmd("query-version")["qemu"] == {"major": 10, "minor": 2, "micro": 0}
        for vm, command in ((src, "migrate"), (dst, "migrate-incoming")):
            need = "need either 'uri' or 'channels' argument"
            assert refused(vm, command, {}) == need
            assert refused(vm, command, {"uri": f"unix:{tmp_path}/x.sock",
                                         "channels": [main(sock)]}) == need
            why = refused(vm, command, {"channels": [cpr]})
            assert "'cpr' channel" in why and "cpr-transfer" in why, why
        assert refused(src, "migrate", {"channels": [main(sock), main(sock)]}) == \
            "Channel list has more than one main entry"
        assert refused(dst, "migrate-incoming", {"channels": [main(sock), main(sock)]}) == \
            "Channel list must have only one entry, for type 'main'"
        assert refused(src, "migrate", {"uri": f"unix:{tmp_path}/x.sock", "blk": False}) == \
            "Parameter 'blk' is unexpected"
        # Nothing was started by any of them.
        assert src.cmd("query-migrate") == {} and dst.cmd("query-migrate") == {}
        assert dst.cmd("query-status")["status"] == "inmigrate"


# -- threads ------------------------------------------------------------------------------

def test_query_migrationthreads_names_the_workers_while_it_runs(tmp_shm_path, tmp_path):
    fill_image(tmp_shm_path, SIZE, seed=12)
    with EngineVM(tmp_path, "src", *QUIET, "--mem-path", str(tmp_shm_path)) as src, \
            EngineVM(tmp_path, "dst", *QUIET, "--incoming", "defer") as dst:
        _multifd(src, dst)
        assert src.cmd("query-migrationthreads") == []
        addr = _listen(dst, "unix", tmp_path)
        src.set_params(max_bandwidth=SLOW)
        src.cmd("migrate", {"channels": [main(addr)]})
        src.wait_status("active")
        dst.wait_status("active")       # its workers are started and attached

        threads = src.cmd("query-migrationthreads")
        assert [t["name"] for t in threads] == ["mig/src/main", "mig/src/send_0",
                                                "mig/src/send_1"]
        vm_threads = {t.id for t in psutil.Process(src.proc.pid).threads()}
        assert threads[0]["thread-id"] in vm_threads
        workers = [t["thread-id"] for t in threads[1:]]
        assert set(workers) <= _descendants(src.proc.pid), threads
        received = dst.cmd("query-migrationthreads")
        assert [t["name"] for t in received] == ["mig/dst/recv_0", "mig/dst/recv_1"]
        receivers = [t["thread-id"] for t in received]
        assert set(receivers) <= _descendants(dst.proc.pid), received
        assert src.cmd("query-migrate")["status"] == "active"     # still running

        src.set_params(max_bandwidth=FAST)
        src.wait_status("completed")
        dst.wait_status("completed")
        assert src.cmd("query-migrationthreads") == []
        assert dst.cmd("query-migrationthreads") == []
        assert _gone(workers + receivers)


# -- yank ---------------------------------------------------------------------------------

def test_yank_fails_a_running_multifd_precopy_and_the_source_runs_on(tmp_path):
    with EngineVM(tmp_path, "src", *BUSY) as src, \
            EngineVM(tmp_path, "dst", *BUSY, "--incoming", "defer") as dst:
        _multifd(src, dst)
        assert src.cmd("query-yank", oob=True) == []
        dst.cmd("migrate-incoming", {"uri": f"unix:{tmp_path}/mig.sock",
                                     "exit-on-error": False})
        assert dst.cmd("query-yank", oob=True) == [{"type": "migration"}]
        src.set_params(max_bandwidth=2 * SLOW, downtime_limit=1)   # never converges
        src.cmd("migrate", {"uri": f"unix:{tmp_path}/mig.sock"})
        src.wait_event("MIGRATION_PASS")
        assert src.cmd("query-yank", oob=True) == [{"type": "migration"}]
        workers = [t["thread-id"] for t in src.cmd("query-migrationthreads")[1:]]
        assert len(workers) == 2

        started = time.monotonic()
        assert src.cmd("yank", {"instances": [{"type": "migration"}]}, oob=True) == {}
        failed = src.wait_event("MIGRATION", lambda e: e["data"]["status"] in
                                ("failed", "completed", "cancelled"), timeout=30)
        assert failed["data"]["status"] == "failed"
        # At once, not after some timeout of the channels.
        assert time.monotonic() - started < 15
        info = src.cmd("query-migrate")
        assert "yanked" in info["error-desc"], info
        dst.wait_event("MIGRATION", lambda e: e["data"]["status"] == "failed", timeout=30)
        for vm in (src, dst):
            assert vm.cmd("query-yank", oob=True) == []
        assert refused(src, "yank", {"instances": [{"type": "migration"}]}) == \
            "Instance not found"
        assert _gone(workers)
        # The source guest runs on, its memory as it was: QEMU's a-b check.
        assert src.cmd("query-status") == {"status": "running", "running": True}
        src.cmd("stop")
        result = src.cmd("x-engine-check-ab")
        assert result["ok"], result
        assert dst.cmd("query-status")["status"] == "inmigrate"


def test_yank_in_postcopy_pauses_and_it_recovers(tmp_path):
    """A dead network in postcopy pauses both sides (QEMU's yank cannot fail a
    postcopy: the guest runs on the destination); a recovery finishes it."""
    with EngineVM(tmp_path, "src", *BUSY, "--dirty-rate", "0") as src, \
            EngineVM(tmp_path, "dst", *BUSY, "--dirty-rate", "1", "--incoming",
                     "defer") as dst:
        for vm in (src, dst):
            vm.set_caps(events=True, postcopy_ram=True)
        dst.cmd("migrate-incoming", {"channels": [main(unix(tmp_path / "mig.sock"))]})
        src.set_params(downtime_limit=1, max_postcopy_bandwidth=4096)
        src.cmd("migrate", {"channels": [main(unix(tmp_path / "mig.sock"))]})
        src.wait_event("MIGRATION_PASS")
        src.cmd("migrate-start-postcopy")
        src.wait_status("postcopy-active")
        dst.wait_status("postcopy-active")
        src.cmd("yank", {"instances": [{"type": "migration"}]}, oob=True)
        src.wait_status("postcopy-paused")
        dst.wait_status("postcopy-paused")
        # Still a migration to yank (QEMU keeps the instance until cleanup).
        assert src.cmd("query-yank", oob=True) == [{"type": "migration"}]
        uri = f"unix:{tmp_path}/recover.sock"
        dst.cmd("migrate-recover", {"uri": uri}, oob=True)
        src.cmd("migrate", {"channels": [main(unix(tmp_path / "recover.sock"))],
                            "resume": True})
        src.set_params(max_postcopy_bandwidth=0)
        src.wait_status("completed")
        dst.wait_status("completed")
        dst.cmd("stop")
        assert dst.cmd("x-engine-check-ab")["ok"]


# -- postcopy fault figures -------------------------------------------------------------------

QEMU_FIGURES = ("postcopy-blocktime", "postcopy-vcpu-blocktime", "postcopy-latency",
                "postcopy-non-vcpu-latency")


@pytest.mark.parametrize("blocktime", [True, False], ids=["blocktime", "no-blocktime"])
def test_postcopy_latency_figures_follow_the_blocktime_capability(blocktime, tmp_path):
    with EngineVM(tmp_path, "src", *BUSY, "--dirty-rate", "0") as src, \
            EngineVM(tmp_path, "dst", *BUSY, "--incoming", "defer") as dst:
        src.set_caps(events=True, postcopy_ram=True)
        dst.set_caps(events=True, postcopy_ram=True, postcopy_blocktime=blocktime)
        dst.cmd("migrate-incoming", {"uri": f"unix:{tmp_path}/mig.sock"})
        src.set_params(downtime_limit=1, max_postcopy_bandwidth=32 << 20)
        src.cmd("migrate", {"uri": f"unix:{tmp_path}/mig.sock"})
        src.wait_event("MIGRATION_PASS")
        src.cmd("migrate-start-postcopy")
        src.wait_status("completed")
        dst.wait_status("completed")
        info = dst.cmd("query-migrate")
        assert info["status"] == "completed"
        # The engine's own figures, always, under x- names.
        assert info["x-postcopy-faults"] in ("userfaultfd", "software")
        assert 0 <= info["x-postcopy-latency-p50"] <= info["x-postcopy-latency-p99"]
        assert not {"postcopy-latency-p50", "postcopy-latency-p99",
                    "postcopy-faults"} & set(info)
        if not blocktime:
            assert not {*QEMU_FIGURES, "postcopy-latency-dist",
                        "postcopy-vcpu-latency"} & set(info), info
            return
        assert set(QEMU_FIGURES) <= set(info), info
        assert isinstance(info["postcopy-blocktime"], int)          # ms
        assert len(info["postcopy-vcpu-blocktime"]) == 1            # ms, one vCPU
        assert info["postcopy-non-vcpu-latency"] == 0               # ns: only vCPUs fault
        # 24 power-of-two buckets of microseconds, one entry per vCPU
        assert len(info["postcopy-latency-dist"]) == 24
        assert len(info["postcopy-vcpu-latency"]) == 1
        if info["ram"]["postcopy-requests"]:
            # ns: a remote fault takes at least a round trip's microseconds
            assert info["postcopy-latency"] >= 1000
            assert sum(info["postcopy-latency-dist"]) > 0
            # one vCPU: its mean is everyone's
            assert info["postcopy-vcpu-latency"] == [info["postcopy-latency"]]
        assert "postcopy-blocktime" not in src.cmd("query-migrate")  # the destination's


# -- against QEMU 10 -------------------------------------------------------------------------

@pytest.mark.interop
def test_qemu10_listens_on_channels_and_the_engine_migrates_to_it(qemu10, tmp_shm_path,
                                                                  tmp_path):
    engine_ram = tmp_shm_path
    qemu_ram = tmp_shm_path.with_name(tmp_shm_path.name + "-qemu")
    fill_image(engine_ram, SIZE, seed=13)
    try:
        with QemuVM(qemu_ram, SIZE, incoming="defer", name="qemu-dst", qemu=qemu10) as dst, \
                EngineVM(tmp_path, "engine-src", "--machine", "none", *QUIET,
                         "--mem-path", str(engine_ram)) as src:
            dst.set_caps({"events": True})
            src.set_caps(events=True)
            dst.cmd("migrate-incoming", channels=[main(inet(0))])
            channels = [main(inet(dst.incoming_port()))]
            src.set_params(max_bandwidth=FAST)
            src.cmd("migrate", {"channels": channels})
            src.wait_status("completed")
            dst.wait_for_status("completed", timeout=WAIT)
            assert image_differences(engine_ram, qemu_ram) is None
    finally:
        qemu_ram.unlink(missing_ok=True)


@pytest.mark.interop
def test_qemu10_refuses_bad_channel_requests_with_the_engines_texts(qemu10, tmp_shm_path,
                                                                    tmp_path):
    """The same bad requests to QEMU 10 and to the engine: the same answers."""
    sock = unix(tmp_path / "x.sock")
    bad = [
        ("migrate", {}),
        ("migrate", {"uri": f"unix:{tmp_path}/x.sock", "channels": [main(sock)]}),
        ("migrate", {"uri": f"unix:{tmp_path}/x.sock", "blk": False}),
        ("migrate", {"uri": f"unix:{tmp_path}/x.sock", "inc": False}),
        ("migrate", {"channels": [main(sock), main(sock)]}),
        ("migrate", {"channels": [main({"type": "unix", "path": "/x"})]}),
        ("migrate", {"channels": [main({"transport": "socket", "type": "inet",
                                        "host": "h"})]}),
        ("migrate", {"channels": [main({"transport": "file", "filename": "/f"})]}),
        ("migrate-incoming", {}),
        ("migrate-incoming", {"uri": f"unix:{tmp_path}/x.sock", "channels": [main(sock)]}),
        ("migrate-incoming", {"channels": [main(sock), main(sock)]}),
        ("yank", {"instances": [{"type": "migration"}]}),
        ("yank", {"instances": [{"type": "chardev", "id": "nope"}]}),
    ]
    with QemuVM(tmp_shm_path, SIZE, incoming="defer", name="qemu", qemu=qemu10) as qemu, \
            EngineVM(tmp_path, "src", *QUIET) as src, \
            EngineVM(tmp_path, "dst", *QUIET, "--incoming", "defer") as dst:
        for command, arguments in bad:
            with pytest.raises(QMPCommandError) as info:
                qemu.cmd(command, arguments)
            # (QEMU, waiting for an incoming migration, refuses 'migrate' for
            # that only after looking at the arguments.)
            engine = dst if command == "migrate-incoming" else src
            assert refused(engine, command, arguments) == info.value.desc, (command, arguments)
        # No migration: no 'migration' instance on either (QEMU lists its
        # monitor's socket chardev, which the engine does not model).
        assert {"type": "migration"} not in qemu.cmd("query-yank")
        assert src.cmd("query-yank") == []
        assert set(qemu.cmd("query-status")) == set(src.cmd("query-status"))
