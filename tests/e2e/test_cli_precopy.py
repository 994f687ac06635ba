"""End to end through the command line: real processes, sockets, shared memory."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from engine.ram.image import write_mixed_image

ENGINE = [sys.executable, "-m", "engine"]
TIMEOUT = 180


def run(args, **kw):
    return subprocess.run(ENGINE + args, capture_output=True, text=True, timeout=TIMEOUT, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def assert_verified(res, report_path):
    assert res.returncode == 0, res.stdout + res.stderr
    rep = read_json(report_path)
    assert rep["migration"]["status"] == "completed"
    assert rep["verification"]["ok"] is True, rep["verification"]
    assert rep["verification"]["memory_equal"] is True
    return rep


@pytest.mark.parametrize("uri", ["unix", "tcp"])
def test_migrate_live_ab_local(tmp_path, uri):
    report = tmp_path / "r.json"
    args = ["migrate", "--ram", "128M", "--vcpus", "2", "--workload", "ab",
            "--json", str(report)]
    if uri == "tcp":
        args += ["--uri", "tcp:127.0.0.1:0"]
    res = run(args)
    rep = assert_verified(res, report)
    assert rep["verification"]["ab"]["ok"] is True
    ram = rep["migration"]["ram"]
    assert ram["total"] == 128 << 20
    assert ram["dirty-sync-count"] >= 2
    assert ram["normal"] + ram["duplicate"] >= (128 << 20) // 4096
    assert "Migration status: completed" in res.stdout
    # the destination resumed from the migrated registers: cpu + counter moved
    dev = rep["destination"]["devices"]
    assert "cpu/0" in dev and "cpu/1" in dev and "counter" in dev
    assert dev["globalstate"]["runstate"] == "running"


def test_migrate_random_workload_with_return_path(tmp_path):
    report = tmp_path / "r.json"
    res = run(["migrate", "--ram", "64M", "--vcpus", "2", "--workload", "random",
               "--dirty-rate", "50", "--hot-set", "0.1", "--cap", "return-path=on",
               "--json", str(report)])
    assert_verified(res, report)


@pytest.mark.parametrize("destination", ["new", "used-prealloc"])
def test_migrate_file_backed_both_sides(tmp_shm_path, tmp_path, destination):
    """Onto a new file (its zeros trusted), or onto a used one, populated first
    (QEMU's prealloc=on): every zero page there must be cleared."""
    src, dst = tmp_shm_path, str(tmp_shm_path) + "-dst"
    write_mixed_image(src, 32 << 20, seed=3)
    extra = []
    if destination == "used-prealloc":
        write_mixed_image(dst, 32 << 20, seed=4)
        extra = ["--prealloc"]
    report = tmp_path / "r.json"
    try:
        res = run(["migrate", "--ram", "32M", "--mem-path", src, "--dst-mem-path", dst,
                   "--workload", "none", "--machine", "none", "--json", str(report),
                   *extra])
        assert_verified(res, report)
        with open(src, "rb") as a, open(dst, "rb") as b:
            assert a.read() == b.read()
    finally:
        if os.path.exists(dst):
            os.unlink(dst)


def test_migrate_via_file_uri_with_offset(tmp_shm_path, tmp_path):
    write_mixed_image(tmp_shm_path, 16 << 20, seed=4)
    stream = tmp_path / "guest.mig"
    stream.write_bytes(b"X" * 4096)
    report = tmp_path / "r.json"
    res = run(["migrate", "--ram", "16M", "--mem-path", tmp_shm_path, "--workload", "none",
               "--uri", f"file:{stream},offset=0x1000", "--json", str(report)])
    assert_verified(res, report)
    data = stream.read_bytes()
    assert data[:4096] == b"X" * 4096
    assert data[4096:4100] == b"QEVM"


def test_exec_transport_both_sides(tmp_shm_path, tmp_path):
    write_mixed_image(tmp_shm_path, 16 << 20, seed=5)
    stream = tmp_path / "guest.mig"
    dst = str(tmp_shm_path) + "-dst"
    try:
        res = run(["migrate", "--to", f"exec:cat > {stream}", "--ram", "16M",
                   "--mem-path", tmp_shm_path, "--workload", "none", "--machine", "none"])
        assert res.returncode == 0, res.stderr
        res = run(["incoming", f"exec:cat {stream}", "--ram", "16M", "--mem-path", dst,
                   "--machine", "none"])
        assert res.returncode == 0, res.stdout + res.stderr
        with open(tmp_shm_path, "rb") as a, open(dst, "rb") as b:
            assert a.read() == b.read()
    finally:
        if os.path.exists(dst):
            os.unlink(dst)


def test_fd_transport(tmp_shm_path, tmp_path):
    write_mixed_image(tmp_shm_path, 8 << 20, seed=6)
    dst = str(tmp_shm_path) + "-dst"
    a, b = socket.socketpair()
    try:
        inc = subprocess.Popen(ENGINE + ["incoming", f"fd:{b.fileno()}", "--ram", "8M",
                                         "--mem-path", dst, "--quiet"],
                               pass_fds=[b.fileno()], stdout=subprocess.PIPE, text=True)
        b.close()
        res = run(["migrate", "--to", f"fd:{a.fileno()}", "--ram", "8M",
                   "--mem-path", tmp_shm_path, "--workload", "none"], pass_fds=[a.fileno()])
        a.close()
        assert res.returncode == 0, res.stderr
        assert inc.wait(TIMEOUT) == 0
        with open(tmp_shm_path, "rb") as x, open(dst, "rb") as y:
            assert x.read() == y.read()
    finally:
        a.close()
        b.close()
        if os.path.exists(dst):
            os.unlink(dst)


def test_incoming_accepts_announced_block_list(tmp_path):
    port = free_port()
    rep = tmp_path / "in.json"
    inc = subprocess.Popen(ENGINE + ["incoming", f"tcp:127.0.0.1:{port}", "--vcpus", "1",
                                     "--json", str(rep), "--quiet"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert inc.stdout.readline().startswith("listening on")
        res = run(["migrate", "--to", f"tcp:127.0.0.1:{port}", "--ram", "8M",
                   "--workload", "ab", "--ram-id", "pc.ram"])
        assert res.returncode == 0, res.stderr
        assert inc.wait(TIMEOUT) == 0
        r = read_json(rep)
        assert r["migration"]["status"] == "completed"
        assert r["migration"]["ram"]["total"] == 8 << 20
    finally:
        if inc.poll() is None:
            inc.kill()
            inc.wait()


def test_load_reports_sections(tmp_path, tmp_shm_path):
    write_mixed_image(tmp_shm_path, 8 << 20, seed=7)
    stream = tmp_path / "s.mig"
    res = run(["migrate", "--to", f"file:{stream}", "--ram", "8M", "--mem-path", tmp_shm_path,
               "--workload", "none", "--machine", "none"])
    assert res.returncode == 0, res.stderr
    out = tmp_path / "load.json"
    img = tmp_path / "img"
    res = run(["load", str(stream), "--json", str(out), "--mem-path", str(img)])
    assert res.returncode == 0, res.stdout
    r = read_json(out)
    assert r["machine"] == "none"
    assert [s["idstr"] for s in r["sections"]] == ["ram", "timer", "globalstate"]
    assert r["ram"]["blocks"] == [{"idstr": "m0", "used_length": 8 << 20}]
    assert r["ram"]["pages"] + r["ram"]["zero_pages"] == 2048
    assert img.read_bytes() == open(tmp_shm_path, "rb").read()


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    sock = tmp_path / "in.sock"
    inc = subprocess.Popen(ENGINE + ["incoming", f"unix:{sock}", "--ram", "16M", "--vcpus", "1",
                                     "--cap", "multifd=on", "--param", "multifd-channels=2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert inc.stdout.readline().startswith("listening on")
        inc.terminate()
        assert inc.wait(30) == 143
        assert not sock.exists()
    finally:
        if inc.poll() is None:
            inc.kill()
            inc.wait()


@pytest.mark.parametrize("dialect", [
    ["--machine", "none-7.2"],
    ["--machine", "none", "--global", "migration.multifd-flush-after-each-section=on",
     "--global", "migration.send-switchover-start=off"],
], ids=["profile", "globals"])
def test_migrate_in_qemu72_dialect(tmp_path, dialect):
    """The 7.2 dialect, from its machine profile or QEMU's -global switches, with a
    local destination that works it out from the stream."""
    report = tmp_path / "r.json"
    res = run(["migrate", "--ram", "32M", *dialect, "--cap", "multifd=on",
               "--param", "multifd-channels=2", "--json", str(report)])
    assert res.returncode == 0, res.stderr
    ram = read_json(report)["migration"]["ram"]
    assert ram["multifd-bytes"] > 0


def test_bad_global_is_refused(tmp_path):
    res = run(["migrate", "--ram", "16M", "--global", "migration.send-switchover-start=maybe"])
    assert res.returncode == 2, res.stderr
    assert "send-switchover-start" in res.stderr
