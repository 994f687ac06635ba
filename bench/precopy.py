"""Precopy throughput: the engine and QEMU 7.2 moving the same guest RAM image.

One run migrates one mixed image (50% zero, 40% text, 10% random pages;
``engine.ram.image``) of ``--size`` bytes, paused (no vCPU writes it), over one
channel on this host, with the same settings on both sides: no capabilities,
``max-bandwidth`` 1 TiB/s (a cap nothing reaches, so in effect unlimited; 0 is
avoided because its meaning has changed between QEMU versions) and
``downtime-limit`` 300 ms.

* engine: ``engine incoming URI --machine none --mem-path DST`` and
  ``engine migrate --to URI --machine none --mem-path SRC --workload none``,
  two fresh processes.  Time is the source's ``query-migrate`` ``total-time``;
  wall is the whole source command (interpreter start, guest setup, teardown).
* QEMU (when ``qemu-system-x86_64`` is installed): two ``-M none`` VMs whose
  RAM is a ``memory-backend-file,share=on`` (``tests/qemu.py``), the
  destination listening through ``migrate-incoming``.  Time is the source's
  ``total-time``; wall is from ``migrate`` until ``completed`` was seen.
* This machine's limits, measured in the same run: one process pair moving
  ``--size`` bytes over the same kind of socket in 1 MiB ``send``/``recv_into``
  calls, and a numpy copy of a ``--size`` array (memcpy).

Each side gets its own copy of the image and a fresh destination file every
repeat; after every migration the destination's RAM is compared with the image
(chunked numpy comparison) and a difference fails the benchmark.  Figures are
medians over ``--repeat`` runs.  Units: MB = 10**6 bytes, GB/s = 10**9 bytes/s.
"guest GB/s" is size / total-time (zero pages included, as QEMU's own
performance figures are quoted); "wire GB/s" is transferred bytes / total-time.

Everything is bounded by ``--timeout`` and cleaned up on every path (Ctrl-C and
SIGTERM included): child processes are stopped and reaped, and the
``/dev/shm/engine-bench-*`` files and the scratch directory are removed.
"""
from __future__ import annotations

import argparse
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
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.qemu: the QEMU harness the interop tests use

from engine.errors import EngineError  # noqa: E402
from engine.options import parse_size  # noqa: E402
from engine.ram.image import MIXED, write_mixed_image  # noqa: E402
from tests.qemu import (ManagedProcess, QemuVM, qemu_available,  # noqa: E402
                        stop_process)

SHM_DIR = Path("/dev/shm")
#: every file this benchmark puts in /dev/shm starts with this
SHM_PREFIX = "engine-bench-"
#: bytes/s: far above anything a single channel reaches here
MAX_BANDWIDTH = 1 << 40
DOWNTIME_LIMIT_MS = 300
#: send/recv size of the socket limit measurement
SOCKET_CHUNK = 1 << 20
#: the destination-equals-image comparison reads this much of each file at once
COMPARE_CHUNK = 64 << 20
IMAGE_SEED = 20240501
#: /dev/shm files alive at once: image, 2 engine copies, 2 QEMU copies
SHM_FILES = 5


class BenchError(EngineError):
    """A measurement could not be made or its result is wrong."""


# ---------------------------------------------------------------------------
# Scratch space

