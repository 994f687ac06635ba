"""What the benchmarks share: scratch files, one engine or QEMU migration, limits.

Every benchmark here migrates a RAM image that lives in a ``/dev/shm`` file
(``--mem-path`` for the engine, ``memory-backend-file,share=on`` for QEMU),
checks that the destination's file equals the image, and sets the figures
next to what this machine can do at all: bytes per second over a local
socket between processes, and a numpy memcpy.

Units: MB = 10**6 bytes, GB/s = 10**9 bytes/s, times in ms unless named ``_s``.

Scratch files are held open from the moment they exist until they are
removed.  The test suite's leak check (``tests/conftest.py``) unlinks any new
``engine-*`` entry in ``/dev/shm`` that no process has open or mapped, and a
test session may be running on the same host; a file that only this process
knows by name would vanish between two migrations.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.qemu: the QEMU harness the interop tests use

from engine.errors import EngineError  # noqa: E402
from tests.qemu import (QEMU_BUILDS, ManagedProcess, QemuVM, find_qemu,  # noqa: E402
                        qemu_at, stop_process)

SHM_DIR = Path("/dev/shm")
#: every file a benchmark puts in /dev/shm starts with this
SHM_PREFIX = "engine-bench-"
#: bytes/s: far above anything reached here, so in effect unlimited (0 is
#: avoided because its meaning changed between QEMU versions)
MAX_BANDWIDTH = 1 << 40
DOWNTIME_LIMIT_MS = 300
#: send/recv size of the socket limit measurement
SOCKET_CHUNK = 1 << 20
#: the destination-equals-image comparison reads this much of each file at once
COMPARE_CHUNK = 64 << 20
IMAGE_SEED = 20240501


class BenchError(EngineError):
    """A measurement could not be made or its result is wrong."""


#: how each program's destination RAM starts (see bench/README.md, "Modes")
MODES = {
    "resident": "destination RAM populated at start-up, before the clock "
                "(QEMU prealloc=on, engine --prealloc)",
    "fresh": "destination RAM new: neither program populates it before the clock "
             "(QEMU without prealloc, engine without --prealloc)",
}
GIB = 1 << 30


# ---------------------------------------------------------------------------
# Scratch space

class Scratch:
    """A benchmark's /dev/shm files and scratch directory, removed on close.

    :meth:`hold` keeps a file open so that no leak checker takes it for
    garbage (see the module docstring); :meth:`check` tells whether a path
    is still the file that was held.
    """

    def __init__(self) -> None:
        self.tag = secrets.token_hex(4)
        self.dir = Path(tempfile.mkdtemp(prefix=SHM_PREFIX))  # logs, sockets, reports
        self._shm: dict[Path, None] = {}
        self._held: dict[Path, int] = {}

    def shm(self, role: str) -> Path:
        """A /dev/shm path for ``role``, removed by :meth:`close`."""
        path = SHM_DIR / f"{SHM_PREFIX}{self.tag}-{role}"
        self._shm[path] = None
        return path

    def hold(self, path: Path) -> None:
        """Keep ``path`` (which must exist) open until :meth:`remove` or :meth:`close`."""
        self._release(path)
        try:
            self._held[path] = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise BenchError(f"cannot open {path}: {exc}") from None

    def check(self, path: Path) -> None:
        """Raise :class:`BenchError` if ``path`` is no longer the held file."""
        fd = self._held.get(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise BenchError(f"{path} was removed by someone else") from None
        if fd is not None:
            held = os.fstat(fd)
            if (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino):
                raise BenchError(f"{path} was replaced by someone else")

    def remove(self, path: Path) -> None:
        """Close and unlink ``path`` now."""
        self._release(path)
        path.unlink(missing_ok=True)

    def _release(self, path: Path) -> None:
        fd = self._held.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for path in list(self._held):
            self._release(path)
        for path in self._shm:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_file(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    shutil.copyfile(src, dst)


def _read_exact(f, buf: np.ndarray, path: Path) -> None:
    view, got = memoryview(buf), 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise BenchError(f"{path}: short read")
        got += n


def first_difference(a: Path, b: Path, chunk: int = COMPARE_CHUNK) -> str | None:
    """``None`` if files ``a`` and ``b`` are equal, else where they first differ.

    Reads both with ``read`` rather than mapping them: a hole in a tmpfs
    file reads as zeros without being allocated, so a mostly-empty guest
    file costs no memory to check.
    """
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        size_a, size_b = os.fstat(fa.fileno()).st_size, os.fstat(fb.fileno()).st_size
        if size_a != size_b:
            return f"{b} has {size_b} bytes, {a} has {size_a}"
        buf_a = np.empty(min(chunk, size_a), np.uint8)
        buf_b = np.empty_like(buf_a)
        for off in range(0, size_a, chunk):
            n = min(chunk, size_a - off)
            x, y = buf_a[:n], buf_b[:n]
            _read_exact(fa, x, a)
            _read_exact(fb, y, b)
            if not np.array_equal(x, y):
                at = off + int(np.flatnonzero(x != y)[0])
                return f"{b} differs from {a} first at byte {at} (page {at // 4096})"
    return None


def human_size(size: int) -> str:
    """``size`` bytes in the largest binary unit that keeps it whole-ish."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):g} {unit}"
    return f"{size} B"


