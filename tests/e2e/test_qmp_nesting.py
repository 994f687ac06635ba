"""A real ``engine vm`` answers a QMP line nested 990 deep with an error and
keeps serving (the reader thread used to die of a RecursionError, leaving
the client without an answer)."""
from __future__ import annotations

import json
import socket

import pytest

from engine.qmp.protocol import JsonSplitter
from tests.e2e.test_qmp_harness import EngineVM


def _recv(sock: socket.socket, splitter: JsonSplitter) -> dict:
    while True:
        raw = splitter.next()
        if raw is not None:
            return json.loads(raw)
        data = sock.recv(65536)
        assert data, "the monitor closed the connection"
        splitter.feed(data)


@pytest.mark.parametrize("depth", [990, 2000])
def test_engine_vm_answers_a_deep_line_and_goes_on(tmp_path, depth):
    pytest.importorskip("qemu.qmp")
    vm = EngineVM(tmp_path, "vm", "--ram", "16M", "--vcpus", "0", "--workload", "none")
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(vm.qmp_path))
            splitter = JsonSplitter()
            assert "QMP" in _recv(sock, splitter)
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            assert _recv(sock, splitter) == {"return": {}}
            sock.sendall(b'{"execute": "migrate-set-parameters", "arguments": {"x": '
                         + b"[" * depth + b"]" * depth + b"}, \"id\": 1}\n")
            answer = _recv(sock, splitter)
            assert answer["error"]["class"] == "GenericError", answer
            sock.sendall(b'{"execute": "query-status", "id": 2}\n')
            assert _recv(sock, splitter)["return"]["status"] == "running"
        # the first client's session is unharmed too
        assert vm.cmd("query-status")["status"] == "running"
    finally:
        rc = vm.close()
    assert rc == 0, vm.proc.describe()
