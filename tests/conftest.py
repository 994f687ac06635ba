"""Suite-wide fixtures and the leak checks every test runs under.

The engine's resources outlive a crashed test unless someone notices: shared
memory segments stay in /dev/shm (RAM that only a reboot returns) and child
processes keep running.  So every test is checked, and the session once more
at the end (for session-scoped fixtures):

* no ``engine-*`` entry appeared in /dev/shm that is still there afterwards;
* no engine temp directory (``engine-multifd-*``, ``engine-postcopy-*``,
  ``engine-migrate-*``) appeared in the temp dir that is still there once
  the test's processes are gone;
* no process started below pytest is still alive after a 2 s grace period.

/tmp is shared with other sessions on this machine, so the session and the
engine processes its tests start use a temp dir of its own (``TMPDIR``);
an entry there that a process outside this session works in is not
counted either (engine.stress.leaks.dirs_used_by_others).

Orphans would escape the second check (the kernel hands them to init), so
pytest makes itself a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``):
a grandchild whose parent died is re-parented to pytest, shows up in
``psutil.Process().children()``, and gets reported.

A test that leaks fails (at teardown) with the leftovers listed; the leftovers
are then removed, so the next test starts clean and is not blamed.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest


def _remove_session_tmpdir() -> None:
    if _SESSION_TMPDIR is not None:
        shutil.rmtree(_SESSION_TMPDIR, ignore_errors=True)


# Registered before anything imports multiprocessing, so that it runs after
# multiprocessing's own exit handler has removed its pymp-* directory there.
atexit.register(_remove_session_tmpdir)

# Other sessions may run on this machine: their live segments are not our
# leaks (the stress runner needs the same scan).
from engine.stress.leaks import dirs_used_by_others, is_helper, temp_dirs, used_by_others

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "engine-"
CHILD_GRACE_S = 2.0

_PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    known = {line.split(":")[0].strip() for line in config.getini("markers")}
    for name, doc in (("interop", "needs a real QEMU (qemu-system-x86_64)"),
                      ("netns", "needs network namespaces (ip netns, root)")):
        if name not in known:  # setup.cfg may already have it
            config.addinivalue_line("markers", f"{name}: {doc}")
    _become_subreaper()
    _private_tmpdir()


def _private_tmpdir() -> None:
    """This session and its children make their temp directories in one of
    its own, so that the leak check sees only this session's.

    pytest's tmp_path stays where it was (PYTEST_DEBUG_TEMPROOT).  The
    directory is removed when the session ends.
    """
    global _SESSION_TMPDIR
    if _SESSION_TMPDIR is not None:
        return
    system = tempfile.gettempdir()
    _SESSION_TMPDIR = tempfile.mkdtemp(prefix="engt-")
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", system)
    os.environ["TMPDIR"] = tempfile.tempdir = _SESSION_TMPDIR


_SESSION_TMPDIR: str | None = None


def _become_subreaper() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # best effort: without it only orphans go unnoticed


# ---------------------------------------------------------------------------
# Shared memory

def _shm_names() -> set[str]:
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)}
    except FileNotFoundError:
        return set()


def _leaked_shm(before: set[str]) -> list[str]:
    new = _shm_names() - before
    # Re-check existence after the /proc scan: another session may have
    # removed its own segment meanwhile.
    return sorted(n for n in new - used_by_others(new) if (SHM_DIR / n).exists())


def _remove_shm(names: list[str]) -> None:
    for n in names:
        try:
            (SHM_DIR / n).unlink()
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------
# Child processes

def _describe(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline()) or p.name()
        return f"pid {p.pid} [{p.status()}]: {cmd}"
    except psutil.Error:
        return f"pid {p.pid} (gone)"


def _reap_zombies(exclude: set[int]) -> None:
    """Collect exited children nobody waited for (orphans adopted as subreaper).

    A ``Popen`` whose zombie is collected here later reports status 0; only
    processes the test never waited for are affected, never those in
    ``exclude`` (which belong to longer-lived fixtures).
    """
    for p in psutil.Process().children():
        if p.pid in exclude:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass


def _children(exclude: set[int]) -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        if p.pid in exclude or is_helper(p):
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue  # exited; reaped by _reap_zombies or its owner
        except psutil.Error:
            continue
        out.append(p)
    return out


def _leftover_children(exclude: set[int], grace: float) -> list[psutil.Process]:
    """Children not in ``exclude`` still alive after up to ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while True:
        _reap_zombies(exclude)
        left = _children(exclude)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _kill(procs: list[psutil.Process], exclude: set[int]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)
    _reap_zombies(exclude)


