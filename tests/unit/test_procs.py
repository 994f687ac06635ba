"""engine.procs: what every spawned child starts with."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine import procs


def _report_env(conn) -> None:
    procs.child_setup(os.getppid())
    conn.send(os.environ.get("OPENBLAS_NUM_THREADS"))
    conn.close()


def _spawn_and_read(monkeypatch, value):
    import multiprocessing
    if value is None:
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", value)
    ours, theirs = multiprocessing.Pipe()
    proc = procs.spawn(_report_env, (theirs,), "env-probe")
    try:
        assert ours.poll(60), "child did not report"
        got = ours.recv()
    finally:
        proc.join(10)
    return got, os.environ.get("OPENBLAS_NUM_THREADS")


def test_child_gets_one_blas_thread_and_parent_env_is_restored(monkeypatch):
    child, parent = _spawn_and_read(monkeypatch, None)
    assert child == "1"
    assert parent is None


def test_child_keeps_a_callers_blas_setting(monkeypatch):
    child, parent = _spawn_and_read(monkeypatch, "3")
    assert child == "3" and parent == "3"


def test_keep_heap_sets_glibc_thresholds():
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    procs.keep_heap(FakeLibc())
    assert dict(calls) == {procs._M_MMAP_THRESHOLD: 32 << 20,
                           procs._M_TRIM_THRESHOLD: 128 << 20}
    procs.keep_heap(object())       # no mallopt (not glibc): nothing to do


@pytest.mark.parametrize("preset", [None, "4"])
def test_engine_command_sets_blas_threads_unless_given(preset):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    code = ("import os, sys\n"
            "import engine.cli\n"
            "engine.cli.main = lambda: print(os.environ.get('OPENBLAS_NUM_THREADS')) or 0\n"
            "from engine.__main__ import run\n"
            "sys.exit(run())\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.strip()
    assert out == (preset or "1")
