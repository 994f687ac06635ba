"""Precopy throughput: the engine and QEMU moving the same guest RAM image.

One run migrates one mixed image (50% zero, 40% text, 10% random pages;
``engine.ram.image``) of ``--size`` bytes, paused (no vCPU writes it), over one
channel on this host, with the same settings on both sides: no capabilities,
``max-bandwidth`` 1 TiB/s (a cap nothing reaches, so in effect unlimited; 0 is
avoided because its meaning has changed between QEMU versions) and
``downtime-limit`` 300 ms.  Each cell is a destination mode (``--mode``) and a
transport (``--uri``):

* ``resident``: both destinations' RAM file is filled before the clock and
  each program maps it populated (QEMU ``prealloc=on``, engine ``--prealloc``):
  what is measured is the migration machinery.  The default.
* ``fresh``: no destination file; each program creates its RAM and pays for
  every page it touches during the migration (QEMU without prealloc, the
  engine without ``--prealloc``).  On a host that reclaims freed memory
  lazily (see bench/README.md, "Memory population") that cost is large and
  varies from run to run.

* engine: ``engine incoming URI --machine none --vcpus 0 --mem-path DST`` and
  ``engine migrate --to URI --machine none --vcpus 0 --mem-path SRC``, two
  fresh processes (QEMU's ``-M none`` has no vCPUs either).  Time is the
  source's ``query-migrate`` ``total-time``, CPU the ``x-cpu-time`` both sides
  report (coordinators and workers, during the migration).
* QEMU (when ``qemu-system-x86_64`` is installed): two ``-M none`` VMs whose
  RAM is a ``memory-backend-file,share=on`` (``tests/qemu.py``), the
  destination listening through ``migrate-incoming``.  Time is the source's
  ``total-time``, CPU both processes' user+system time from ``migrate`` until
  both reported ``completed``.
* This machine's limits, measured in the same run: one process pair moving
  ``--size`` bytes over the same kind of socket in 1 MiB ``send``/``recv_into``
  calls, and a numpy copy of a ``--size`` array (memcpy).
* Start-up and teardown of the command line, once per run: ``engine migrate
  --no-verify`` of an engine-made guest of ``--size`` to a local destination
  (its wall time minus its total-time), and how long ``engine incoming``
  takes to listen.

Each side gets its own copy of the image; after every migration the
destination's RAM is compared with the image and a difference fails the
benchmark.  Which side goes first alternates between repeats; figures are
medians over ``--repeat`` runs.  Units: MB = 10**6 bytes, GB/s = 10**9
bytes/s, CPU in seconds per GiB of guest RAM.

Everything is bounded by ``--timeout`` and cleaned up on every path (Ctrl-C and
SIGTERM included): child processes are stopped and reaped, and the
``/dev/shm/engine-bench-*`` files and the scratch directory are removed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

from common import (MODES, RUN_FAILURES, DOWNTIME_LIMIT_MS, IMAGE_SEED,  # noqa: E402
                    MAX_BANDWIDTH, REPO, BenchError, ManagedProcess, Scratch, add_run_args,
                    check_run_args, check_shm_free, compare_cell, copy_file,
                    exit_through_finally_on_signals, host_info, human_size, make_image,
                    median, memcpy_limit, print_cells, qemu_status, read_report, run_engine,
                    run_qemu, socket_limit, wait_listening, write_json, run_failed)
from engine.options import parse_size  # noqa: E402
from engine.ram.image import MIXED  # noqa: E402

#: /dev/shm files alive at once: image, 2 engine copies, 2 QEMU copies
SHM_FILES = 5
#: what both sides are given: no capabilities, these parameters
PARAMS = {"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS}
#: engine/QEMU total-time the engine is held to, per mode
TARGETS = {"resident": 1.0, "fresh": 1.0}
#: start-up targets, seconds: command wall minus total-time; time to listen
STARTUP_TARGETS = {"migrate_overhead_s": 1.5, "incoming_listen_s": 1.0}


def cell_key(mode: str, transport: str) -> str:
    return f"{mode}-{transport}"


# ---------------------------------------------------------------------------
# Start-up and teardown

def startup_figures(scratch: Scratch, size: int, timeout: float) -> dict:
    """What the command line costs around a migration, for ``size`` bytes of guest.

    ``engine migrate --no-verify`` of a guest it makes itself, to a local
    destination it starts: wall time minus the migration's total-time.  And
    ``engine incoming`` (no vCPUs, one channel) from start to "listening".
    """
    engine = [sys.executable, "-m", "engine"]
    report = scratch.dir / "startup-migrate.json"
    start = time.perf_counter()
    with ManagedProcess([*engine, "migrate", "--ram", str(size), "--machine", "none",
                         "--vcpus", "0", "--no-verify", "--json", report, "--quiet"],
                        scratch.dir, "startup-migrate", cwd=REPO) as proc:
        rc = proc.wait(timeout)
        wall = time.perf_counter() - start
        if rc != 0:
            raise BenchError(f"engine migrate exited {rc}\n{proc.describe()}")
        total_ms = read_report(report, proc)["migration"]["total-time"]
    start = time.perf_counter()
    with ManagedProcess([*engine, "incoming", f"unix:{scratch.dir / 'startup.sock'}",
                         "--machine", "none", "--ram", str(size), "--vcpus", "0"],
                        scratch.dir, "startup-incoming", cwd=REPO) as proc:
        wait_listening(proc, timeout)
        listen = time.perf_counter() - start
    return {"migrate_wall_s": wall, "migrate_total_time_s": total_ms / 1000,
            "migrate_overhead_s": wall - total_ms / 1000, "incoming_listen_s": listen}


# ---------------------------------------------------------------------------
# Report

def summarise(results: dict) -> dict:
    """Medians per cell, the ratios and the verdicts the table prints."""
    reps = results["runs"]
    cells = []
    for mode in results["modes"]:
        for transport in results["transports"]:
            key = cell_key(mode, transport)
            cell = compare_cell([r["cells"][key] for r in reps if key in r["cells"]],
                                TARGETS.get(mode),
                                cpu_target=1.0 if mode == "resident" else None)
            cell.update(mode=mode, transport=transport, key=key)
            sock = median(r["socket_gbps"].get(transport) for r in reps)
            if cell.get("engine"):
                cell["engine_over_socket"] = cell["engine"]["guest_gbps"] / sock
            cells.append(cell)
    memcpy = median(r["memcpy_gbps"] for r in reps)
    startup = {k: median(r["startup"][k] for r in reps if "startup" in r)
               for k in ("migrate_wall_s", "migrate_total_time_s", "migrate_overhead_s",
                         "incoming_listen_s")}
    startup["met"] = {k: startup[k] is not None and startup[k] <= v
                      for k, v in STARTUP_TARGETS.items()}
    return {"cells": cells, "memcpy_gbps": memcpy,
            "socket_gbps": {t: median(r["socket_gbps"].get(t) for r in reps)
                            for t in results["transports"]},
            "startup": startup}


def print_table(results: dict, out=sys.stdout) -> None:
    s = results["summary"]
    print(f"\nprecopy, one channel, {human_size(results['size_bytes'])} mixed image "
          f"({'/'.join(f'{int(p * 100)}' for p in MIXED)}% zero/text/random pages), "
          f"paused guest, median of {results['repeat']}", file=out)
    host = results["host"]
    print(f"host: {host['cpus']} CPUs, load average {host['loadavg_at_start'][0]:.2f} at "
          f"start; QEMU: {results.get('qemu_version', results.get('qemu_skipped'))}",
          file=out)
    for mode in results["modes"]:
        print(f"{mode}: {MODES[mode]}", file=out)
    print_cells(s["cells"], results.get("qemu_version_short", "qemu"), out)
    limits = ", ".join(f"socket {t} {v:.2f}" for t, v in s["socket_gbps"].items())
    print(f"limits (GB/s): {limits} (one process pair, 1 MiB recv_into); "
          f"memcpy {s['memcpy_gbps']:.2f}", file=out)
    for c in s["cells"]:
        if "engine_over_socket" in c:
            print(f"  {c['key']}: engine guest GB/s / socket limit "
                  f"{c['engine_over_socket']:.2f}", file=out)
    st = s["startup"]
    if st.get("migrate_overhead_s") is not None:
        met = st["met"]
        print(f"start-up: engine migrate --no-verify wall {st['migrate_wall_s']:.2f} s for a "
              f"{st['migrate_total_time_s'] * 1000:.0f} ms migration: overhead "
              f"{st['migrate_overhead_s']:.2f} s (target <= "
              f"{STARTUP_TARGETS['migrate_overhead_s']} s: "
              f"{'met' if met['migrate_overhead_s'] else 'NOT met'}); engine incoming "
              f"listens after {st['incoming_listen_s']:.2f} s (target <= "
              f"{STARTUP_TARGETS['incoming_listen_s']} s: "
              f"{'met' if met['incoming_listen_s'] else 'NOT met'})", file=out)


# ---------------------------------------------------------------------------
# Driver

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = check_run_args(args, parse_size)
    if size is None:
        return 2
    short = check_shm_free(SHM_FILES * size, "the benchmark")
    if short:
        print(f"bench: {short}", file=sys.stderr)
        return 2
    exit_through_finally_on_signals()

    results: dict = {"size_bytes": size, "transports": args.uri, "modes": args.mode,
                     "repeat": args.repeat, "max_bandwidth": MAX_BANDWIDTH,
                     "downtime_limit_ms": DOWNTIME_LIMIT_MS,
                     "image": {"seed": IMAGE_SEED, "mix_zero_text_random": list(MIXED)},
                     "host": host_info(), "runs": []}
    qemu_ok, why, short_name = qemu_status("--no-qemu" if args.no_qemu else None,
                                           args.qemu)
    if qemu_ok:
        results["qemu_version"] = why
        results["qemu_version_short"] = short_name
        results["qemu_binary"] = qemu_ok.binary
        print(f"bench: baseline {why} ({qemu_ok.binary})", flush=True)
    else:
        results["qemu_skipped"] = why
        print(f"bench: QEMU skipped: {why}", file=sys.stderr)

    try:
        with Scratch() as scratch:
            image = make_image(scratch, size, results["image"])
            # Each side its own copy: neither can disturb the other's input.
            sources = {}
            for side in ("engine", "qemu") if qemu_ok else ("engine",):
                sources[side] = scratch.shm(f"{side}-src")
                copy_file(image, sources[side])
                scratch.hold(sources[side])
            for run in range(1, args.repeat + 1):
                row: dict = {"cells": {}, "socket_gbps": {}}
                order = ("engine", "qemu") if run % 2 else ("qemu", "engine")
                for mode in args.mode:
                    for transport in args.uri:
                        key = cell_key(mode, transport)
                        cell = row["cells"][key] = {}
                        for side in order:
                            if side not in sources:
                                continue
                            extra = {} if side == "engine" else {"qemu": qemu_ok}
                            runner = run_engine if side == "engine" else run_qemu
                            cell[side] = runner(scratch, image, sources[side], size,
                                                transport, mode, f"{side}-{key}-{run}",
                                                args.timeout, params=PARAMS, **extra)
                        print(f"run {run}/{args.repeat} {key}: " + ", ".join(
                            f"{side} {f['total_time_ms']} ms, {f['cpu_s']:.2f} s CPU"
                            for side, f in cell.items()), flush=True)
                for transport in args.uri:
                    row["socket_gbps"][transport] = socket_limit(scratch, size, transport,
                                                                 args.timeout)
                row["memcpy_gbps"] = memcpy_limit(size)
                row["startup"] = startup_figures(scratch, size, args.timeout)
                results["runs"].append(row)
    except RUN_FAILURES as exc:
        return run_failed(exc)

    results["summary"] = summarise(results)
    print_table(results)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