class Scratch:
    """The benchmark's /dev/shm files and scratch directory, removed on close."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(4)
        self.dir = Path(tempfile.mkdtemp(prefix=SHM_PREFIX))  # logs, sockets, reports
        self._shm: list[Path] = []

    def shm(self, role: str) -> Path:
        """A /dev/shm path for ``role``, removed by :meth:`close`."""
        path = SHM_DIR / f"{SHM_PREFIX}{self.tag}-{role}"
        self._shm.append(path)
        return path

    def close(self) -> None:
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


def first_difference(a: Path, b: Path) -> str | None:
    """``None`` if files ``a`` and ``b`` are equal, else where they first differ."""
    size_a, size_b = a.stat().st_size, b.stat().st_size
    if size_a != size_b:
        return f"{b} has {size_b} bytes, {a} has {size_a}"
    ma = np.memmap(a, dtype=np.uint8, mode="r") if size_a else np.empty(0, np.uint8)
    mb = np.memmap(b, dtype=np.uint8, mode="r") if size_b else np.empty(0, np.uint8)
    try:
        for off in range(0, size_a, COMPARE_CHUNK):
            x, y = ma[off:off + COMPARE_CHUNK], mb[off:off + COMPARE_CHUNK]
            if not np.array_equal(x, y):
                at = off + int(np.flatnonzero(x != y)[0])
                return f"{b} differs from {a} first at byte {at} (page {at // 4096})"
        return None
    finally:
        del ma, mb


def human_size(size: int) -> str:
    """``size`` bytes in the largest binary unit that keeps it whole-ish."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):g} {unit}"
    return f"{size} B"


# ---------------------------------------------------------------------------
# engine

def _wait_listening(proc: ManagedProcess, timeout: float) -> str:
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


def _read_report(path: Path, proc: ManagedProcess) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"no usable --json report {path}: {exc}\n{proc.describe()}") from None


def run_engine(scratch: Scratch, image: Path, src_ram: Path, size: int, transport: str,
               run: int, timeout: float) -> dict:
    """One engine-to-engine migration of ``src_ram``; checked against ``image``."""
    dst_ram = scratch.shm("engine-dst")
    dst_ram.unlink(missing_ok=True)  # a fresh file, as QEMU's destination gets
    uri = (f"unix:{scratch.dir / f'engine-{run}.sock'}" if transport == "unix"
           else "tcp:127.0.0.1:0")
    dst_json, src_json = scratch.dir / f"incoming-{run}.json", scratch.dir / f"migrate-{run}.json"
    engine = [sys.executable, "-m", "engine"]
    ram = ["--machine", "none", "--ram", str(size)]
    with ManagedProcess([*engine, "incoming", uri, *ram, "--mem-path", dst_ram,
                         "--quiet", "--json", dst_json, "--timeout", str(timeout)],
                        scratch.dir, f"engine-incoming-{run}", cwd=REPO) as dst:
        listening = _wait_listening(dst, timeout)
        start = time.perf_counter()
        with ManagedProcess([*engine, "migrate", "--to", listening, *ram,
                             "--mem-path", src_ram, "--workload", "none",
                             "--param", f"max-bandwidth={MAX_BANDWIDTH}",
                             "--param", f"downtime-limit={DOWNTIME_LIMIT_MS}",
                             "--json", src_json, "--quiet"],
                            scratch.dir, f"engine-migrate-{run}", cwd=REPO) as src:
            rc = src.wait(timeout)
            wall = time.perf_counter() - start
            if rc != 0:
                raise BenchError(f"engine migrate exited {rc}\n{src.describe()}\n"
                                 + dst.describe())
            info = _read_report(src_json, src)["migration"]
        drc = dst.wait(timeout)
        if drc != 0:
            raise BenchError(f"engine incoming exited {drc}\n{dst.describe()}")
        dst_info = _read_report(dst_json, dst)["migration"]
    if info.get("status") != "completed" or dst_info.get("status") != "completed":
        raise BenchError(f"engine migration not completed: source {info.get('status')}, "
                         f"destination {dst_info.get('status')}: {info.get('error-desc')}")
    diff = first_difference(image, dst_ram)
    dst_ram.unlink()
    if diff:
        raise BenchError(f"engine destination RAM is not the image: {diff}")
    return _figures(info, wall, size)


# ---------------------------------------------------------------------------
# QEMU

