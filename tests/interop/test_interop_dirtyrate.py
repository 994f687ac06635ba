"""calc-dirty-rate and query-dirty-rate as QEMU answers them (10.0, ``-M none``).

The same arguments go to QEMU and to an ``engine vm``: the refusals carry
the same texts, and a page-sampling measurement's reply has the same
members.  (QEMU under TCG refuses the dirty-ring mode and set-vcpu-dirty-limit,
which need KVM's dirty ring; the engine has both, so those are not compared.)
"""
from __future__ import annotations

import time

import pytest

from tests.e2e.test_qmp_harness import EngineVM
from tests.qemu import QemuVM, QMPCommandError

pytestmark = pytest.mark.interop

qemu_qmp = pytest.importorskip("qemu.qmp")
from qemu.qmp import ExecuteError  # noqa: E402

SIZE = "16M"

REFUSED = [
    {"calc-time": 0},
    {"calc-time": 49, "calc-time-unit": "millisecond"},
    {"calc-time": 61},
    {"calc-time": 1, "sample-pages": 127},
    {"calc-time": 1, "sample-pages": 16385},
    {"calc-time": 1, "sample-pages": 512, "mode": "dirty-bitmap"},
    {"calc-time": 1, "mode": "bogus"},
    {"calc-time": "1"},
]


def _measured(call) -> dict:
    call("calc-dirty-rate", {"calc-time": 100, "calc-time-unit": "millisecond"})
    deadline = time.monotonic() + 30
    while True:
        info = call("query-dirty-rate", {"calc-time-unit": "millisecond"})
        if info["status"] == "measured":
            return info
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_calc_dirty_rate_like_qemu(qemu, tmp_shm_path, tmp_path):
    if not qemu.modern:
        pytest.skip("calc-time-unit is QEMU 8.2's")
    with QemuVM(tmp_shm_path, SIZE, name="qemu", qemu=qemu) as ref, \
            EngineVM(tmp_path, "engine", "--machine", "none", "--vcpus", "0",
                     "--workload", "none", "--ram", SIZE) as vm:
        assert vm.cmd("query-dirty-rate").keys() == ref.cmd("query-dirty-rate").keys()
        for args in REFUSED:
            with pytest.raises(QMPCommandError) as theirs:
                ref.cmd("calc-dirty-rate", args)
            with pytest.raises(ExecuteError) as ours:
                vm.cmd("calc-dirty-rate", args)
            assert ours.value.error_class == theirs.value.error_class, args
            assert str(ours.value) == theirs.value.desc, args
        mine, qemus = _measured(vm.cmd), _measured(ref.cmd)
        assert mine.keys() == qemus.keys(), (mine, qemus)
        for key in ("status", "calc-time-unit", "sample-pages", "mode", "dirty-rate"):
            assert mine[key] == qemus[key], key
        assert mine["calc-time"] >= 100 and qemus["calc-time"] >= 100
