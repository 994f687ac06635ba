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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

from common import (RUN_FAILURES, DOWNTIME_LIMIT_MS, IMAGE_SEED, MAX_BANDWIDTH,  # noqa: E402
                    Scratch, add_run_args, make_image, check_run_args, check_shm_free, copy_file,
                    exit_through_finally_on_signals,
                    host_info, human_size, median, memcpy_limit, qemu_status,
                    run_engine, run_qemu, socket_limit, write_json, run_failed)
from engine.options import parse_size  # noqa: E402
from engine.ram.image import MIXED  # noqa: E402

#: /dev/shm files alive at once: image, 2 engine copies, 2 QEMU copies
SHM_FILES = 5
#: what both sides are given: no capabilities, these parameters
PARAMS = {"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS}


# ---------------------------------------------------------------------------
# Report

def _median(runs: list[dict], key: str) -> float | None:
    return median(r.get(key) for r in runs)


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

    results: dict = {"size_bytes": size, "transport": args.uri, "repeat": args.repeat,
                     "max_bandwidth": MAX_BANDWIDTH, "downtime_limit_ms": DOWNTIME_LIMIT_MS,
                     "image": {"seed": IMAGE_SEED, "mix_zero_text_random": list(MIXED)},
                     "host": host_info(), "runs": []}
    qemu_ok, why, short_name = qemu_status("--no-qemu" if args.no_qemu else None)
    if qemu_ok:
        results["qemu_version"] = why
        results["qemu_version_short"] = short_name
    else:
        results["qemu_skipped"] = why
        print(f"bench: QEMU skipped: {why}", file=sys.stderr)

    try:
        with Scratch() as scratch:
            image = make_image(scratch, size, results["image"])
            # Each side its own copy: neither can disturb the other's input.
            engine_src = scratch.shm("engine-src")
            copy_file(image, engine_src)
            scratch.hold(engine_src)
            qemu_src = scratch.shm("qemu-src")
            if qemu_ok:
                copy_file(image, qemu_src)
                scratch.hold(qemu_src)
            for run in range(1, args.repeat + 1):
                row: dict = {"engine": run_engine(scratch, image, engine_src, size,
                                                  args.uri, f"engine-{run}", args.timeout,
                                                  params=PARAMS)}
                if qemu_ok:
                    row["qemu"] = run_qemu(scratch, image, qemu_src, size, args.uri,
                                           f"qemu-{run}", args.timeout, params=PARAMS)
                row["socket_gbps"] = socket_limit(scratch, size, args.uri, args.timeout)
                row["memcpy_gbps"] = memcpy_limit(size)
                results["runs"].append(row)
                qemu_part = (f", qemu {row['qemu']['total_time_ms']} ms" if qemu_ok else "")
                print(f"run {run}/{args.repeat}: engine {row['engine']['total_time_ms']} ms"
                      f"{qemu_part}, socket {row['socket_gbps']:.2f} GB/s, "
                      f"memcpy {row['memcpy_gbps']:.2f} GB/s", flush=True)
    except RUN_FAILURES as exc:
        return run_failed(exc)

    results.update(summarise(results))
    print_table(results)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
