"""What a case must not leave behind: engine segments, temp directories and processes.

The runner takes a :func:`snapshot` before a case and calls
:func:`find_leaks` after tearing it down.  A segment is a leak if it
appeared in /dev/shm meanwhile, is still there after a grace period, and no
process outside this one's tree has it mapped or open (other engine runs
on the same machine have segments of their own).  A temp directory the
engine makes (:data:`TEMP_DIR_PREFIXES`: a multifd pool's, a postcopy fault
handler's, ``engine migrate``'s) is a leak on the same terms: new, still
there, and nothing outside this tree working in it (a socket bound in it,
a file open in it, a current directory).  A process is a leak if
it is a live descendant that was not there before (the standard library's
resource tracker aside), or one of the *victims*: the descendants of a
process the case killed, which the kernel hands to init rather than to us.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import psutil

from engine.ram.shm import SEGMENT_PREFIX, SHM_DIR

#: the names the engine gives its segments (engine.ram.shm.create_segment).
#: Other ``engine-*`` entries (a test's ``engine-test-*`` image files) are
#: not made by a stress case, and may belong to another run on this machine.
SEGMENT_NAME = re.compile(re.escape(SEGMENT_PREFIX) + r"[0-9a-f]{16}")
#: helpers the standard library starts once per interpreter (the engine's
#: template process is multiprocessing's forkserver, engine.procs); not leaks
STDLIB_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
#: how long segments and processes get to go away after a case (seconds):
#: a killed process's segments are unlinked by its resource tracker, which
#: notices only once every process holding its pipe has exited
GRACE_SECONDS = 8.0
#: the temp directories the engine makes (multifd/pool.py, postcopy/handler.py,
#: commands/migrate.py), each removed by its maker when it ends
TEMP_DIR_PREFIXES = ("engine-multifd-", "engine-postcopy-", "engine-migrate-")


@dataclass(frozen=True)
class Snapshot:
    segments: frozenset
    children: frozenset
    temp_dirs: frozenset = field(default_factory=frozenset)


def temp_roots() -> set[str]:
    """Where the engine's temp directories go: this process's temp dir, and
    the one its children get from ``TMPDIR`` when that differs."""
    roots = {tempfile.gettempdir()}
    env = os.environ.get("TMPDIR")
    if env and os.path.isdir(env):
        roots.add(os.path.realpath(env))
    return roots


def temp_dirs(roots=None) -> set[str]:
    """Paths of the engine's temp directories (:data:`TEMP_DIR_PREFIXES`) now."""
    out = set()
    for root in roots if roots is not None else temp_roots():
        with contextlib.suppress(OSError):
            with os.scandir(root) as it:
                for e in it:
                    if e.name.startswith(TEMP_DIR_PREFIXES) and e.is_dir(follow_symlinks=False):
                        out.add(e.path)
    return out


def _unix_socket_inodes(dirs: set[str]) -> dict[str, str]:
    """Inode -> directory, for the unix sockets bound under ``dirs``."""
    out = {}
    prefixes = tuple(d.rstrip("/") + "/" for d in dirs)
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7].startswith(prefixes):
                d = next(d for d, pre in zip(dirs, prefixes) if parts[7].startswith(pre))
                out[parts[6]] = d
    return out


