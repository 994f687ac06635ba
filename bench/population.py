"""What a page of memory costs to bring in on this host: the population model.

A migration's destination writes every page it receives.  What one write
costs depends less on the migration than on the state of the memory:

* ``resident, fault``: the page exists (a tmpfs page written before), but this
  process's mapping has no entry for it yet: the first store takes a page
  fault that only maps it.
* ``resident, populate``: the same, mapped in bulk with ``MADV_POPULATE_WRITE``
  (what ``--prealloc`` and QEMU's ``prealloc=on`` do at start-up).
* ``resident, pwrite``: the same page written through the file (4 KiB
  ``pwrite``), no mapping involved (the engine's multifd receivers without
  prealloc).
* ``fresh, fault``: a page of a new file, first touched by a store: the kernel
  allocates and clears it, and on a virtual machine whose host hands freed
  memory back lazily (free page reporting, balloon) the host must back it
  first.  Measured right after the same amount of memory was freed, and again
  after ``--settle`` seconds, when the host has taken freed memory back.
* ``fresh, populate``: the same pages populated in bulk.

Every figure is the time per 4 KiB page over ``--size`` bytes (median of
``--repeat``), next to a memcpy of the same size between resident buffers, so
a migration's figures can be split into machinery (what a resident
destination costs) and host (what a fresh one adds).  Files are
``/dev/shm/engine-bench-*``, removed on every exit path.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

from common import (RUN_FAILURES, Scratch, check_run_args, check_shm_free,  # noqa: E402
                    exit_through_finally_on_signals, host_info, human_size, median,
                    memcpy_limit, run_failed, write_json)
from engine.options import parse_size  # noqa: E402

PAGE = 4096
_MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _with_mapping(path: Path, size: int, measure) -> float:
    """``measure(array)`` on a fresh shared mapping of ``path`` (created and
    sized if missing); the mapping is gone when this returns."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
        try:
            arr = np.frombuffer(m, np.uint8)
            result = measure(arr)
            del arr
        finally:
            m.close()
    finally:
        os.close(fd)
    return result


def _touch(arr: np.ndarray) -> float:
    t = time.perf_counter()
    arr[::PAGE] = 1                     # one store per page
    return time.perf_counter() - t


def _populate(arr: np.ndarray) -> float:
    t = time.perf_counter()
    if _libc.madvise(arr.ctypes.data, arr.size, _MADV_POPULATE_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE)")
    return time.perf_counter() - t


def _fill(arr: np.ndarray) -> float:
    arr[:] = 7
    return 0.0


def _pwrite(path: Path, size: int) -> float:
    fd = os.open(path, os.O_RDWR)
    try:
        buf = bytes(PAGE)
        t = time.perf_counter()
        for off in range(0, size, PAGE):
            os.pwrite(fd, buf, off)
        return time.perf_counter() - t
    finally:
        os.close(fd)


def one_round(scratch: Scratch, size: int, settle: float) -> dict:
    """Microseconds per page for each case, measured once."""
    path = scratch.shm("population")
    per_page = 1e6 / (size // PAGE)
    out = {}
    # resident: a file written before; a new mapping's first stores, etc.
    scratch.remove(path)
    _with_mapping(path, size, _fill)
    out["resident_fault_us"] = _with_mapping(path, size, _touch) * per_page
    out["resident_populate_us"] = _with_mapping(path, size, _populate) * per_page
    out["resident_pwrite_us"] = _pwrite(path, size) * per_page
    # fresh: a new file, right after as much was freed, then after a pause
    for when, pause in (("now", 0.0), ("settled", settle)):
        for case, measure in (("fault", _touch), ("populate", _populate)):
            scratch.remove(path)
            time.sleep(pause)
            out[f"fresh_{case}_{when}_us"] = _with_mapping(path, size, measure) * per_page
    scratch.remove(path)
    return out


ROWS = [
    ("resident_fault_us", "resident, first store through a new mapping (fault)"),
    ("resident_populate_us", "resident, MADV_POPULATE_WRITE (prealloc)"),
    ("resident_pwrite_us", "resident, 4 KiB pwrite through the file"),
    ("fresh_fault_now_us", "fresh, first store, right after freeing as much"),
    ("fresh_populate_now_us", "fresh, MADV_POPULATE_WRITE, right after freeing"),
    ("fresh_fault_settled_us", "fresh, first store, after --settle s"),
    ("fresh_populate_settled_us", "fresh, MADV_POPULATE_WRITE, after --settle s"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="memory per case (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; medians (default 3)")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds to wait after freeing before the settled cases (default 3)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    size = check_run_args(args, parse_size)
    if size is None:
        return 2
    short = check_shm_free(2 * size, "the population model")
    if short:
        print(f"bench: {short}", file=sys.stderr)
        return 2
    exit_through_finally_on_signals()
    results: dict = {"size_bytes": size, "repeat": args.repeat, "settle_s": args.settle,
                     "host": host_info(), "rounds": []}
    try:
        with Scratch() as scratch:
            for i in range(args.repeat):
                results["rounds"].append(one_round(scratch, size, args.settle))
                print(f"round {i + 1}/{args.repeat}: " + ", ".join(
                    f"{k[:-3]} {v:.2f}" for k, v in results["rounds"][-1].items()), flush=True)
            results["memcpy_gbps"] = memcpy_limit(size)
    except RUN_FAILURES as exc:
        return run_failed(exc)
    med = {k: median(r[k] for r in results["rounds"]) for k, _ in ROWS}
    results["median_us_per_page"] = med
    copy_us = PAGE / (results["memcpy_gbps"] * 1e9) * 1e6
    results["memcpy_us_per_page"] = copy_us
    print(f"\nmemory population on this host, {human_size(size)} per case, "
          f"median of {args.repeat}, us per 4 KiB page")
    for key, text in ROWS:
        print(f"  {med[key]:7.2f}  {text}")
    print(f"  {copy_us:7.2f}  memcpy of a page between resident buffers "
          f"({results['memcpy_gbps']:.1f} GB/s)")
    gib = (1 << 30) // PAGE
    print(f"per GiB: fresh first store {med['fresh_fault_settled_us'] * gib / 1e6:.2f} s "
          f"(settled), resident fault {med['resident_fault_us'] * gib / 1e6:.2f} s, "
          f"resident populate {med['resident_populate_us'] * gib / 1e6:.2f} s")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
