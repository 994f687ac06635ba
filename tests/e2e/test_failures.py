"""Failure paths through the command line: bad streams, bad options, Ctrl-C.

Bad streams are made from a good one (``engine migrate --to file:``) by
cutting or patching it at offsets found by decoding it, then fed to
``engine load`` and to ``engine incoming`` (from a file, and over a unix
socket with this test as the source).  Each must fail with exit code 1 and
an error that says what is wrong and where; the suite's leak checks
(tests/conftest.py) then make sure nothing was left behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from engine.ram.image import write_mixed_image
from engine.stream import events as ev
from engine.stream.decoder import StreamDecoder
from tests.conftest import SHM_DIR, _leaked_shm, _shm_names

ENGINE = [sys.executable, "-m", "engine"]
#: bound on any one engine command (seconds); they take well under one
TIMEOUT = 120
RAM = 32 << 20
PAGE = 4096


def run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(ENGINE + args, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL, **kw)


# ---------------------------------------------------------------------------
# A good stream and where its parts are


@dataclass(frozen=True)
class Layout:
    """Byte offsets in the good stream (``-M none``, one 32 MiB block ``m0``)."""
    data: bytes
    configuration: int           # the configuration section
    page_record: int             # first PAGE record (it names its block)
    page_data: int               # that record's 4096 data bytes
    end_section: int             # the RAM END section
    devices: dict                # idstr -> (start, end) of its FULL section


def _layout(data: bytes) -> Layout:
    from engine.commands.load import _all_devices
    dec = StreamDecoder(_all_devices(1), channel="layout")
    dec.feed(data)
    dec.feed_eof()
    found: dict = {"devices": {}}
    while True:
        start = dec.offset
        e = dec.next_event()
        if e is ev.NEED_DATA:
            break
        if isinstance(e, ev.Configuration):
            found["configuration"] = start
        elif isinstance(e, ev.RamPage) and "page_record" not in found:
            found["page_record"], found["page_data"] = start, dec.offset - PAGE
        elif isinstance(e, ev.SectionEnd):
            found["end_section"] = start
        elif isinstance(e, ev.DeviceState):
            found["devices"][e.idstr] = (start, dec.offset)
    assert dec.finished
    return Layout(data=data, **found)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Layout:
    """A complete stream of a 32 MiB ``-M none`` guest with a mixed image."""
    d = tmp_path_factory.mktemp("stream")
    image, stream = d / "image", d / "good.mig"
    write_mixed_image(image, RAM, seed=11)
    res = run(["migrate", "--to", f"file:{stream}", "--ram", "32M", "--mem-path", str(image),
               "--machine", "none", "--workload", "none", "--quiet"])
    assert res.returncode == 0, res.stderr
    layout = _layout(stream.read_bytes())
    assert set(layout.devices) == {"timer", "globalstate"}
    # the stream is good: load reads it, incoming accepts it
    assert run(["load", str(stream)]).returncode == 0
    res = run(["incoming", f"file:{stream}", "--machine", "none", "--ram", "32M",
               "--vcpus", "0", "--quiet"])
    assert res.returncode == 0, res.stderr
    return layout


def leaked_segments(before: set[str]) -> list[str]:
    """``engine-*`` segments made since ``before`` that are still there and that no
    process outside this test's tree uses (another test session on this machine
    may create and remove its own while we look)."""
    return [n for n in _leaked_shm(before) if (SHM_DIR / n).exists()]


def _patch(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


# Each case: how to spoil the stream, what the error must say, and the offset
# (or the range of offsets) it must name.  A function of the layout each.

def _cut_in_page(g):
    cut = g.page_data + PAGE // 2
    return g.data[:cut], r"stream truncated: expected RAM page data", (g.page_data, g.page_data)


def _cut_in_device(g):
    start, end = g.devices["globalstate"]
    cut = (start + end) // 2
    return (g.data[:cut], r"stream truncated: expected .*'globalstate'", (start, cut - 1))


def _wrong_magic(g):
    return _patch(g.data, 0, b"QEVX"), r"bad magic 0x51455658.*not a migration stream", (0, 0)


def _unsupported_version(g):
    return (_patch(g.data, 4, (9).to_bytes(4, "big")), r"unsupported stream version 9, expected 3",
            (4, 4))


def _unknown_section_type(g):
    at = g.end_section
    return _patch(g.data, at, b"\x42"), r"Unknown section type 66", (at, at)


def _unknown_device(g):
    start, _ = g.devices["timer"]
    name_at = g.data.index(b"\x05timer", start)
    return (_patch(g.data, name_at, b"\x05tymer"),
            r"Unknown savevm section or instance 'tymer' 0", (start, start))


def _unknown_block_in_page(g):
    name_at = g.page_record + 8
    assert g.data[name_at:name_at + 3] == b"\x02m0"
    return (_patch(g.data, name_at, b"\x02m9"), r"unknown RAM block 'm9'",
            (name_at, name_at))


CASES = {
    "truncated-in-ram-page": _cut_in_page,
    "truncated-in-device-section": _cut_in_device,
    "wrong-magic": _wrong_magic,
    "unsupported-version": _unsupported_version,
    "unknown-section-type": _unknown_section_type,
    "unknown-device-section": _unknown_device,
    "unknown-block-in-page-record": _unknown_block_in_page,
}


def _offset(text: str) -> int:
    found = re.findall(r"offset (\d+)", text)
    assert found, f"no offset in: {text}"
    return int(found[-1])


# ---------------------------------------------------------------------------
# Feeding a stream to a destination


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next stdout line of ``proc``, waiting at most ``timeout`` seconds."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no output within {timeout} s")
    return proc.stdout.readline()


def _listening(proc: subprocess.Popen) -> str:
    line = _read_line(proc, TIMEOUT)
    assert line.startswith("listening on "), line + proc.stderr.read()
    return line.split(" ", 2)[2].strip()


def _send_stream(path: str, data: bytes) -> None:
    """Be a source that sends ``data`` and closes; the destination may hang up early."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for i in range(0, len(data), 1 << 20):
                s.sendall(data[i:i + (1 << 20)])
            s.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while s.recv(1 << 16):   # until the destination closes its end
                pass


