"""The destination on another host: a network namespace with its own address.

``engine incoming`` runs inside a fresh network namespace (tests/netns.py)
and listens on that namespace's address only; ``engine migrate`` in the root
namespace reaches it over a veth pair, as it would reach a second machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys

import pytest

from tests.netns import netns_available, netns_pair

pytestmark = pytest.mark.netns

ENGINE = [sys.executable, "-m", "engine"]
#: bound on each engine command (seconds)
TIMEOUT = 180
PORT = 4444     # the namespace is new: nothing else listens there


@pytest.fixture(scope="module")
def netns():
    ok, reason = netns_available()
    if not ok:
        pytest.skip(reason)


def _wait_listening(proc: subprocess.Popen) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(TIMEOUT):
            raise AssertionError(f"destination did not listen within {TIMEOUT} s")
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line + proc.stderr.read()
    return line.split(" ", 2)[2].strip()


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C, so that it releases its guest, before the namespace goes away."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_migrate_to_destination_in_other_namespace(netns, tmp_path):
    dest_json, src_json = tmp_path / "dest.json", tmp_path / "src.json"
    with netns_pair() as pair:
        uri = f"tcp:{pair.ns_ip}:{PORT}"
        dest = subprocess.Popen(
            pair.exec_argv(ENGINE + ["incoming", uri, "--ram", "64M", "--workload", "ab",
                                     "--verify", "--json", str(dest_json)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL)
        try:
            assert _wait_listening(dest) == uri
            # it really is on the other "host"
            assert os.readlink(f"/proc/{dest.pid}/ns/net") != os.readlink("/proc/self/ns/net")
            src = subprocess.run(
                ENGINE + ["migrate", "--to", uri, "--ram", "64M", "--workload", "ab",
                          "--json", str(src_json)],
                capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
            out, err = dest.communicate(timeout=TIMEOUT)
        finally:
            with contextlib.suppress(Exception):
                _stop(dest)
    assert src.returncode == 0, src.stdout + src.stderr
    assert dest.returncode == 0, out + err
    s = json.loads(src_json.read_text())
    assert s["migration"]["status"] == "completed"
    d = json.loads(dest_json.read_text())
    assert d["migration"]["status"] == "completed", d["migration"]
    assert d["migration"]["ram"]["total"] == 64 << 20
    assert d["verification"]["ab"]["ok"] is True, d["verification"]["ab"]
    assert d["devices"]["globalstate"]["runstate"] == "running"
    assert "cpu/0" in d["devices"]
