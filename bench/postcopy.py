"""Postcopy fault latency: how long a destination vCPU waits for a missing 4 KiB page.

Every cell migrates a ``--size`` guest whose RAM is the mixed image (50% zero,
40% text, 10% random pages; ``engine.ram.image``) by postcopy from the start
(``postcopy_after=0``: nothing goes before the switch), so the whole of RAM
is still missing on the destination when its vCPUs start.  The vCPUs run the
``random`` workload over all of RAM (``hot_set`` 1.0) at ``--touch-rate``
MiB/s, so most pages they touch are remote faults.  The background stream is
capped by ``max-postcopy-bandwidth`` (``--background-rate``), so it is still
running while the faults are taken: a page can only be missing while the
stream has not finished, and every fault the figures count happened inside
it (each run reports how long the stream ran and how many pages were asked
for).

* source: this process, ``SourceMigration`` over a ``Guest`` mapping the
  image (as ``engine migrate --to`` would run it);
* destination: ``engine incoming`` in a process of its own (its fault handler
  is another), so neither coordinator shares an interpreter with the other.

The figures are the destination's (``query-migrate`` in its ``--json``
report, the destination having QEMU's ``postcopy-blocktime`` capability):
``x-postcopy-latency-p50`` / ``-p99`` (the engine's own) and
``postcopy-latency`` (mean, ns), which the fault handler measures from
reading a fault to waking the vCPU; ``postcopy-blocktime`` and
``postcopy-vcpu-blocktime`` (ms) and
``ram.postcopy-requests`` (pages asked for on the return path: the remote
faults).  The kernel's delivery of the fault to the handler and the vCPU's
resumption after the wake are outside that interval.

Cells: ``postcopy-preempt`` off and on, for each fault mode (``--faults``)
and vCPU count (``--vcpus``).  The baseline, measured in every repeat: this
machine's round trip between two processes over the same kind of socket, a
small request answered by 4 KiB (the shape of a remote fault), median and
99th percentile; the table divides the engine's latency by it.  Target (the
issue's): median at most 200 us with preempt.

Figures are medians over ``--repeat``.  Files are ``/dev/shm/engine-bench-*``
and a ``/tmp/engine-bench-*`` directory, removed on every exit path with every
process this starts (Ctrl-C and SIGTERM included).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

from common import (CHILD_CONNECT, IMAGE_SEED, REPO, BenchError, ManagedProcess, Scratch,  # noqa: E402
                    RUN_FAILURES,
                    check_run_args, check_shm_free, engine_uri,
                    exit_through_finally_on_signals, host_info, human_size, make_image,
                    median, read_report, stop_process, wait_listening, write_json, run_failed)
from engine.errors import EngineError  # noqa: E402
from engine.options import parse_size  # noqa: E402
from engine.ram.image import MIXED  # noqa: E402

#: the fault modes a cell can use (``auto`` resolves to one of them)
FAULT_MODES = ("userfaultfd", "software")
#: the issue's target: median fault latency with preempt, microseconds
TARGET_MEDIAN_US = 200.0
#: background streams shorter than this (s) leave too few faults to trust
SHORT_BACKGROUND_S = 0.5
#: machine profile and downtime limit both sides use
MACHINE = "engine"
DOWNTIME_LIMIT_MS = 300
#: /dev/shm files alive at once: the image (the source's RAM) and the
#: destination's RAM (the engine's own segment)
SHM_FILES = 2
#: round trips of the socket baseline, after WARMUP unmeasured ones
RTT_COUNT = 5000
RTT_WARMUP = 200
#: the baseline's request (about a REQ_PAGES_ID) and reply (a page and header)
RTT_REQUEST = 32
RTT_REPLY = 4096 + 16
#: seconds the destination gets to stop by itself on SIGINT before SIGTERM
STOP_GRACE = 10.0


def cell_key(faults: str, vcpus: int, preempt: bool) -> str:
    return f"{'uffd' if faults == 'userfaultfd' else 'soft'}-{vcpus}vcpu-" \
           f"{'preempt' if preempt else 'plain'}"


# ---------------------------------------------------------------------------
# Baseline: a request/reply round trip between two processes

_ECHO = CHILD_CONNECT + r"""
family, address, req, reply = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = connect(family, address)
buf = bytearray(req)
view = memoryview(buf)
out = bytes(b"\x5a") * reply
while True:
    got = 0
    while got < req:
        n = s.recv_into(view[got:])
        if not n:
            sys.exit(0)
        got += n
    s.sendall(out)