def dirs_used_by_others(dirs: set[str]) -> set[str]:
    """Those of ``dirs`` that a process outside this one's tree works in: its
    current directory, a file it has open there, or a socket bound there
    (another run's directories, not our leaks)."""
    if not dirs:
        return set()
    me = psutil.Process()
    ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
    inodes = _unix_socket_inodes(dirs)
    prefixes = {d: d.rstrip("/") + "/" for d in dirs}
    found: set[str] = set()

    def note(target: str) -> None:
        if target.startswith("socket:["):
            if d := inodes.get(target[8:-1]):
                found.add(d)
            return
        for d, pre in prefixes.items():
            if target == d or target.startswith(pre):
                found.add(d)

    for pid in psutil.pids():
        if pid in ours:
            continue
        with contextlib.suppress(OSError):
            note(os.readlink(f"/proc/{pid}/cwd"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    note(os.readlink(f"/proc/{pid}/fd/{fd}"))
        if found == dirs:
            break
    return found


def segments() -> set[str]:
    """The engine's segments in /dev/shm now."""
    try:
        return {n for n in os.listdir(SHM_DIR) if SEGMENT_NAME.fullmatch(n)}
    except FileNotFoundError:
        return set()


def _looks_like_helper(p: psutil.Process) -> bool:
    return any(h in " ".join(p.cmdline()) for h in STDLIB_HELPERS)


def is_helper(p: psutil.Process) -> bool:
    """Whether ``p`` is one of multiprocessing's helpers (:data:`STDLIB_HELPERS`):
    they live as long as the process that started them, so they are no leak.

    A child forked from the template process (engine.procs) has the
    template's command line; its parent does too, which is how it is told
    apart: it is a vCPU or a worker, and may well be a leak.
    """
    with contextlib.suppress(psutil.Error):
        if not _looks_like_helper(p):
            return False
        parent = p.parent()
        return parent is None or not _looks_like_helper(parent)
    return False


def live_children() -> dict[int, psutil.Process]:
    """This process's live descendants, stdlib helpers and zombies aside."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and not is_helper(p):
                out[p.pid] = p
    return out


def snapshot() -> Snapshot:
    return Snapshot(frozenset(segments()), frozenset(live_children()), frozenset(temp_dirs()))


def used_by_others(names: set[str]) -> set[str]:
    """Those of ``names`` (entries of /dev/shm) that a process outside this
    one's tree maps or opens: another run's segments, not our leaks."""
    if not names:
        return set()
    me = psutil.Process()
    ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
    paths = {os.path.join(SHM_DIR, n): n for n in names}
    found: set[str] = set()
    marker = os.path.join(SHM_DIR, SEGMENT_PREFIX)
    for pid in psutil.pids():
        if pid in ours:
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(marker)
                    if i >= 0 and (n := paths.get(line[i:].rstrip("\n"))):
                        found.add(n)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if n := paths.get(os.readlink(f"/proc/{pid}/fd/{fd}")):
                        found.add(n)
        except OSError:
            continue        # gone, or not ours to read
        if found == names:
            break
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(pid: int) -> str:
    with contextlib.suppress(psutil.Error):
        p = psutil.Process(pid)
        return f"pid {pid} ({' '.join(p.cmdline())[:80] or p.name()})"
    return f"pid {pid}"


def find_leaks(before: Snapshot, victims=(), grace: float = GRACE_SECONDS,
               clean: bool = True) -> tuple[list[str], list[str]]:
    """``(files, processes)`` left since ``before``, waiting up to ``grace``
    seconds for them to go: ``files`` are segment names and temp directory
    paths.  With ``clean`` the leftovers are then removed (segments
    unlinked, directories deleted, processes killed) so the next case
    starts clean."""
    deadline = time.monotonic() + grace
    while True:
        new_segments = segments() - before.segments
        if new_segments:
            new_segments -= used_by_others(new_segments)
        procs = {pid for pid in live_children() if pid not in before.children}
        procs |= {pid for pid in victims if _alive(pid)}
        # Directories only once the processes are gone: the last one out
        # removes them.
        new_dirs = set() if procs else temp_dirs() - before.temp_dirs
        if new_dirs:
            new_dirs -= dirs_used_by_others(new_dirs)
        if (not new_segments and not procs and not new_dirs) or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if procs:       # out of time with processes left: their directories count too
        new_dirs = temp_dirs() - before.temp_dirs
        new_dirs -= dirs_used_by_others(new_dirs)
    leaked = sorted(n for n in new_segments if os.path.exists(os.path.join(SHM_DIR, n)))
    leaked += sorted(d for d in new_dirs if os.path.isdir(d))
    described = [_describe(pid) for pid in sorted(procs)]
    if clean:
        killed = []
        for pid in procs:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                p.kill()
                killed.append(p)
        psutil.wait_procs(killed, timeout=5)
        for n in leaked:
            if os.path.isabs(n):
                shutil.rmtree(n, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(SHM_DIR, n))
    return leaked, described