#: what ends a run early, with a message instead of a traceback (the
#: Scratch has cleaned up by the time it reaches main)
RUN_FAILURES = (KeyboardInterrupt, EngineError, TimeoutError, OSError)


def run_failed(exc: BaseException) -> int:
    """Say why a run ended early; the exit code: 130 for Ctrl-C, else 1."""
    if isinstance(exc, KeyboardInterrupt):
        print("bench: interrupted; cleaned up", file=sys.stderr)
        return 130
    print(f"bench: failed: {exc}", file=sys.stderr)
    return 1


def check_shm_free(needed: int, what: str) -> str | None:
    """Why ``needed`` bytes of /dev/shm (which is RAM) cannot be had, or ``None``."""
    free = shutil.disk_usage(SHM_DIR).free
    if free < needed:
        return (f"{SHM_DIR} has {free / 2**30:.1f} GiB free, {what} needs "
                f"{needed / 2**30:.1f} GiB")
    available = mem_available()
    if available is not None and available < needed:
        return (f"only {available / 2**30:.1f} GiB of RAM available (MemAvailable), "
                f"{what} needs {needed / 2**30:.1f} GiB in {SHM_DIR}")
    return None


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (``None`` where there is none)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


# ---------------------------------------------------------------------------
# Options in the engine's and QEMU's spellings

def engine_option_args(caps: Mapping[str, bool], params: Mapping[str, object]) -> list[str]:
    """``--cap NAME=on|off`` and ``--param NAME=VALUE`` arguments."""
    out: list[str] = []
    for name, on in caps.items():
        out += ["--cap", f"{name}={'on' if on else 'off'}"]
    for name, value in params.items():
        out += ["--param", f"{name}={value}"]
    return out


# ---------------------------------------------------------------------------
# engine

def wait_listening(proc: ManagedProcess, timeout: float) -> str:
    """The URI printed by ``engine incoming`` once it listens."""
    deadline = time.monotonic() + timeout
    while True:
        for line in proc.stdout().splitlines():
            if line.startswith("listening on "):
                return line.split(" ", 2)[2].strip()
        if proc.poll() is not None:
            raise BenchError("engine incoming exited before listening\n" + proc.describe())
        if time.monotonic() > deadline:
            raise BenchError(f"engine incoming not listening after {timeout} s\n"
                             + proc.describe())
        time.sleep(0.01)