"""


def rtt_baseline(scratch: Scratch, transport: str, timeout: float,
                 count: int = RTT_COUNT) -> dict:
    """Round trips (us) of a ``RTT_REQUEST``-byte request answered by
    ``RTT_REPLY`` bytes, between this process and a child, over a unix or
    tcp (``TCP_NODELAY``, 127.0.0.1) stream socket; both ends block in recv."""
    if transport == "unix":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = str(scratch.dir / "rtt.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
        listener.bind(address)
    else:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % listener.getsockname()[1]
    child = conn = None
    try:
        listener.listen(1)
        listener.settimeout(timeout)
        child = subprocess.Popen([sys.executable, "-c", _ECHO, transport, address,
                                  str(RTT_REQUEST), str(RTT_REPLY)],
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        conn, _ = listener.accept()
        if transport != "unix":
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(timeout)
        request = bytes(RTT_REQUEST)
        reply = bytearray(RTT_REPLY)
        view = memoryview(reply)
        samples = np.empty(count, dtype=np.int64)
        clock = time.perf_counter_ns
        for i in range(-RTT_WARMUP, count):
            t0 = clock()
            conn.sendall(request)
            got = 0
            while got < RTT_REPLY:
                n = conn.recv_into(view[got:])
                if not n:
                    raise BenchError("socket baseline: the echo process went away")
                got += n
            if i >= 0:
                samples[i] = clock() - t0
        us = samples / 1000
        return {"median_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99)),
                "mean_us": float(us.mean()), "count": count}
    finally:
        if conn is not None:
            conn.close()
        listener.close()
        if child is not None:
            stop_process(child, group=True)


# ---------------------------------------------------------------------------
# One postcopy migration

def _stop_destination(dst: ManagedProcess) -> None:
    """SIGINT first: ``engine incoming`` then closes its guest, reaps its
    vCPUs and unlinks its segments (SIGTERM would leave that undone)."""
    if dst.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            dst.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            dst.proc.wait(STOP_GRACE)
    dst.close()


def _run_source(src, channel, uri: str, dst: ManagedProcess, timeout: float):
    """``src.run`` in a thread, given up on if it stalls.

    A postcopy whose destination died waits in ``postcopy-paused`` for a
    recovery that will not come (and cannot be cancelled): the thread is then
    left behind (a daemon, blocked on an event) and the cell fails.
    """
    from engine.state import MigrationStatus as S
    done: dict = {}

    def body() -> None:
        try:
            done["info"] = src.run(channel, uri)
        except BaseException as exc:        # re-raised in the caller
            done["error"] = exc

    thread = threading.Thread(target=body, name="bench-source", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive():
        thread.join(0.05)
        status = src.state.status
        if status is S.POSTCOPY_PAUSED:
            raise BenchError(f"source in postcopy-paused: {src.pause_error}\n"
                             + dst.describe())
        if time.monotonic() > deadline:
            raise BenchError(f"source still {status.value} after {timeout:g} s\n"
                             + dst.describe())
    if "error" in done:
        raise done["error"]
    return done["info"]


def _time_in(history, status) -> float | None:
    """When the migration first entered ``status`` (monotonic s), if it did."""
    for t, s in history:
        if s is status:
            return t
    return None


def run_cell(scratch: Scratch, image: Path, size: int, args, faults: str, vcpus: int,
             preempt: bool, name: str) -> dict:
    """One postcopy migration of the image; the destination's fault figures.

    Raises :class:`BenchError` if either side did not complete or no page was
    asked for (then nothing was measured).
    """
    from engine.library import make_options
    from engine.machine import get_profile
    from engine.migration.source import SourceMigration
    from engine.ram.guest import Guest
    from engine.ram.workloads import REG_PAGES, WorkloadSpec
    from engine.state import MigrationStatus as S
    from engine.transport import connect

    scratch.check(image)
    profile = get_profile(MACHINE)
    caps = {"postcopy-ram": True, "postcopy-preempt": preempt}
    params = {"max-postcopy-bandwidth": args.background_rate,
              "downtime-limit": DOWNTIME_LIMIT_MS}
    options = make_options(caps, params)
    workload = ["--workload", "random", "--dirty-rate", f"{args.touch_rate:g}",
                "--hot-set", "1.0"]
    dst_json = scratch.dir / f"{name}-incoming.json"
    cmd = [sys.executable, "-m", "engine", "incoming", engine_uri(scratch, args.uri, name),
           "--machine", MACHINE, "--ram", str(size), "--vcpus", str(vcpus), *workload,
           "--cap", "postcopy-ram=on", "--cap", f"postcopy-preempt={'on' if preempt else 'off'}",
           "--cap", "postcopy-blocktime=on",     # QEMU's fault figures in the report
           "--param", f"downtime-limit={DOWNTIME_LIMIT_MS}",
           "--postcopy-faults", faults, "--quiet", "--json", str(dst_json),
           "--timeout", str(args.timeout)]
    guest = None
    dst = ManagedProcess(cmd, scratch.dir, f"{name}-incoming", cwd=REPO)
    try:
        uri = wait_listening(dst, args.timeout)
        spec = WorkloadSpec("random", dirty_rate_mbps=args.touch_rate, hot_set=1.0)
        guest = Guest.create([(profile.default_ram_id, size, str(image))], vcpus=vcpus,
                             workload=spec, start=True)
        src = SourceMigration(guest, profile, options, vcpus=vcpus, postcopy_after=0)
        with connect(uri) as channel:
            info = _run_source(src, channel, uri, dst, args.timeout)
        rc = dst.wait(args.timeout)
        history = src.state.history
        src_pages = [int(p) for p in guest.registers[:, REG_PAGES]]
        if info.status != "completed":
            raise BenchError(f"source {info.status}: {info.error_desc}\n{dst.describe()}")
        if rc != 0:
            raise BenchError(f"engine incoming exited {rc}\n{dst.describe()}")
        report = read_report(dst_json, dst)
    finally:
        if guest is not None:
            guest.close()
        _stop_destination(dst)
    d = report["migration"]
    if d.get("status") != "completed":
        raise BenchError(f"destination {d.get('status')}: {d.get('error-desc')}")
    seen = [s for _, s in history]
    if S.POSTCOPY_ACTIVE not in seen:
        raise BenchError(f"the migration never reached postcopy-active: {seen}")
    t_switch = _time_in(history, S.POSTCOPY_DEVICE) or _time_in(history, S.POSTCOPY_ACTIVE)
    t_done = _time_in(history, S.COMPLETED)
    s_ram = info.to_qmp().get("ram") or {}
    d_ram = d.get("ram") or {}
    requests = int(d_ram.get("postcopy-requests", 0))
    if requests == 0:
        raise BenchError("the destination asked for no page: nothing was measured "
                         "(raise --touch-rate or lower --background-rate)")
    background = t_done - t_switch
    return {
        "faults_mode": d.get("x-postcopy-faults"),
        "latency_p50_us": d["x-postcopy-latency-p50"] / 1000,
        "latency_p99_us": d["x-postcopy-latency-p99"] / 1000,
        "latency_mean_us": d["postcopy-latency"] / 1000,
        "blocktime_ms": d.get("postcopy-blocktime"),
        "vcpu_blocktime_ms": d.get("postcopy-vcpu-blocktime"),
        "requests": requests,
        "source_requests": int(s_ram.get("postcopy-requests", 0)),
        "background_s": background,
        "requests_per_s": requests / background if background > 0 else None,
        "postcopy_bytes": int(s_ram.get("postcopy-bytes", 0)),
        "background_mbps": int(s_ram.get("postcopy-bytes", 0)) / background / 2**20
        if background > 0 else None,
        "total_time_ms": info.total_time,
        "source_vcpu_pages": src_pages,
    }


# ---------------------------------------------------------------------------
# Summary

FIGURES = ("latency_p50_us", "latency_p99_us", "latency_mean_us", "blocktime_ms",
           "requests", "source_requests", "background_s", "requests_per_s",
           "background_mbps")


def summarise(results: dict) -> dict:
    """Per cell: medians over the repeats, ratios to the baseline, the target."""
    reps = results["repeats"]
    rtt = {k: median(r["rtt"][k] for r in reps) for k in ("median_us", "p99_us", "mean_us")}
    cells = []
    for c in results["cells"]:
        key = cell_key(c["faults"], c["vcpus"], c["preempt"])
        runs = [r["cells"][key] for r in reps if key in r["cells"]]
        ok = [x for x in runs if "error" not in x]
        cell = dict(c, key=key, runs=len(ok))
        errors = [x["error"] for x in runs if "error" in x]
        if errors:
            cell["errors"] = errors
        if ok:
            cell.update({k: median(x[k] for x in ok) for k in FIGURES})
            cell["short_background"] = cell["background_s"] < SHORT_BACKGROUND_S
            cell["p50_over_rtt"] = cell["latency_p50_us"] / rtt["median_us"]
            cell["p99_over_rtt"] = cell["latency_p99_us"] / rtt["p99_us"]
        if c["preempt"]:
            cell["target_median_us"] = TARGET_MEDIAN_US
            cell["target_met"] = (cell["latency_p50_us"] <= TARGET_MEDIAN_US) if ok else None
        cells.append(cell)
    return {"rtt": rtt, "cells": cells}


def print_table(results: dict, out=sys.stdout) -> None:
    s = results["summary"]
    host = results["host"]
    print(f"\npostcopy fault latency, {human_size(results['size_bytes'])} mixed image "
          f"({'/'.join(f'{int(p * 100)}' for p in MIXED)}% zero/text/random pages), "
          f"{results['transport']} socket, postcopy from the start, background capped at "
          f"{human_size(results['background_rate'])}/s, vCPUs touching "
          f"{results['touch_rate']:g} MiB/s of random pages; median of {results['repeat']}",
          file=out)
    print(f"host: {host['cpus']} CPUs, load average {host['loadavg_at_start'][0]:.2f} at "
          f"start, {results['loadavg_at_end'][0]:.2f} at end", file=out)
    rtt = s["rtt"]
    print(f"baseline: {results['transport']} round trip between two processes "
          f"({RTT_REQUEST} B request, {RTT_REPLY} B reply): median {rtt['median_us']:.1f} us, "
          f"p99 {rtt['p99_us']:.1f} us, mean {rtt['mean_us']:.1f} us", file=out)
    print(f"{'cell':<20}{'median':>8}{'p99':>9}{'mean':>9}{'med/':>7}{'p99/':>7}"
          f"{'faults':>8}{'block':>8}{'backgr.':>9}{'target':>8}", file=out)
    print(f"{'':<20}{'us':>8}{'us':>9}{'us':>9}{'rtt':>7}{'rtt':>7}"
          f"{'(req.)':>8}{'ms':>8}{'s':>9}{'<=200us':>8}", file=out)
    for c in s["cells"]:
        if not c["runs"]:
            print(f"{c['key']:<20}  FAILED: {c['errors'][0]}", file=out)
            continue
        met = {True: "yes", False: "NO", None: "?"}[c["target_met"]] if c["preempt"] else ""
        short = "*" if c["short_background"] else ""
        print(f"{c['key']:<20}{c['latency_p50_us']:>8.0f}{c['latency_p99_us']:>9.0f}"
              f"{c['latency_mean_us']:>9.0f}{c['p50_over_rtt']:>7.1f}{c['p99_over_rtt']:>7.1f}"
              f"{c['requests']:>8.0f}{c['blocktime_ms']:>8.0f}"
              f"{c['background_s']:>8.2f}{short:1}{met:>8}", file=out)
    if any(c.get("short_background") for c in s["cells"] if c["runs"]):
        print(f"* background shorter than {SHORT_BACKGROUND_S} s: few faults; raise --size "
              f"or lower --background-rate", file=out)
    print("faults (req.): pages the destination asked for (remote faults); block: "
          "postcopy-blocktime (all vCPUs blocked at once)", file=out)
    for c in s["cells"]:
        for err in c.get("errors", ()):
            print(f"{c['key']} failed: {err}", file=out)


# ---------------------------------------------------------------------------
# Driver

def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"vCPU counts are >= 1: {text}")
    return values


def _rate(text: str) -> int:
    try:
        value = parse_size(text)
    except (EngineError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text} ({exc})")
    if value <= 0:
        raise argparse.ArgumentTypeError("the background rate must be positive (a cap)")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="guest RAM size, QEMU suffixes (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="runs; medians are reported (default 3)")
    ap.add_argument("--uri", choices=("unix", "tcp"), default="unix",
                    help="transport: unix socket or tcp on 127.0.0.1 (default unix)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds any single step may take (default 600)")
    ap.add_argument("--faults", choices=("auto", *FAULT_MODES, "all"), default="auto",
                    help="destination fault mode(s): auto (userfaultfd where the host has "
                         "it, else software), userfaultfd, software, all (default auto)")
    ap.add_argument("--vcpus", type=_int_list, default=[1],
                    help="comma-separated destination vCPU counts (default 1)")
    ap.add_argument("--background-rate", type=_rate, default=256 << 20, metavar="BYTES",
                    help="max-postcopy-bandwidth in bytes/s, QEMU suffixes (default 256M)")
    ap.add_argument("--touch-rate", type=float, default=8.0, metavar="MIB_S",
                    help="MiB/s of random pages the destination's vCPUs write, all of "
                         "them together (default 8)")
    return ap


def fault_modes(choice: str) -> tuple[list[str], str | None]:
    """The modes to measure, and why userfaultfd is left out (if it is)."""
    from engine import uffd
    ok, why = uffd.probe()
    if choice == "software":
        return ["software"], None
    if choice == "userfaultfd":
        if not ok:
            raise BenchError(f"userfaultfd is not available here: {why}")
        return ["userfaultfd"], None
    if choice == "all":
        return (list(FAULT_MODES), None) if ok else (["software"], why)
    return (["userfaultfd"], None) if ok else (["software"], why)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = check_run_args(args, parse_size)
    if size is None:
        return 2
    if not args.touch_rate > 0:
        print("bench: --touch-rate must be positive", file=sys.stderr)
        return 2
    short = check_shm_free(SHM_FILES * size, "the benchmark")
    if short:
        print(f"bench: {short}", file=sys.stderr)
        return 2
    try:
        modes, no_uffd = fault_modes(args.faults)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if no_uffd:
        print(f"bench: userfaultfd skipped: {no_uffd}", file=sys.stderr)
    exit_through_finally_on_signals()

    cells = [{"faults": f, "vcpus": n, "preempt": p}
             for f in modes for n in args.vcpus for p in (False, True)]
    results: dict = {"size_bytes": size, "transport": args.uri, "repeat": args.repeat,
                     "background_rate": args.background_rate, "touch_rate": args.touch_rate,
                     "downtime_limit_ms": DOWNTIME_LIMIT_MS, "machine": MACHINE,
                     "image": {"seed": IMAGE_SEED, "mix_zero_text_random": list(MIXED)},
                     "rtt_request_bytes": RTT_REQUEST, "rtt_reply_bytes": RTT_REPLY,
                     "userfaultfd_skipped": no_uffd, "cells": cells,
                     "host": host_info(), "repeats": []}
    try:
        with Scratch() as scratch:
            image = make_image(scratch, size, results["image"])
            for rep in range(1, args.repeat + 1):
                row: dict = {"rtt": rtt_baseline(scratch, args.uri, args.timeout),
                             "cells": {}, "loadavg": list(os.getloadavg())}
                print(f"repeat {rep}/{args.repeat}: load {row['loadavg'][0]:.2f}, "
                      f"round trip median {row['rtt']['median_us']:.1f} us, "
                      f"p99 {row['rtt']['p99_us']:.1f} us", flush=True)
                # Which of preempt off/on goes first alternates between repeats.
                order = cells if rep % 2 else [c for pair in zip(cells[1::2], cells[0::2])
                                               for c in pair]
                for c in order:
                    key = cell_key(c["faults"], c["vcpus"], c["preempt"])
                    try:
                        fig = run_cell(scratch, image, size, args, c["faults"], c["vcpus"],
                                       c["preempt"], f"{key}-{rep}")
                        print(f"  {key:<20} median {fig['latency_p50_us']:.0f} us, "
                              f"p99 {fig['latency_p99_us']:.0f} us, "
                              f"{fig['requests']} requests in {fig['background_s']:.2f} s "
                              f"of background", flush=True)
                    except (EngineError, TimeoutError, OSError) as exc:
                        fig = {"error": str(exc).splitlines()[0][:300]}
                        print(f"  {key:<20} FAILED: {fig['error']}", file=sys.stderr,
                              flush=True)
                    row["cells"][key] = fig
                results["repeats"].append(row)
    except RUN_FAILURES as exc:
        return run_failed(exc)

    results["loadavg_at_end"] = list(os.getloadavg())
    results["summary"] = summarise(results)
    print_table(results)
    write_json(args.json, results)
    failed = any(c.get("errors") for c in results["summary"]["cells"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
