"""The load side through the command line: ``engine load`` and ``engine incoming``.

Real processes and sockets: a source (``engine migrate --to``) and a
standalone destination, or a stream file.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from engine.ram.image import write_mixed_image

ENGINE = [sys.executable, "-m", "engine"]
TIMEOUT = 180


def run(args, **kw):
    return subprocess.run(ENGINE + args, capture_output=True, text=True, timeout=TIMEOUT, **kw)


def _engine_stream(path, vcpus: int) -> None:
    res = run(["migrate", "--to", f"file:{path}", "--ram", "8M", "--vcpus", str(vcpus),
               "--workload", "ab", "--dirty-rate", "0"])
    assert res.returncode == 0, res.stderr


# -- engine load ------------------------------------------------------------------------

def test_load_takes_the_vcpu_count_from_the_stream(tmp_path):
    stream = tmp_path / "two.mig"
    _engine_stream(stream, vcpus=2)
    out = tmp_path / "load.json"
    res = run(["load", str(stream), "--json", str(out)])
    assert res.returncode == 0, res.stdout + res.stderr
    r = json.loads(out.read_text())
    assert r["vcpus"] == 2 and r["complete"] is True
    assert "cpu/1" in r["devices"] and "counter" in r["devices"]
    assert "vcpus: 2" in res.stdout
    # Asked for another number: an error that says both.
    res = run(["load", str(stream), "--vcpus", "3"])
    assert res.returncode == 1
    assert "2 vCPUs" in res.stderr and "3" in res.stderr


def test_failed_load_leaves_no_image_under_its_name(tmp_path, tmp_shm_path):
    write_mixed_image(tmp_shm_path, 8 << 20, seed=9)
    stream = tmp_path / "s.mig"
    res = run(["migrate", "--to", f"file:{stream}", "--ram", "8M", "--mem-path",
               str(tmp_shm_path), "--workload", "none", "--machine", "none"])
    assert res.returncode == 0, res.stderr
    cut = tmp_path / "cut.mig"
    data = stream.read_bytes()
    cut.write_bytes(data[:len(data) // 2])          # the RAM section cut in half
    img = tmp_path / "img"
    res = run(["load", str(cut), "--mem-path", str(img)])
    assert res.returncode == 1, res.stdout
    assert not img.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mig", "s.mig"]   # no temp
    # An image already there survives a failed load, and a good load replaces it.
    img.write_bytes(b"old")
    assert run(["load", str(cut), "--mem-path", str(img)]).returncode == 1
    assert img.read_bytes() == b"old"
    res = run(["load", str(stream), "--mem-path", str(img)])
    assert res.returncode == 0, res.stderr
    assert img.read_bytes() == tmp_shm_path.read_bytes()
    assert oct(img.stat().st_mode & 0o777) == oct(0o644 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- engine incoming --------------------------------------------------------------------

def _start_incoming(sock, *extra, env=None):
    inc = subprocess.Popen(ENGINE + ["incoming", f"unix:{sock}", *extra],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env, start_new_session=True)
    line = inc.stdout.readline()
    assert line.startswith("listening on"), line + inc.stderr.read()
    return inc


def _shm_mapped_by(pid: int) -> set[str]:
    """The engine-* shared memory segments a process tree maps."""
    import psutil
    names = set()
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            for m in p.memory_maps(grouped=True):
                if m.path.startswith("/dev/shm/engine-") and "engine-test-" not in m.path:
                    names.add(os.path.basename(m.path))
        except psutil.Error:
            pass
    return names


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


@pytest.mark.parametrize("caps", [
    pytest.param([], id="single"),
    pytest.param(["--cap", "multifd=on", "--param", "multifd-channels=2"], id="multifd"),
    pytest.param(["--cap", "postcopy-ram=on"], id="postcopy"),
])
def test_incoming_summary_counts_pages_and_prints_values(tmp_path, tmp_shm_path, caps):
    write_mixed_image(tmp_shm_path, 16 << 20, seed=11)
    sock = tmp_path / "in.sock"
    inc = _start_incoming(sock, "--machine", "none", *caps)
    try:
        src = ["migrate", "--to", f"unix:{sock}", "--ram", "16M", "--mem-path",
               str(tmp_shm_path), "--workload", "none", "--machine", "none", *caps]
        if "postcopy-ram=on" in caps:
            src += ["--postcopy-after", "0", "--param", "max-bandwidth=8M"]
        res = run(src)
        assert res.returncode == 0, res.stderr
        out, err = inc.communicate(timeout=TIMEOUT)
    finally:
        _stop(inc)
    assert inc.returncode == 0, out + err
    normal = int(re.search(r"^normal: (\d+) pages", out, re.M).group(1))
    zero = int(re.search(r"^duplicate: (\d+) pages", out, re.M).group(1))
    assert normal > 0 and normal + zero >= (16 << 20) // 4096, out
    assert int(re.search(r"^transferred ram: (\d+) kbytes", out, re.M).group(1)) > 0
    line = re.search(r"^device globalstate: (.*)$", out, re.M).group(1)
    assert re.fullmatch(r"\{'size': \d+, 'runstate': '[a-z-]+'\}", line), line


def test_standalone_incoming_gives_up_a_postcopy_whose_source_died(tmp_path, tmp_shm_path):
    """No monitor, no migrate-recover: the paused postcopy ends after
    --timeout seconds, saying it was paused and why."""
    write_mixed_image(tmp_shm_path, 128 << 20, seed=5)
    sock = tmp_path / "in.sock"
    env = dict(os.environ, ENGINE_TRACE="migrate_set_state")
    inc = _start_incoming(sock, "--vcpus", "2", "--workload", "ab", "--dirty-rate", "0",
                          "--cap", "postcopy-ram=on", "--timeout", "3", env=env)
    src = subprocess.Popen(
        ENGINE + ["migrate", "--to", f"unix:{sock}", "--ram", "128M", "--vcpus", "2",
                  "--mem-path", str(tmp_shm_path), "--workload", "ab", "--dirty-rate", "0",
                  "--cap", "postcopy-ram=on", "--param", "downtime-limit=1",
                  "--param", "max-postcopy-bandwidth=1M", "--postcopy-after", "0", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # SIGKILLed below: nothing of it can remove its work directory, so
        # that lands in the test's own tmp_path
        env=dict(os.environ, TMPDIR=str(tmp_path)))
    try:
        deadline = time.monotonic() + TIMEOUT
        for line in inc.stderr:
            assert time.monotonic() < deadline
            if "new=postcopy-active" in line:
                break
        else:
            pytest.fail("the destination never reached postcopy-active")
        time.sleep(0.5)
        left = _shm_mapped_by(src.pid)
        os.killpg(src.pid, signal.SIGKILL)          # the source and all its helpers
        src.wait()
        # What SIGKILL kept the source from removing is not the destination's leak.
        for name in left:
            try:
                os.unlink(f"/dev/shm/{name}")
            except FileNotFoundError:
                pass
        killed = time.monotonic()
        out, err = inc.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        _stop(src)
        _stop(inc)
    assert inc.returncode == 1, out + err
    assert "postcopy-paused" in err and "giving up" in err, err
    assert 2.5 < took < 30, took


# -- the destination's event table --------------------------------------------------------

def _bad_globalstate() -> bytes:
    from engine.devices import GLOBALSTATE_VMSD
    from engine.stream import encoder
    body = GLOBALSTATE_VMSD.encode({"size": 6, "runstate": b"bogus".ljust(100, b"\0")})
    return encoder.section_full(4, "globalstate", 0, 1, body)


@pytest.mark.parametrize("element, words", [
    pytest.param("postcopy_run", ("PostcopyRun", "'active'"), id="run-before-listen"),
    pytest.param("postcopy_resume", ("PostcopyResume", "'active'"), id="resume-without-pause"),
    pytest.param(_bad_globalstate, ("unknown run state 'bogus'",), id="device-values"),
])
def test_remote_errors_name_the_event_state_channel_and_offset(element, words):
    """An event out of its states, or remote data a handler refuses: one
    RemoteProtocolError with the channel and the offset of the element."""
    import socket
    import threading

    from engine.errors import RemoteProtocolError
    from engine.machine import get_profile
    from engine.migration.destination import DestinationMigration
    from engine.options import MigrationOptions
    from engine.ram.guest import Guest
    from engine.stream import encoder
    from engine.transport.channels import _SocketChannel

    head = encoder.file_header() + encoder.configuration("none")
    body = element() if callable(element) else getattr(encoder, element)()
    stream = head + body + encoder.eof()
    a, b = socket.socketpair()
    guest = Guest.create([("m0", 1 << 20, None)], vcpus=0, start=False)
    try:
        mig = DestinationMigration(get_profile("none"), MigrationOptions.default(), guest=guest)
        sender = threading.Thread(target=lambda: (a.sendall(stream), a.shutdown(socket.SHUT_WR)))
        sender.start()
        with _SocketChannel(b, "unix:test") as channel:
            info = mig.run(channel)
        sender.join()
        mig.close()
    finally:
        a.close()
        guest.close()
    assert info.status == "failed"
    err = mig.error
    assert isinstance(err, RemoteProtocolError)
    assert err.channel == "main" and err.offset == len(head)
    for word in words:
        assert word in str(err), str(err)
