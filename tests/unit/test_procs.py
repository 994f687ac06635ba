"""engine.procs: what every child (forked from the template process) starts with."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine import procs


_PROBE = """
import multiprocessing, os, sys
from engine import procs

def report(conn, parent):
    procs.child_setup(parent)
    conn.send((os.environ.get("OPENBLAS_NUM_THREADS"), os.environ.get("ENGINE_TRACE")))

if __name__ == "__main__":
    {before}
    ours, theirs = multiprocessing.Pipe()
    proc = procs.spawn(report, (theirs, os.getpid()), "env-probe")
    assert ours.poll(60), "child did not report"
    print(repr((ours.recv(), os.environ.get("OPENBLAS_NUM_THREADS"))))
    proc.join(10)
"""


def _probe(tmp_path, blas, before=""):
    """Run a fresh coordinator (the template starts with its environment) that
    spawns one child; the child's (BLAS, trace) settings and the parent's BLAS."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "ENGINE_TRACE")}
    if blas is not None:
        env["OPENBLAS_NUM_THREADS"] = blas
    script = tmp_path / "probe.py"
    script.write_text(_PROBE.replace("{before}", before or "pass"))
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return eval(out.strip().splitlines()[-1])


def test_child_gets_one_blas_thread_and_parent_env_is_restored(tmp_path):
    (child_blas, _), parent = _probe(tmp_path, None)
    assert child_blas == "1"
    assert parent is None


def test_child_keeps_a_callers_blas_setting(tmp_path):
    (child_blas, _), parent = _probe(tmp_path, "3")
    assert child_blas == "3" and parent == "3"


def test_child_takes_the_trace_setting_of_when_it_starts(tmp_path):
    """The template started before ENGINE_TRACE was set; a child started
    after sees it all the same."""
    (_, child_trace), _ = _probe(tmp_path, None, before="procs.warm_up(); "
                                 "os.environ['ENGINE_TRACE'] = 'multifd_*'")
    assert child_trace == "multifd_*"


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


def _burn(parent: int, seconds: float) -> None:
    procs.child_setup(parent)
    import time
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_meter_counts_a_helper_that_exited_meanwhile():
    """A worker forked from the template is reaped by the template, not by us:
    its time must still count once it is gone (the template's children's
    times), and nothing before start() does."""
    _burn_before = procs.spawn(_burn, (os.getpid(), 0.2), "burn-before")
    _burn_before.join(30)
    meter = procs.CpuMeter(lambda: [])
    meter.start()
    child = procs.spawn(_burn, (os.getpid(), 0.4), "burn")
    child.join(30)
    assert child.exitcode == 0
    seconds = meter.stop()
    assert 0.35 <= seconds < 2.0, seconds