def read_report(path: Path, proc: ManagedProcess) -> dict:
    """The ``--json`` report an engine command wrote."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"no usable --json report {path}: {exc}\n{proc.describe()}") from None


def engine_uri(scratch: Scratch, transport: str, name: str) -> str:
    return (f"unix:{scratch.dir / f'{name}.sock'}" if transport == "unix"
            else "tcp:127.0.0.1:0")


def run_engine(scratch: Scratch, image: Path, src_ram: Path, size: int, transport: str,
               mode: str, name: str, timeout: float, *, caps: Mapping[str, bool] | None = None,
               params: Mapping[str, object] | None = None) -> dict:
    """One engine-to-engine migration of ``src_ram``; checked against ``image``.

    ``engine incoming URI --mem-path DST`` and ``engine migrate --to URI
    --mem-path SRC --workload none``, two fresh processes with no vCPUs (as
    QEMU's ``-M none`` has none), both given ``caps`` and ``params``; the
    destination creates its RAM file, populated at start-up (``--prealloc``)
    in ``resident`` mode, not in ``fresh``.
    ``name`` names logs and sockets.  Returns :func:`figures`, with the CPU
    time both sides report (``x-cpu-time``: coordinator and workers, during
    the migration); raises :class:`BenchError` if either side did not
    complete or the destination's RAM is not the image.
    """
    scratch.check(src_ram)
    dst_ram = scratch.shm("engine-dst")
    scratch.remove(dst_ram)     # the destination creates it
    uri = engine_uri(scratch, transport, name)
    dst_json, src_json = scratch.dir / f"{name}-incoming.json", scratch.dir / f"{name}-migrate.json"
    engine = [sys.executable, "-m", "engine"]
    ram = ["--machine", "none", "--ram", str(size), "--vcpus", "0"]
    options = engine_option_args(caps or {}, params or {})
    prealloc = ["--prealloc"] if mode == "resident" else []
    with ManagedProcess([*engine, "incoming", uri, *ram, "--mem-path", dst_ram, *prealloc,
                         *options, "--quiet", "--json", dst_json, "--timeout", str(timeout)],
                        scratch.dir, f"{name}-incoming", cwd=REPO) as dst:
        listening = wait_listening(dst, timeout)
        scratch.hold(dst_ram)  # created by now, and mapped by the destination
        start = time.perf_counter()
        with ManagedProcess([*engine, "migrate", "--to", listening, *ram,
                             "--mem-path", src_ram, "--workload", "none", *options,
                             "--json", src_json, "--quiet"],
                            scratch.dir, f"{name}-migrate", cwd=REPO) as src:
            rc = src.wait(timeout)
            wall = time.perf_counter() - start
            if rc != 0:
                raise BenchError(f"engine migrate exited {rc}\n{src.describe()}\n"
                                 + dst.describe())
            info = read_report(src_json, src)["migration"]
        drc = dst.wait(timeout)
        if drc != 0:
            raise BenchError(f"engine incoming exited {drc}\n{dst.describe()}")
        dst_info = read_report(dst_json, dst)["migration"]
    if info.get("status") != "completed" or dst_info.get("status") != "completed":
        raise BenchError(f"engine migration not completed: source {info.get('status')}, "
                         f"destination {dst_info.get('status')}: {info.get('error-desc')}")
    diff = first_difference(image, dst_ram)
    scratch.remove(dst_ram)
    if diff:
        raise BenchError(f"engine destination RAM is not the image: {diff}")
    cpu = (info.get("x-cpu-time", 0) + dst_info.get("x-cpu-time", 0)) / 1000
    return figures(info, wall, size, cpu)


# ---------------------------------------------------------------------------
# QEMU

def find_baseline(choice: str | None):
    """The QEMU to compare with: ``--qemu`` as a version label (7.2, 10.0) or
    a binary's path; by default today's QEMU (10.0 from .ci/qemu10) where it
    is installed, else the system's.  (Qemu or None, version line or why not)."""
    if choice in QEMU_BUILDS:
        return find_qemu(choice)
    if choice:
        return qemu_at(choice)
    found, why = find_qemu("10.0")
    if found is None:
        found, why = find_qemu("7.2")
    return found, why


def qemu_status(disabled_by: str | None = None,
                choice: str | None = None) -> tuple[object, str, str]:
    """(the QEMU to use or None, its version line or the reason it is not
    used, short label for tables)."""
    if disabled_by:
        return None, disabled_by, "qemu"
    found, why = find_baseline(choice)
    if found is None:
        return None, why, "qemu"
    return found, why, f"qemu {found.version}"


def _qemu_cpu(*vms) -> float:
    """CPU seconds (user + system, every thread) the QEMU processes used so far."""
    import psutil
    total = 0.0
    for vm in vms:
        t = psutil.Process(vm.proc.pid).cpu_times()
        total += t.user + t.system
    return total


def run_qemu(scratch: Scratch, image: Path, src_ram: Path, size: int, transport: str,
             mode: str, name: str, timeout: float, *, caps: Mapping[str, bool] | None = None,
             params: Mapping[str, object] | None = None, qemu=None) -> dict:
    """One QEMU-to-QEMU migration of ``src_ram``; checked against ``image``.

    Two ``-M none`` VMs (``tests/qemu.py``), both given ``caps`` and
    ``params`` before the destination listens (``migrate-incoming``) and the
    source starts; the destination creates its RAM file, with prealloc=on
    when resident.  Returns :func:`figures`; wall is ``migrate`` until
    ``completed`` was seen, and CPU both processes' time over the same span.
    """
    scratch.check(src_ram)
    dst_ram = scratch.shm("qemu-dst")
    scratch.remove(dst_ram)     # the destination creates it
    common = dict(start_timeout=timeout, command_timeout=timeout, qemu=qemu)
    with QemuVM(src_ram, size, name=f"{name}-src", **common) as src, \
            QemuVM(dst_ram, size, incoming="defer", name=f"{name}-dst",
                   prealloc=mode == "resident", **common) as dst:
        scratch.hold(dst_ram)
        for vm in (src, dst):
            if caps:
                vm.set_caps(dict(caps))
            if params:
                vm.set_params(dict(params))
        if transport == "unix":
            uri = f"unix:{scratch.dir / f'{name}.sock'}"
            dst.migrate_incoming(uri)
        else:
            dst.migrate_incoming("tcp:127.0.0.1:0")
            uri = f"tcp:127.0.0.1:{dst.incoming_port(timeout)}"
        cpu0 = _qemu_cpu(src, dst)
        start = time.perf_counter()
        src.migrate(uri)
        info = src.wait_for_status("completed", timeout=timeout, poll=0.005)
        wall = time.perf_counter() - start
        dst.wait_for_status("completed", timeout=timeout, poll=0.005)
        cpu = _qemu_cpu(src, dst) - cpu0
    diff = first_difference(image, dst_ram)
    scratch.remove(dst_ram)
    if diff:
        raise BenchError(f"QEMU destination RAM is not the image: {diff}")
    return figures(info, wall, size, cpu)


def figures(info: dict, wall: float, size: int, cpu_s: float) -> dict:
    """The numbers a run contributes, from a completed ``query-migrate`` reply
    and the CPU seconds both sides spent during the migration.

    ``transferred`` is what the side reports: QEMU 7.2 counts multifd pages
    before compression, so for it this is not the bytes on the wire.
    """
    ram = info.get("ram") or {}
    total_ms = int(info["total-time"])
    seconds = max(total_ms, 1) / 1000
    return {"total_time_ms": total_ms, "wall_s": wall,
            "downtime_ms": info.get("downtime"),
            "transferred_bytes": int(ram.get("transferred", 0)),
            "multifd_bytes": ram.get("multifd-bytes"),
            "normal_pages": ram.get("normal"), "zero_pages": ram.get("duplicate"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "guest_gbps": size / seconds / 1e9,
            "wire_gbps": int(ram.get("transferred", 0)) / seconds / 1e9,
            "cpu_s": cpu_s, "cpu_s_per_gib": cpu_s / (size / GIB)}


# ---------------------------------------------------------------------------
# Cells: the engine next to QEMU

#: the figures of one side that a cell reports as medians over its runs
SIDE_FIGURES = ("total_time_ms", "wall_s", "downtime_ms", "transferred_bytes",
                "multifd_bytes", "guest_gbps", "cpu_s", "cpu_s_per_gib")


def compare_cell(runs: list[dict], target: float | None,
                 cpu_target: float | None = None) -> dict:
    """One cell from its runs (``{"engine": figures, "qemu": figures}`` each, a
    side's figures replaced by ``{"error": text}`` where it failed): medians
    per side, engine/QEMU for time and CPU, and the verdicts against
    ``target`` (time) and ``cpu_target`` (CPU), None where a side is missing."""
    cell: dict = {}
    for side in ("engine", "qemu"):
        ok = [r[side] for r in runs if side in r and "error" not in r[side]]
        errors = [r[side]["error"] for r in runs if side in r and "error" in r[side]]
        if errors:
            cell[f"{side}_errors"] = errors
        if ok:
            cell[side] = {k: median(x.get(k) for x in ok) for k in SIDE_FIGURES}
            cell[side]["runs"] = len(ok)
    eng, qemu = cell.get("engine"), cell.get("qemu")
    if eng and qemu:
        cell["engine_over_qemu"] = eng["total_time_ms"] / qemu["total_time_ms"]
        if qemu["cpu_s"]:
            cell["cpu_engine_over_qemu"] = eng["cpu_s"] / qemu["cpu_s"]
    for name, limit, ratio in (("target", target, "engine_over_qemu"),
                               ("cpu_target", cpu_target, "cpu_engine_over_qemu")):
        if limit is not None:
            cell[name] = limit
            cell[f"{name}_met"] = cell[ratio] <= limit if ratio in cell else None
    return cell


def print_cells(cells: list[dict], qlabel: str, out) -> None:
    """The table of cells (each with a ``key``): time, downtime and CPU per GiB
    of both programs, the ratios and the verdicts."""
    print(f"{'cell':<24}{'total-time ms':>22}{'downtime ms':>14}{'CPU s/GiB':>19}"
          f"{'target':>15}", file=out)
    print(f"{'':<24}{'engine':>8}{'QEMU':>7}{'e/Q':>7}{'engine':>8}{'QEMU':>6}"
          f"{'engine':>8}{'QEMU':>6}{'e/Q':>6}{'time':>8}{'cpu':>7}", file=out)
    verdict = {True: "ok", False: "NO", None: "?"}

    def fmt(d, key, spec):
        return format(d[key], spec) if d and d.get(key) is not None else "-"

    for c in cells:
        eng, qemu = c.get("engine"), c.get("qemu")
        time_t = (f"{verdict[c['target_met']]}<={c['target']:g}" if "target" in c else "")
        cpu_t = (f"{verdict[c['cpu_target_met']]}<={c['cpu_target']:g}"
                 if "cpu_target" in c else "")
        e_ms = fmt(eng, "total_time_ms", ".0f") if eng else "FAILED"
        q_ms = fmt(qemu, "total_time_ms", ".0f") if qemu or not c.get("qemu_errors") \
            else "FAILED"
        print(f"{c['key']:<24}{e_ms:>8}{q_ms:>7}{fmt(c, 'engine_over_qemu', '.2f'):>7}"
              f"{fmt(eng, 'downtime_ms', '.0f'):>8}{fmt(qemu, 'downtime_ms', '.0f'):>6}"
              f"{fmt(eng, 'cpu_s_per_gib', '.2f'):>8}{fmt(qemu, 'cpu_s_per_gib', '.2f'):>6}"
              f"{fmt(c, 'cpu_engine_over_qemu', '.2f'):>6}{time_t:>8}{cpu_t:>7}", file=out)
    for c in cells:
        for side in ("engine", "qemu"):
            for err in c.get(f"{side}_errors", ()):
                print(f"{c['key']} {side} failed: {err}", file=out)


# ---------------------------------------------------------------------------
# Machine limits

#: Start of every baseline child script (``python -c``): ``connect(family,
#: address)`` opens a stream socket to a ``unix`` path or a ``tcp`` host:port
#: (TCP_NODELAY, as the migrations' channels have).
CHILD_CONNECT = r"""
import socket, sys

def connect(family, address):
    if family == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        host, port = address.rsplit(":", 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        address = (host, int(port))
    s.connect(address)
    return s
"""

_SENDER = CHILD_CONNECT + r"""
family, address, total, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = connect(family, address)
buf = memoryview(bytearray(b"\xa5") * chunk)
left = total
while left:
    n = min(left, chunk)
    s.sendall(buf[:n])
    left -= n
s.close()
"""


def socket_limit(scratch: Scratch, size: int, transport: str, timeout: float,
                 streams: int = 1) -> float:
    """GB/s that ``streams`` sender processes move to this one over local sockets.

    ``size`` bytes in all, split evenly, in 1 MiB ``send``/``recv_into``
    calls; one receiving thread per stream (``recv_into`` releases the GIL).
    """
    if transport == "unix":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = str(scratch.dir / "limit.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
        listener.bind(address)
    else:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % listener.getsockname()[1]
    shares = [size // streams + (i < size % streams) for i in range(streams)]
    children: list[subprocess.Popen] = []
    conns: list[socket.socket] = []
    try:
        listener.listen(streams)
        listener.settimeout(timeout)
        for share in shares:
            children.append(subprocess.Popen(
                [sys.executable, "-c", _SENDER, transport, address, str(share),
                 str(SOCKET_CHUNK)], stdin=subprocess.DEVNULL, start_new_session=True))
        for _ in shares:
            conn, _ = listener.accept()
            conns.append(conn)
            if transport != "unix":
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(timeout)
        got = [0] * streams
        errors: list[BaseException] = []

        def receive(i: int) -> None:
            buf = memoryview(bytearray(SOCKET_CHUNK))
            try:
                while True:
                    n = conns[i].recv_into(buf)
                    if n == 0:
                        return
                    got[i] += n
            except OSError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=receive, args=(i,), daemon=True)
                   for i in range(streams)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        elapsed = time.perf_counter() - start
        codes = [c.wait(timeout) for c in children]
        if errors or any(codes) or sum(got) != size or any(t.is_alive() for t in threads):
            raise BenchError(f"socket limit: got {sum(got)} of {size} bytes over "
                             f"{streams} stream(s), senders exited {codes}, errors {errors}")
        return size / elapsed / 1e9
    finally:
        for conn in conns:
            conn.close()
        listener.close()
        for child in children:
            stop_process(child, group=True)


def memcpy_limit(size: int) -> float:
    """GB/s numpy copies a ``size``-byte array into another (both already faulted in)."""
    src = np.empty(size, dtype=np.uint8)
    src.fill(0x5A)
    dst = np.empty_like(src)
    dst.fill(0)
    start = time.perf_counter()
    np.copyto(dst, src)
    elapsed = time.perf_counter() - start
    if dst[-1] != 0x5A:
        raise BenchError("memcpy limit: the copy did not happen")
    return size / elapsed / 1e9


# ---------------------------------------------------------------------------
# Reports and process-wide setup

def add_run_args(ap, *, size: str = "1G", timeout: float = 600.0) -> None:
    """The options every benchmark takes: size, repeats, transport, json, timeout."""
    ap.add_argument("--size", default=size, help=f"guest RAM size, QEMU suffixes (default {size})")
    ap.add_argument("--repeat", type=int, default=3, help="runs; medians are reported (default 3)")
    ap.add_argument("--uri", type=choice_list("unix", "tcp"), default=["unix", "tcp"],
                    help="transports, comma-separated: unix socket, tcp on 127.0.0.1 "
                         "(default unix,tcp)")
    ap.add_argument("--mode", type=choice_list(*MODES), default=["resident"],
                    help="destination memory, comma-separated: resident (populated before "
                         "the clock, as prealloc=on) or fresh (default resident)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    ap.add_argument("--timeout", type=float, default=timeout,
                    help=f"seconds any single step may take (default {timeout:g})")
    ap.add_argument("--no-qemu", action="store_true", help="measure the engine only")
    ap.add_argument("--qemu", metavar="PATH|7.2|10.0", default=None,
                    help="the QEMU to compare with: a qemu-system-x86_64 binary (an "
                         "unpacked tree gets -L its usr/share/qemu) or a version label "
                         "(default: 10.0 from make qemu10 if present, else the system's)")


def choice_list(*choices: str):
    """An argparse type: a comma-separated list of some of ``choices``, in order given."""
    import argparse

    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}: {text}")
        return list(dict.fromkeys(values))
    return parse


def check_run_args(args, parse_size) -> int | None:
    """The validated size in bytes, or None after printing why it is refused."""
    size = parse_size(args.size)
    if size <= 0 or size % 4096:
        print(f"bench: --size {args.size}: need a positive multiple of 4096", file=sys.stderr)
        return None
    if args.repeat < 1:
        print("bench: --repeat must be at least 1", file=sys.stderr)
        return None
    return size


def make_image(scratch: "Scratch", size: int, record: dict) -> Path:
    """The mixed image every run migrates, held open in the scratch area."""
    from engine.ram.image import write_mixed_image
    image = scratch.shm("image")
    t = time.perf_counter()
    stats = write_mixed_image(image, size, IMAGE_SEED)
    scratch.hold(image)
    record.update(pages=stats.pages, zero_pages=stats.zero_pages,
                  text_pages=stats.text_pages, random_pages=stats.random_pages)
    print(f"image: {image} ({human_size(size)}, {stats.zero_pages} zero / "
          f"{stats.text_pages} text / {stats.random_pages} random pages, "
          f"{time.perf_counter() - t:.1f} s)", flush=True)
    return image


def median(values) -> float | None:
    """Median of the values that are not ``None`` (``None`` if there are none)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def host_info() -> dict:
    return {"cpus": os.cpu_count(), "machine": platform.machine(),
            "kernel": platform.release(), "python": platform.python_version(),
            "numpy": np.__version__,
            # other work on the host skews every figure
            "loadavg_at_start": os.getloadavg()}


def write_json(path: str | None, obj: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM/SIGHUP take the same way out as Ctrl-C, through every finally.
    raise KeyboardInterrupt(f"signal {signum}")


def exit_through_finally_on_signals() -> None:
    """Make SIGTERM and SIGHUP unwind like Ctrl-C, so every cleanup runs."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