def incoming(tmp_path: Path, data: bytes, via: str, args: list[str]):
    """Run ``engine incoming`` on ``data``; (exit code, stderr, JSON report)."""
    report = tmp_path / "in.json"
    if via == "file":
        stream = tmp_path / "bad.mig"
        stream.write_bytes(data)
        res = run(["incoming", f"file:{stream}", "--json", str(report), "--quiet", *args])
        rc, err = res.returncode, res.stderr
    else:
        sock = tmp_path / "in.sock"
        proc = subprocess.Popen(ENGINE + ["incoming", f"unix:{sock}", "--json", str(report),
                                          "--quiet", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        try:
            _listening(proc)
            _send_stream(str(sock), data)
            _, err = proc.communicate(timeout=TIMEOUT)
            rc = proc.returncode
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert not sock.exists(), "the listening socket file was left behind"
    rep = json.loads(report.read_text()) if report.exists() else None
    return rc, err, rep


def _assert_failed(rc, err, rep, pattern):
    assert rc == 1, err
    assert re.search(pattern, err), err
    assert "Traceback" not in err
    assert rep is not None and rep["migration"]["status"] == "failed", rep
    assert re.search(pattern, rep["migration"]["error-desc"])
    return rep["migration"]["error-desc"]


# ---------------------------------------------------------------------------
# Bad input to a destination


@pytest.mark.parametrize("case", list(CASES))
def test_load_refuses_bad_stream(tmp_path, good, case):
    data, pattern, (lo, hi) = CASES[case](good)
    path = tmp_path / "bad.mig"
    path.write_bytes(data)
    report = tmp_path / "load.json"
    res = run(["load", str(path), "--json", str(report)])
    assert res.returncode == 1, res.stdout + res.stderr
    assert re.search(pattern, res.stderr), res.stderr
    assert str(path) in res.stderr and "Traceback" not in res.stderr
    assert lo <= _offset(res.stderr) <= hi, res.stderr
    assert "error" in json.loads(report.read_text())


@pytest.mark.parametrize("via", ["file", "unix"])
@pytest.mark.parametrize("case", list(CASES))
def test_incoming_refuses_bad_stream(tmp_path, good, case, via):
    data, pattern, (lo, hi) = CASES[case](good)
    rc, err, rep = incoming(tmp_path, data, via,
                            ["--machine", "none", "--ram", "32M", "--vcpus", "1"])
    desc = _assert_failed(rc, err, rep, pattern)
    assert lo <= _offset(desc) <= hi, desc
    assert "channel main" in desc


@pytest.mark.parametrize("via", ["file", "unix"])
def test_incoming_refuses_ram_block_of_wrong_size(tmp_path, good, via):
    rc, err, rep = incoming(tmp_path, good.data, via,
                            ["--machine", "none", "--ram", "16M", "--vcpus", "1"])
    desc = _assert_failed(rc, err, rep, r"Length mismatch")
    # names the block and both lengths: the stream's 32 MiB, our 16 MiB
    assert "m0" in desc and f"{RAM:#x}" in desc and f"{RAM // 2:#x}" in desc, desc


def test_incoming_refuses_unknown_ram_block(tmp_path, good):
    rc, err, rep = incoming(tmp_path, good.data, "file",
                            ["--machine", "none", "--ram", "32M", "--ram-id", "pc.ram"])
    desc = _assert_failed(rc, err, rep, r'Unknown ramblock "m0"')
    assert "pc.ram" in desc


@pytest.mark.parametrize("via", ["file", "unix"])
def test_incoming_refuses_other_machine_type(tmp_path, good, via):
    rc, err, rep = incoming(tmp_path, good.data, via, ["--machine", "engine", "--ram", "32M"])
    desc = _assert_failed(rc, err, rep,
                          r"Machine type received is 'none' and local is 'engine-1.0'")
    assert "channel main" in desc


def test_load_refuses_other_machine_type(tmp_path, good):
    path = tmp_path / "good.mig"
    path.write_bytes(good.data)
    res = run(["load", str(path), "--machine", "engine"])
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Machine type received is 'none' and local is 'engine-1.0'" in res.stderr
    assert _offset(res.stderr) == good.configuration
    assert run(["load", str(path), "--machine", "none"]).returncode == 0


# ---------------------------------------------------------------------------
# Bad URI, parameter or capability: refused before anything starts

BAD_OPTIONS = {
    "bad-uri": (["--to", "bogus:x"], ["bogus:x"]),
    "multifd-channels-0": (["--param", "multifd-channels=0"], ["multifd-channels"]),
    "negative-downtime": (["--param", "downtime-limit=-1"], ["downtime-limit"]),
    "preempt-without-postcopy": (["--cap", "postcopy-preempt=on"],
                                 ["postcopy-preempt", "postcopy-ram"]),
    "rdma-unsupported": (["--cap", "rdma-pin-all=on"], ["rdma-pin-all", "not supported"]),
}


def _refused(stderr: str) -> bool:
    """A refusal's text: the engine's own (a whole-set check) or argparse's
    usage error (one option's value, checked while parsing)."""
    return stderr.startswith("engine: error: ") or (
        stderr.startswith("usage: engine") and ": error: argument " in stderr)


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_migrate_refuses_bad_option(case):
    args, words = BAD_OPTIONS[case]
    shm_before = _shm_names()
    res = run(["migrate", "--ram", "16M", *args])
    assert res.returncode == 2, res.stdout + res.stderr
    for w in words:
        assert w in res.stderr, res.stderr
    assert _refused(res.stderr) and "Traceback" not in res.stderr
    assert not leaked_segments(shm_before)


@pytest.mark.parametrize("args", [["bogus:x"], ["unix:/nonexistent/x", "--cap", "rdma-pin-all=on"],
                                  ["tcp:127.0.0.1:0", "--param", "downtime-limit=-1"]])
def test_incoming_refuses_bad_option(args):
    res = run(["incoming", *args, "--ram", "16M"])
    assert res.returncode == 2, res.stdout + res.stderr
    assert "listening" not in res.stdout
    assert _refused(res.stderr)


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_starts_nothing(monkeypatch, capsys, case):
    """In-process: no guest, no process, no channel is made before the refusal."""
    import engine.transport
    from engine.cli import main
    from engine.ram.guest import Guest

    def forbidden(what):
        def fail(*a, **kw):
            raise AssertionError(f"{what} was started for a refused command line")
        return fail

    monkeypatch.setattr(Guest, "create", forbidden("a guest"))
    monkeypatch.setattr(subprocess, "Popen", forbidden("a process"))
    monkeypatch.setattr(engine.transport, "connect", forbidden("a connection"))
    monkeypatch.setattr(engine.transport, "listen", forbidden("a listener"))
    args, words = BAD_OPTIONS[case]
    assert main(["migrate", "--ram", "16M", *args]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


# ---------------------------------------------------------------------------
# Ctrl-C


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_gone(procs: list[psutil.Process], timeout: float = 30) -> list[str]:
    """Those of ``procs`` still alive after ``timeout`` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {' '.join(p.cmdline()[:5])}")
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _wait_for(predicate, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _incoming_child(pid: int):
    for p in _descendants(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "incoming" in p.cmdline():
                return p
    return None


def _established(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return any(c.status == psutil.CONN_ESTABLISHED
                   for c in proc.net_connections(kind="tcp"))
    return False


@pytest.mark.parametrize("target", ["process", "process-group"])
def test_sigint_cancels_running_migrate(tmp_path, target):
    """Ctrl-C during a migration that cannot converge: cancel, exit, clean up."""
    shm_before = _shm_names()
    report = tmp_path / "r.json"
    # QEMU's non-converging setup: 3 MB/s, 1 ms downtime, a guest dirtying faster.
    proc = subprocess.Popen(
        ENGINE + ["migrate", "--ram", "64M", "--vcpus", "2", "--workload", "ab",
                  "--param", "max-bandwidth=3000000", "--param", "downtime-limit=1",
                  "--uri", "tcp:127.0.0.1:0", "--json", str(report)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        start_new_session=True)
    try:
        dest = _wait_for(lambda: _incoming_child(proc.pid), "the local destination")
        _wait_for(lambda: _established(dest), "the migration connection")
        cmd = dest.cmdline()
        workdir = Path(cmd[cmd.index("--json") + 1]).parent
        everything = _descendants(proc.pid)
        assert len(everything) >= 3  # source vCPUs, the destination and its vCPUs
        if target == "process":
            os.kill(proc.pid, signal.SIGINT)
        else:   # what a terminal's Ctrl-C does: the whole foreground group
            os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (130, 1), out + err
    assert "interrupted" in err or "cancelled" in err, err
    assert "Traceback" not in err, err
    assert not _wait_gone(everything), "processes left after Ctrl-C"
    assert not leaked_segments(shm_before)
    assert not workdir.exists(), "the private work directory was left behind"


def test_sigint_stops_incoming_waiting_for_connection(tmp_path):
    shm_before = _shm_names()
    sock = tmp_path / "in.sock"
    proc = subprocess.Popen(ENGINE + ["incoming", f"unix:{sock}", "--ram", "16M", "--vcpus", "2",
                                      "--workload", "ab"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        assert _listening(proc) == f"unix:{sock}"
        vcpus = _descendants(proc.pid)
        assert len(vcpus) >= 2
        assert sock.exists()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert not sock.exists()
    assert not _wait_gone(vcpus)
    assert not leaked_segments(shm_before)