def _child_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


# ---------------------------------------------------------------------------
# Temp directories

def _leaked_dirs(before: set[str]) -> list[str]:
    new = temp_dirs() - before
    return sorted(d for d in new - dirs_used_by_others(new) if os.path.isdir(d))


def _leak_report(shm: list[str], procs: list[psutil.Process], where: str,
                 dirs: list[str] = ()) -> str:
    lines = [f"{where} leaked resources:"]
    if shm:
        lines.append(f"  shared memory left in {SHM_DIR}: {', '.join(shm)}")
    if dirs:
        lines.append(f"  temp directories left: {', '.join(dirs)}")
    if procs:
        lines.append(f"  child processes still running after {CHILD_GRACE_S} s:")
        lines += [f"    {_describe(p)}" for p in procs]
    return "\n".join(lines)


def _check_leaks(shm_before: set[str], pids_before: set[int], where: str,
                 dirs_before: set[str]) -> None:
    procs = _leftover_children(pids_before, CHILD_GRACE_S)
    shm = _leaked_shm(shm_before)  # after the children: they may unlink on exit
    dirs = _leaked_dirs(dirs_before)
    if not shm and not procs and not dirs:
        return
    report = _leak_report(shm, procs, where, dirs)
    _kill(procs, pids_before)
    _remove_shm(shm)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    pytest.fail(report, pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _session_leak_check():
    """At the end of the session: nothing new in /dev/shm or the temp dirs,
    no children left."""
    shm_before, pids_before, dirs_before = _shm_names(), _child_pids(), temp_dirs()
    yield
    _check_leaks(shm_before, pids_before, "The test session", dirs_before)


@pytest.fixture(autouse=True)
def _test_leak_check(_session_leak_check):
    """After each test (and its fixtures): nothing new in /dev/shm or the
    temp dirs, no children."""
    shm_before, pids_before, dirs_before = _shm_names(), _child_pids(), temp_dirs()
    yield
    _check_leaks(shm_before, pids_before, "This test", dirs_before)


# ---------------------------------------------------------------------------
# Helpers for tests

@pytest.fixture
def tmp_shm_path():
    """A fresh path ``/dev/shm/engine-test-<random>`` (not created), removed afterwards.

    For file-backed guest RAM (ours or QEMU's ``memory-backend-file``).
    """
    path = SHM_DIR / f"{SHM_PREFIX}test-{secrets.token_hex(6)}"
    try:
        yield path
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


ENGINE_CMD = (sys.executable, "-m", "engine")


@pytest.fixture
def engine_cmd() -> list[str]:
    """The argv prefix that runs the engine CLI: ``[python, "-m", "engine"]``."""
    return list(ENGINE_CMD)


# ---------------------------------------------------------------------------
# The QEMUs the interop tests run against: Debian's 7.2 and QEMU 10.0.  A test
# that takes ``qemu`` runs once per QEMU and is skipped, with the reason, where
# that QEMU is missing (.ci/run installs both: 7.2 with apt, 10.0 with
# .ci/qemu10).

QEMU_VERSIONS = ("7.2", "10.0")


def _qemu_or_skip(label: str):
    from tests.qemu import find_qemu
    found, why = find_qemu(label)
    if found is None:
        pytest.skip(f"QEMU {label}: {why}")
    return found


@pytest.fixture(params=QEMU_VERSIONS, ids=lambda v: f"qemu{v}")
def qemu(request):
    return _qemu_or_skip(request.param)


@pytest.fixture
def qemu10():
    return _qemu_or_skip("10.0")


@pytest.fixture
def qemu72():
    return _qemu_or_skip("7.2")
