"""Coordinator memory during a big multifd migration: does it stay under 100 MB?

With multifd the worker processes move guest pages from shared memory to
shared memory; the coordinators only hand out page indexes.  So a
coordinator's resident set should not grow with the guest.  This migrates a
``--size`` (default 8 GiB) paused guest, file-backed in /dev/shm, mostly zero
with ``--data-fraction`` of its pages holding text-like and random data,
from ``engine migrate --to`` to a local ``engine incoming`` (``--machine
none --vcpus 0 --workload none``, capability ``multifd``, ``--channels``
channels, ``--codec``), and samples every ``--interval`` seconds, with psutil:

* each coordinator's RSS (psutil ``memory_info().rss``; the maximum over the
  samples), beside the kernel's own peak (``VmHWM`` in /proc/PID/status, which
  misses nothing between samples) and the largest ``RssAnon`` (its heap),
  ``RssFile`` (mapped libraries) and ``RssShmem`` (guest memory it touched);
* each child process's USS and PSS (psutil ``memory_full_info``, every
  ``--child-interval`` s, as it walks the page tables), with its ``RssAnon``
  and ``RssShmem``.  A worker's USS and PSS include the guest pages only it
  has touched (shared memory mapped by one process counts as private), so its
  own heap is ``RssAnon``.

The verdict compares each coordinator's peak (VmHWM, the larger of the two
measures) with ``--limit`` MB (10**6 bytes).  The destination's RAM must equal
the source's afterwards (read in 64 MiB chunks; holes cost nothing).

Needs 2 x ``--size`` free in /dev/shm and as much available RAM (each guest's
file is fully reserved, as the engine does for every file-backed block).
Both files are ``/dev/shm/engine-bench-*``, removed with every process this
starts on every exit path, Ctrl-C and SIGTERM included.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

from common import (RUN_FAILURES, MAX_BANDWIDTH, REPO, BenchError, ManagedProcess,  # noqa: E402
                    Scratch, check_shm_free, engine_option_args, engine_uri,
                    exit_through_finally_on_signals, first_difference, host_info,
                    human_size, read_report, wait_listening, write_json, run_failed)
from engine.options import parse_size  # noqa: E402
from engine.ram.image import PAGE_SIZE, fill_mixed  # noqa: E402

#: the mix of the data pages: text-like and random, no zero pages
DATA_MIX = (0.0, 0.8, 0.2)
SEED = 20240502
#: /dev/shm beyond the two guests: the engine's own segments, headroom
SHM_MARGIN = 1 << 30
MB = 10**6
_STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


# ---------------------------------------------------------------------------
# The image

def write_sparse_image(path: Path, size: int, fraction: float, seed: int) -> int:
    """A ``size``-byte file, zero but for ``fraction`` of its pages; their count.

    The zero part is a hole (nothing allocated); data pages are spread at
    random over the whole file.
    """
    npages = size // PAGE_SIZE
    rng = np.random.default_rng(seed)
    count = min(npages, max(1, int(npages * fraction))) if fraction > 0 else 0
    where = np.sort(rng.choice(npages, size=count, replace=False)) if count else []
    with open(path, "wb") as f:
        f.truncate(size)
    if count:
        mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(npages, PAGE_SIZE))
        try:
            for start in range(0, count, 16384):  # 64 MiB of data at a time
                part = where[start:start + 16384]
                data = np.empty((len(part), PAGE_SIZE), np.uint8)
                fill_mixed(data, seed + start, DATA_MIX)
                mm[part] = data
            mm.flush()
        finally:
            del mm
    return count


# ---------------------------------------------------------------------------
# Sampling

def _status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/PID/status, in bytes (``{}`` once it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in _STATUS_FIELDS:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _kind(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "?"
    if "resource_tracker" in cmd:
        return "resource tracker"
    if "spawn_main" in cmd:
        return "spawned child"  # with --vcpus 0 these are the multifd workers
    return cmd[:60]


class TreeSampler:
    """Samples one coordinator and its descendants until stopped or gone.

    ``peak`` holds the coordinator's largest value of each measure (bytes);
    ``children`` each descendant's largest USS, PSS, RSS, RssAnon, RssShmem.
    """

    def __init__(self, pid: int, interval: float, child_interval: float):
        self.pid = pid
        self.interval, self.child_interval = interval, child_interval
        self.peak: dict[str, int] = {}
        self.samples = 0
        self.timeline: list[tuple[float, int]] = []    # (s since start, psutil rss)
        self.children: dict[int, dict] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        try:
            self._proc = psutil.Process(pid)
        except psutil.Error as exc:
            self._proc = None
            self.errors.append(f"pid {pid}: {exc}")
        # Reading a child's smaps walks its page tables (slow for a worker
        # that maps the whole guest), so children have a thread of their own
        # and never delay the coordinator's samples.
        self._threads = [threading.Thread(target=loop, daemon=True, name=f"rss-{pid}")
                         for loop in (self._coordinator_loop, self._children_loop)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _gone(self) -> bool:
        try:
            return self._proc is None or self._proc.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def _coordinator_loop(self) -> None:
        while not self._stop.is_set() and not self._gone():
            try:
                rss = self._proc.memory_info().rss
            except psutil.Error:
                return
            for key, value in (("psutil_rss", rss), *_status(self.pid).items()):
                if value > self.peak.get(key, -1):
                    self.peak[key] = value
            self.samples += 1
            self.timeline.append((round(time.monotonic() - self._t0, 3), rss))
            self._stop.wait(self.interval)

    def _children_loop(self) -> None:
        while not self._stop.is_set() and not self._gone():
            self._sample_children(self._proc)
            self._stop.wait(self.child_interval)

    def _sample_children(self, proc: psutil.Process) -> None:
        try:
            kids = proc.children(recursive=True)
        except psutil.Error:
            return
        for kid in kids:
            try:
                full = kid.memory_full_info()
            except psutil.Error:
                continue
            status = _status(kid.pid)
            rec = self.children.setdefault(kid.pid, {"kind": _kind(kid), "samples": 0})
            rec["samples"] += 1
            for key, value in (("uss", full.uss), ("pss", full.pss), ("rss", full.rss),
                               ("RssAnon", status.get("RssAnon", 0)),
                               ("RssShmem", status.get("RssShmem", 0))):
                rec[key] = max(rec.get(key, 0), value)


# ---------------------------------------------------------------------------
# The run

def run(scratch: Scratch, args, size: int) -> dict:
    src_ram, dst_ram = scratch.shm("rss-src"), scratch.shm("rss-dst")
    t = time.perf_counter()
    data_pages = write_sparse_image(src_ram, size, args.data_fraction, SEED)
    scratch.hold(src_ram)
    print(f"image: {src_ram} ({human_size(size)}, {data_pages} data pages, the rest zero, "
          f"{time.perf_counter() - t:.1f} s)", flush=True)
    caps = {"multifd": True}
    params = {"multifd-channels": args.channels, "multifd-compression": args.codec,
              "zero-page-detection": args.zero_page_detection,
              "max-bandwidth": MAX_BANDWIDTH}
    options = engine_option_args(caps, params)
    engine = [sys.executable, "-m", "engine"]
    guest = ["--machine", "none", "--ram", str(size), "--vcpus", "0", "--workload", "none"]
    dst_json, src_json = scratch.dir / "incoming.json", scratch.dir / "migrate.json"
    samplers: dict[str, TreeSampler] = {}
    try:
        with ManagedProcess([*engine, "incoming", engine_uri(scratch, args.uri, "rss"),
                             *guest, "--mem-path", dst_ram, *options, "--quiet",
                             "--json", dst_json, "--timeout", str(args.timeout)],
                            scratch.dir, "incoming", cwd=REPO) as dst:
            samplers["destination"] = TreeSampler(dst.pid, args.interval,
                                                  args.child_interval)
            uri = wait_listening(dst, args.timeout)
            scratch.hold(dst_ram)
            start = time.perf_counter()
            with ManagedProcess([*engine, "migrate", "--to", uri, *guest,
                                 "--mem-path", src_ram, *options, "--quiet",
                                 "--json", src_json],
                                scratch.dir, "migrate", cwd=REPO) as src:
                samplers["source"] = TreeSampler(src.pid, args.interval,
                                                 args.child_interval)
                rc = src.wait(args.timeout)
                wall = time.perf_counter() - start
                if rc != 0:
                    raise BenchError(f"engine migrate exited {rc}\n{src.describe()}\n"
                                     + dst.describe())
                info = read_report(src_json, src)["migration"]
            drc = dst.wait(args.timeout)
            if drc != 0:
                raise BenchError(f"engine incoming exited {drc}\n{dst.describe()}")
            dst_info = read_report(dst_json, dst)["migration"]
    finally:
        for sampler in samplers.values():
            sampler.stop()
    if info.get("status") != "completed" or dst_info.get("status") != "completed":
        raise BenchError(f"migration not completed: source {info.get('status')}, "
                         f"destination {dst_info.get('status')}: {info.get('error-desc')}")
    if not (info.get("ram") or {}).get("multifd-bytes"):
        raise BenchError("no multifd bytes reported: the pages did not use multifd")
    t = time.perf_counter()
    diff = first_difference(src_ram, dst_ram)
    if diff:
        raise BenchError(f"destination RAM is not the source's: {diff}")
    print(f"destination RAM equals the source ({time.perf_counter() - t:.1f} s to compare)",
          flush=True)
    ram = info.get("ram") or {}
    out: dict = {"data_pages": data_pages, "wall_s": wall,
                 "total_time_ms": info.get("total-time"),
                 "normal_pages": ram.get("normal"), "zero_pages": ram.get("duplicate"),
                 "multifd_bytes": ram.get("multifd-bytes"),
                 "transferred_bytes": ram.get("transferred"), "memory_equal": True}
    for role, sampler in samplers.items():
        peak = max(sampler.peak.get("VmHWM", 0), sampler.peak.get("psutil_rss", 0))
        out[role] = {"pid": sampler.pid, "samples": sampler.samples,
                     "peak": sampler.peak, "peak_rss_bytes": peak,
                     "under_limit": peak < args.limit * MB,
                     "children": [dict(pid=pid, **rec) for pid, rec in
                                  sorted(sampler.children.items())],
                     "errors": sampler.errors, "timeline": sampler.timeline}
    return out


def print_report(results: dict, out=sys.stdout) -> None:
    r = results["run"]
    print(f"\ncoordinator RSS, {human_size(results['size_bytes'])} guest "
          f"({r['data_pages']} data pages, rest zero), multifd {results['channels']} "
          f"channels, compression {results['codec']}, zero-page-detection "
          f"{results['zero_page_detection']}, {results['transport']} socket", file=out)
    print(f"migration: total-time {r['total_time_ms']} ms (engine migrate: {r['wall_s']:.1f} s "
          f"wall), {r['normal_pages']} normal / "
          f"{r['zero_pages']} zero pages, destination RAM equal: {r['memory_equal']}; "
          f"load average {results['host']['loadavg_at_start'][0]:.2f} at start", file=out)
    print(f"{'MB (10^6 B)':<14}{'peak':>8}{'VmHWM':>8}{'sampled':>9}{'RssAnon':>9}"
          f"{'RssFile':>9}{'RssShmem':>9}{'samples':>9}  < {results['limit_mb']} MB?",
          file=out)
    for role in ("source", "destination"):
        c = r[role]
        p = c["peak"]
        print(f"{role + ' coord.':<14}{c['peak_rss_bytes'] / MB:>8.1f}"
              f"{p.get('VmHWM', 0) / MB:>8.1f}{p.get('psutil_rss', 0) / MB:>9.1f}"
              f"{p.get('RssAnon', 0) / MB:>9.1f}{p.get('RssFile', 0) / MB:>9.1f}"
              f"{p.get('RssShmem', 0) / MB:>9.1f}{c['samples']:>9}  "
              f"{'yes' if c['under_limit'] else 'NO'}", file=out)
    print(f"\n{'children, MB':<36}{'USS':>9}{'PSS':>9}{'RSS':>9}{'RssAnon':>9}"
          f"{'RssShmem':>9}", file=out)
    for role in ("source", "destination"):
        for k in r[role]["children"]:
            label = f"{role} {k['kind']} {k['pid']}"
            print(f"{label:<36}{k.get('uss', 0) / MB:>9.1f}{k.get('pss', 0) / MB:>9.1f}"
                  f"{k.get('rss', 0) / MB:>9.1f}{k.get('RssAnon', 0) / MB:>9.1f}"
                  f"{k.get('RssShmem', 0) / MB:>9.1f}", file=out)
    print("(children's USS/PSS include the guest pages each one touched; "
          "RssAnon is its own heap)", file=out)


# ---------------------------------------------------------------------------
# Driver

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8G", help="guest RAM size (default 8G)")
    ap.add_argument("--channels", type=int, default=2, help="multifd channels (default 2)")
    ap.add_argument("--codec", choices=("none", "zlib", "zstd"), default="none",
                    help="multifd-compression (default none)")
    ap.add_argument("--zero-page-detection", choices=("multifd", "legacy", "none"),
                    default="multifd", help="(default multifd)")
    ap.add_argument("--data-fraction", type=float, default=0.01,
                    help="fraction of pages holding data (default 0.01)")
    ap.add_argument("--uri", choices=("unix", "tcp"), default="unix")
    ap.add_argument("--limit", type=float, default=100.0, help="MB (default 100)")
    ap.add_argument("--interval", type=float, default=0.02,
                    help="seconds between coordinator samples (default 0.02)")
    ap.add_argument("--child-interval", type=float, default=0.5,
                    help="seconds between USS/PSS samples of the children (default 0.5)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds any single step may take (default 900)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = parse_size(args.size)
    if size <= 0 or size % PAGE_SIZE:
        print(f"bench: --size {args.size}: need a positive multiple of {PAGE_SIZE}",
              file=sys.stderr)
        return 2
    if not 0 <= args.data_fraction <= 1 or args.channels < 1:
        print("bench: need 0 <= --data-fraction <= 1 and --channels >= 1", file=sys.stderr)
        return 2
    short = check_shm_free(2 * size + SHM_MARGIN, f"a {human_size(size)} source and "
                           "destination")
    if short:
        print(f"bench: {short}", file=sys.stderr)
        return 2
    exit_through_finally_on_signals()
    results: dict = {"size_bytes": size, "channels": args.channels, "codec": args.codec,
                     "zero_page_detection": args.zero_page_detection,
                     "transport": args.uri, "limit_mb": args.limit,
                     "data_fraction": args.data_fraction, "host": host_info()}
    try:
        with Scratch() as scratch:
            results["run"] = run(scratch, args, size)
    except RUN_FAILURES as exc:
        return run_failed(exc)
    print_report(results)
    write_json(args.json, results)
    r = results["run"]
    return 0 if r["source"]["under_limit"] and r["destination"]["under_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())