def run_qemu(scratch: Scratch, image: Path, src_ram: Path, size: int, transport: str,
             run: int, timeout: float) -> dict:
    """One QEMU-to-QEMU migration of ``src_ram``; checked against ``image``."""
    dst_ram = scratch.shm("qemu-dst")
    dst_ram.unlink(missing_ok=True)
    common = dict(start_timeout=timeout, command_timeout=timeout)
    with QemuVM(src_ram, size, name=f"qemu-src-{run}", **common) as src, \
            QemuVM(dst_ram, size, incoming="defer", name=f"qemu-dst-{run}", **common) as dst:
        if transport == "unix":
            uri = f"unix:{scratch.dir / f'qemu-{run}.sock'}"
            dst.migrate_incoming(uri)
        else:
            dst.migrate_incoming("tcp:127.0.0.1:0")
            uri = f"tcp:127.0.0.1:{dst.incoming_port(timeout)}"
        src.set_params({"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS})
        start = time.perf_counter()
        src.migrate(uri)
        info = src.wait_for_status("completed", timeout=timeout, poll=0.005)
        wall = time.perf_counter() - start
        dst.wait_for_status("completed", timeout=timeout)
    diff = first_difference(image, dst_ram)
    dst_ram.unlink()
    if diff:
        raise BenchError(f"QEMU destination RAM is not the image: {diff}")
    return _figures(info, wall, size)


def _figures(info: dict, wall: float, size: int) -> dict:
    """The numbers a run contributes, from a completed ``query-migrate`` reply."""
    ram = info.get("ram") or {}
    total_ms = int(info["total-time"])
    seconds = max(total_ms, 1) / 1000
    return {"total_time_ms": total_ms, "wall_s": wall,
            "downtime_ms": info.get("downtime"),
            "transferred_bytes": int(ram.get("transferred", 0)),
            "normal_pages": ram.get("normal"), "zero_pages": ram.get("duplicate"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "guest_gbps": size / seconds / 1e9,
            "wire_gbps": int(ram.get("transferred", 0)) / seconds / 1e9}


# ---------------------------------------------------------------------------
# Machine limits

_SENDER = r"""
import socket, sys
family, address, total, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if family == "unix":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
else:
    host, port = address.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    address = (host, int(port))
s.connect(address)
buf = memoryview(bytearray(b"\xa5") * chunk)
left = total
while left:
    n = min(left, chunk)
    s.sendall(buf[:n])
    left -= n
s.close()
"""


def socket_limit(scratch: Scratch, size: int, transport: str, timeout: float) -> float:
    """GB/s one process pair moves over a local socket of ``transport``'s kind."""
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
    child = None
    try:
        listener.listen(1)
        listener.settimeout(timeout)
        child = subprocess.Popen([sys.executable, "-c", _SENDER, transport, address,
                                  str(size), str(SOCKET_CHUNK)], stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        conn, _ = listener.accept()
        with conn:
            if transport != "unix":
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(timeout)
            buf = memoryview(bytearray(SOCKET_CHUNK))
            got = 0
            start = time.perf_counter()
            while got < size:
                n = conn.recv_into(buf)
                if n == 0:
                    break
                got += n
            elapsed = time.perf_counter() - start
        if child.wait(timeout) != 0 or got != size:
            raise BenchError(f"socket limit: got {got} of {size} bytes, "
                             f"sender exited {child.returncode}")
        return size / elapsed / 1e9
    finally:
        listener.close()
        if child is not None:
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
# Report

def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(results: dict) -> dict:
    """Medians over the repeats, and the ratios the table prints."""
    med: dict = {}
    for side in ("engine", "qemu"):
        runs = [r[side] for r in results["runs"] if r.get(side)]
        if runs:
            med[side] = {k: _median(runs, k) for k in
                         ("total_time_ms", "wall_s", "downtime_ms", "transferred_bytes",
                          "guest_gbps", "wire_gbps")}
    for limit in ("socket_gbps", "memcpy_gbps"):
        med[limit] = _median(results["runs"], limit)
    ratios = {}
    if "engine" in med:
        eng = med["engine"]["guest_gbps"]
        ratios["engine_guest_gbps_over_socket"] = eng / med["socket_gbps"]
        ratios["engine_guest_gbps_over_memcpy"] = eng / med["memcpy_gbps"]
        ratios["engine_wire_gbps_over_socket"] = med["engine"]["wire_gbps"] / med["socket_gbps"]
    if "qemu" in med:
        ratios["qemu_guest_gbps_over_socket"] = med["qemu"]["guest_gbps"] / med["socket_gbps"]
        ratios["qemu_wire_gbps_over_socket"] = med["qemu"]["wire_gbps"] / med["socket_gbps"]
    if "engine" in med and "qemu" in med:
        ratios["engine_over_qemu_total_time"] = (med["engine"]["total_time_ms"]
                                                 / med["qemu"]["total_time_ms"])
    return {"median": med, "ratios": ratios}


def print_table(results: dict, out=sys.stdout) -> None:
    med, ratios = results["median"], results["ratios"]
    size = results["size_bytes"]
    print(f"\nprecopy, {human_size(size)} mixed image "
          f"({'/'.join(f'{int(p * 100)}' for p in MIXED)}% zero/text/random pages), "
          f"{results['transport']} socket, paused guest, median of {results['repeat']}",
          file=out)
    load = results["host"]["loadavg_at_start"][0]
    print(f"host: {results['host']['cpus']} CPUs, load average {load:.2f} at start", file=out)
    head = (f"{'':<16}{'total-time':>11}{'wall':>8}{'downtime':>10}"
            f"{'transferred':>13}{'guest':>8}{'wire':>8}")
    units = f"{'':<16}{'ms':>11}{'s':>8}{'ms':>10}{'MB':>13}{'GB/s':>8}{'GB/s':>8}"
    print(head, units, sep="\n", file=out)
    for side, label in (("engine", "engine"), ("qemu", results.get("qemu_version_short", "qemu"))):
        m = med.get(side)
        if m is None:
            print(f"{label:<16}  skipped: {results.get(side + '_skipped', 'no run')}", file=out)
            continue
        down = "-" if m["downtime_ms"] is None else f"{m['downtime_ms']:.0f}"
        print(f"{label:<16}{m['total_time_ms']:>11.0f}{m['wall_s']:>8.2f}{down:>10}"
              f"{m['transferred_bytes'] / 1e6:>13.1f}{m['guest_gbps']:>8.2f}"
              f"{m['wire_gbps']:>8.2f}", file=out)
    print(f"{'limit: socket':<16}{'':>50}{med['socket_gbps']:>8.2f}   "
          f"({results['transport']} stream, one process pair, 1 MiB recv_into)", file=out)
    print(f"{'limit: memcpy':<16}{'':>50}{med['memcpy_gbps']:>8.2f}   "
          f"(numpy copy of {human_size(size)})", file=out)
    print(file=out)
    if "engine_over_qemu_total_time" in ratios:
        print(f"engine / QEMU total-time:            "
              f"{ratios['engine_over_qemu_total_time']:6.2f}x", file=out)
    if "engine_guest_gbps_over_socket" in ratios:
        print(f"engine guest GB/s / socket limit:    "
              f"{ratios['engine_guest_gbps_over_socket']:6.2f}"
              f"   (wire GB/s / socket: {ratios['engine_wire_gbps_over_socket']:.2f})",
              file=out)
        print(f"engine guest GB/s / memcpy:          "
              f"{ratios['engine_guest_gbps_over_memcpy']:6.2f}", file=out)
    if "qemu_guest_gbps_over_socket" in ratios:
        print(f"QEMU guest GB/s / socket limit:      "
              f"{ratios['qemu_guest_gbps_over_socket']:6.2f}"
              f"   (wire GB/s / socket: {ratios['qemu_wire_gbps_over_socket']:.2f})", file=out)


# ---------------------------------------------------------------------------
# Driver

def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM/SIGHUP take the same way out as Ctrl-C, through every finally.
    raise KeyboardInterrupt(f"signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="guest RAM size, QEMU suffixes (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="runs; medians are reported (default 3)")
    ap.add_argument("--uri", choices=("unix", "tcp"), default="unix",
                    help="transport: unix socket or tcp on 127.0.0.1 (default unix)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds any single step may take (default 600)")
    ap.add_argument("--no-qemu", action="store_true", help="measure the engine only")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = parse_size(args.size)
    if size <= 0 or size % 4096:
        print(f"bench: --size {args.size}: need a positive multiple of 4096", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("bench: --repeat must be at least 1", file=sys.stderr)
        return 2
    free = shutil.disk_usage(SHM_DIR).free
    if free < SHM_FILES * size:
        print(f"bench: {SHM_DIR} has {free / 2**30:.1f} GiB free, "
              f"{SHM_FILES * size / 2**30:.1f} GiB needed", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    results: dict = {"size_bytes": size, "transport": args.uri, "repeat": args.repeat,
                     "max_bandwidth": MAX_BANDWIDTH, "downtime_limit_ms": DOWNTIME_LIMIT_MS,
                     "image": {"seed": IMAGE_SEED, "mix_zero_text_random": list(MIXED)},
                     "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                              "kernel": platform.release(),
                              "python": platform.python_version(),
                              "numpy": np.__version__,
                              # other work on the host skews every figure
                              "loadavg_at_start": os.getloadavg()},
                     "runs": []}
    if args.no_qemu:
        qemu_ok, why = False, "--no-qemu"
    else:
        qemu_ok, why = qemu_available()
    if qemu_ok:
        results["qemu_version"] = why
        results["qemu_version_short"] = "qemu " + why.split("version", 1)[-1].split()[0]
    else:
        results["qemu_skipped"] = why
        print(f"bench: QEMU skipped: {why}", file=sys.stderr)

    try:
        with Scratch() as scratch:
            image = scratch.shm("image")
            t = time.perf_counter()
            stats = write_mixed_image(image, size, IMAGE_SEED)
            results["image"].update(pages=stats.pages, zero_pages=stats.zero_pages,
                                    text_pages=stats.text_pages,
                                    random_pages=stats.random_pages)
            print(f"image: {image} ({human_size(size)}, {stats.zero_pages} zero / "
                  f"{stats.text_pages} text / {stats.random_pages} random pages, "
                  f"{time.perf_counter() - t:.1f} s)", flush=True)
            # Each side its own copy: neither can disturb the other's input.
            engine_src = scratch.shm("engine-src")
            copy_file(image, engine_src)
            qemu_src = scratch.shm("qemu-src")
            if qemu_ok:
                copy_file(image, qemu_src)
            for run in range(1, args.repeat + 1):
                row: dict = {"engine": run_engine(scratch, image, engine_src, size,
                                                  args.uri, run, args.timeout)}
                if qemu_ok:
                    row["qemu"] = run_qemu(scratch, image, qemu_src, size, args.uri,
                                           run, args.timeout)
                row["socket_gbps"] = socket_limit(scratch, size, args.uri, args.timeout)
                row["memcpy_gbps"] = memcpy_limit(size)
                results["runs"].append(row)
                qemu_part = (f", qemu {row['qemu']['total_time_ms']} ms" if qemu_ok else "")
                print(f"run {run}/{args.repeat}: engine {row['engine']['total_time_ms']} ms"
                      f"{qemu_part}, socket {row['socket_gbps']:.2f} GB/s, "
                      f"memcpy {row['memcpy_gbps']:.2f} GB/s", flush=True)
    except KeyboardInterrupt:
        print("bench: interrupted; cleaned up", file=sys.stderr)
        return 130
    except (EngineError, TimeoutError, OSError) as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        return 1

    results.update(summarise(results))
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
