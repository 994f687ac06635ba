"""Multifd throughput: the engine and QEMU over 1, 2, 4 channels and each codec.

Every cell of the matrix (``--mode`` x ``--uri`` x ``--channels`` x ``--codecs``;
modes as in bench/precopy.py: ``resident``, the default, has both
destinations' RAM filled and mapped populated before the clock, ``fresh``
leaves it new) migrates the same
mixed image (50% zero, 40% text, 10% random pages; ``engine.ram.image``) of
``--size`` bytes, paused, on this host, once with the engine and once with
QEMU, with the same settings on both sides and on both ends: capability
``multifd``, ``multifd-channels`` N, ``multifd-compression`` C, zlib and zstd
level 1 (both programs' default), ``max-bandwidth`` 1 TiB/s, ``downtime-limit``
300 ms, and ``zero-page-detection`` (``--zero-page-detection``, default
``multifd``: the channels find zero pages).  The QEMU is ``--qemu`` (default
10.0 where ``make qemu10`` put it, else the system's; the report says which);
QEMU 7.2 has no ``zero-page-detection`` and always finds zero pages on the
main channel, like the engine's ``legacy``.

The time compared is the source's ``query-migrate`` ``total-time`` (the
engine's from ``engine migrate --json``), next to each side's downtime and
CPU seconds per GiB (the engine's ``x-cpu-time`` of both sides: coordinators
and workers; QEMU's two processes from ``migrate`` to ``completed``).  After every migration the
destination's RAM file is compared with the image, and the source must report
multifd bytes (the pages went over the multifd channels); either failing marks
the cell failed, and the benchmark exits 1 after reporting the rest.

This machine's limits, measured in every repeat: N sender processes moving
``--size`` bytes in all to N receiving threads over the same kind of socket
(1 MiB ``send``/``recv_into``; "socket N"), and a numpy memcpy of ``--size``
bytes.  engine GB/s is size / total-time (zero pages included, as QEMU's
figures are quoted); "/socket" divides it by the socket limit for the cell's
channel count, "/memcpy" by the memcpy rate.

The engine's work floor, measured in every repeat: the engine's own page work
for the image (source worker's PacketWriter, destination worker's
PacketReader, over an in-memory channel in one process) as CPU seconds per
side; "floor" is max(total / CPUs, source / N, destination / N), which no
schedule of N channels on this host can beat, and "floor/QEMU" the best
ratio the work allows.

What the compression libraries can do, measured once per run on one core: the
image's first 64 MiB of non-zero pages compressed as 512 KiB packets through
one stream with a flush after each (as a channel does), for QEMU's library
(zlib, libzstd) and, where it differs, the engine's (ISA-L deflates zlib
levels 1..3); the line gives MB/s of input and compressed/input size.  It
shows how much of the zlib figure is the library rather than the engine.

Cells run in matrix order within a repeat; which side goes first alternates
between repeats.  Figures are medians over ``--repeat``.  Units: MB = 10**6
bytes, GB/s = 10**9 bytes/s.  Files are ``/dev/shm/engine-bench-*`` and a
``/tmp/engine-bench-*`` directory, removed on every exit path with every
process this starts (Ctrl-C and SIGTERM included).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

from common import (DOWNTIME_LIMIT_MS, IMAGE_SEED, MAX_BANDWIDTH, MODES,  # noqa: E402
                    BenchError, RUN_FAILURES,
                    Scratch, add_run_args, make_image, check_run_args, check_shm_free, copy_file,
                    compare_cell, first_difference, print_cells,
                    exit_through_finally_on_signals,
                    host_info, human_size, median, memcpy_limit, qemu_status,
                    run_engine, run_qemu, socket_limit, write_json, run_failed)
from engine.errors import EngineError  # noqa: E402
from engine.multifd.pool import BATCH_PAGES as FLOOR_BATCH_PAGES  # noqa: E402
from engine.options import parse_size  # noqa: E402
from engine.ram.image import MIXED  # noqa: E402

CODECS = ("none", "zlib", "zstd")
#: compression level for both programs (1 is the default of both)
LEVEL = 1
#: /dev/shm files alive at once: image, engine and QEMU sources, and either one
#: migration's destination or the work floor's source and destination
SHM_FILES = 5
#: engine/QEMU total-time the engine is held to in resident mode:
#: (channels or None for any, codec) -> at most; fresh mode: no worse than QEMU
TARGETS = {(2, "none"): 0.8, (2, "zstd"): 0.9, (None, "zlib"): 0.3}
FRESH_TARGET = 1.0
#: engine/QEMU CPU seconds the engine is held to (resident, nocomp)
CPU_TARGETS = {"none": 1.0}


def target_for(mode: str, channels: int, codec: str) -> float | None:
    """The engine/QEMU time ratio this cell is held to, if any."""
    if mode == "fresh":
        return FRESH_TARGET
    return TARGETS.get((channels, codec), TARGETS.get((None, codec)))


def cell_options(channels: int, codec: str) -> tuple[dict, dict]:
    """(capabilities, parameters) both programs get for one cell."""
    params: dict = {"multifd-channels": channels, "multifd-compression": codec,
                    "max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS}
    if codec == "zlib":
        params["multifd-zlib-level"] = LEVEL
    elif codec == "zstd":
        params["multifd-zstd-level"] = LEVEL
    return {"multifd": True}, params


def cell_key(channels: int, codec: str, mode: str | None = None,
             transport: str | None = None) -> str:
    head = f"{mode}-{transport}-" if mode else ""
    return f"{head}{channels}ch-{codec}"


# ---------------------------------------------------------------------------
# One run of one cell

def _checked(fig: dict, side: str) -> dict:
    if not fig.get("multifd_bytes"):
        raise BenchError(f"{side}: completed, but no multifd bytes reported: "
                         "the pages did not go over the multifd channels")
    return fig


def run_cell(scratch: Scratch, sources: dict, image: Path, size: int, args, mode: str,
             transport: str, channels: int, codec: str, rep: int, qemu_ok) -> dict:
    """Both sides on one cell; each side's figures or its error."""
    caps, params = cell_options(channels, codec)
    name = f"{cell_key(channels, codec, mode, transport)}-{rep}"
    sides = ["engine", "qemu"] if rep % 2 else ["qemu", "engine"]
    out: dict = {}
    for side in sides:
        if side == "qemu" and not qemu_ok:
            continue
        try:
            if side == "engine":
                fig = run_engine(scratch, image, sources["engine"], size, transport, mode,
                                 f"engine-{name}", args.timeout, caps=caps,
                                 params={**params,
                                         "zero-page-detection": args.zero_page_detection})
            else:
                if qemu_ok.modern:
                    # like for like: 7.2 has no such parameter (legacy only)
                    params = {**params, "zero-page-detection": args.zero_page_detection}
                fig = run_qemu(scratch, image, sources["qemu"], size, transport, mode,
                               f"qemu-{name}", args.timeout, caps=caps, params=params,
                               qemu=qemu_ok)
            out[side] = _checked(fig, side)
        except (EngineError, TimeoutError, OSError) as exc:
            # tests.qemu prints the logs; keep the first lines of the reason here
            out[side] = {"error": str(exc).splitlines()[0][:300]}
            print(f"  {side} {name}: FAILED: {out[side]['error']}", file=sys.stderr,
                  flush=True)
    return out


def work_floor(scratch: Scratch, image: Path, size: int, codec: str,
               zero_detect: bool) -> dict:
    """CPU seconds the engine's own page work for the image takes, per side.

    One process runs a source worker's :class:`PacketWriter` and a
    destination worker's :class:`PacketReader` batch by batch over an
    in-memory channel (a copy on send, one on receive, like a socket), from
    a mapped copy of the image into a fresh file: zero detection, codec,
    landing, packet headers, and the Python around them; no processes, no
    sockets, no coordinator.  Whatever the schedule, N channels on C CPUs
    cannot beat max(total / C, source / N, destination / N) of it.
    """
    import time

    import numpy as np

    from engine.multifd.receiver import PacketReader
    from engine.multifd.sender import PacketWriter, packets_needed
    from engine.ram.block import RamBlock

    src_path, dst_path = scratch.shm("floor-src"), scratch.shm("floor-dst")
    copy_file(image, src_path)
    scratch.hold(src_path)
    src = RamBlock.create("pc.ram", size, mem_path=str(src_path))
    try:
        # The work, not the host's: a destination whose memory exists already.
        dst = RamBlock.create("pc.ram", size, mem_path=str(dst_path))
        scratch.hold(dst_path)
        dst.populate()
        try:
            channel = _MemoryChannel()
            writer = PacketWriter(channel, [src], codec, LEVEL, zero_detect)
            received = SimpleNamespace(log=np.zeros(size // 4096, dtype=np.uint8))
            reader = PacketReader(channel, 0, [dst], [received], [True], codec)
            source = destination = 0.0
            packet_num = 0
            for first in range(0, size // 4096, FLOOR_BATCH_PAGES):
                pages = np.arange(first, min(first + FLOOR_BATCH_PAGES, size // 4096))
                t = time.thread_time()
                writer.send_batch(0, pages, packet_num)
                source += time.thread_time() - t
                packet_num += packets_needed(len(pages), writer.page_count)
                t = time.thread_time()
                while channel.pending:
                    reader.read_packet()
                destination += time.thread_time() - t
        finally:
            dst.close()
        diff = first_difference(image, dst_path)
        if diff:
            raise BenchError(f"work floor: the destination is not the image: {diff}")
    finally:
        src.close()
        scratch.remove(src_path)
        scratch.remove(dst_path)
    return {"source_cpu_s": source, "destination_cpu_s": destination}


class _MemoryChannel:
    """A channel in memory: what is sent is copied, and read back in order."""

    def __init__(self) -> None:
        self._chunks: deque = deque()
        self.pending = 0

    def sendmsg_all(self, buffers) -> None:
        for b in buffers:
            data = bytes(b)
            if data:
                self._chunks.append(memoryview(data))
                self.pending += len(data)

    def sendall(self, data) -> None:
        self.sendmsg_all([data])

    send_views = sendmsg_all

    def recv_into(self, buf, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buf)[:nbytes or len(buf)]
        done = 0
        while done < len(view) and self._chunks:
            head = self._chunks[0]
            n = min(len(head), len(view) - done)
            view[done:done + n] = head[:n]
            done += n
            if n == len(head):
                self._chunks.popleft()
            else:
                self._chunks[0] = head[n:]
        self.pending -= done
        return done

    def recvmsg_into(self, buffers) -> tuple:
        total = 0
        for b in buffers:
            n = self.recv_into(b)
            total += n
            if n < memoryview(b).nbytes:
                break
        return (total,)


# ---------------------------------------------------------------------------
# Codec limits

CODEC_SAMPLE = 64 << 20
CODEC_PACKET = 512 << 10


def codec_limits(image: Path, codecs: list[str]) -> dict:
    """One-core compression rate and ratio per library on the image's data."""
    import time
    import zlib

    import numpy as np
    import zstandard

    pages = np.fromfile(image, dtype=np.uint8, count=4 * CODEC_SAMPLE).reshape(-1, 4096)
    data = pages[pages.any(axis=1)][:CODEC_SAMPLE // 4096].tobytes()

    def measure(compressobj, flush) -> dict:
        stream, out = compressobj(), 0
        start = time.perf_counter()
        for i in range(0, len(data), CODEC_PACKET):
            out += len(stream.compress(data[i:i + CODEC_PACKET])) + len(flush(stream))
        seconds = time.perf_counter() - start
        return {"mbps": len(data) / seconds / 1e6, "ratio": out / len(data)}

    libs = {}
    if "zlib" in codecs:
        libs["zlib"] = measure(lambda: zlib.compressobj(LEVEL),
                               lambda s: s.flush(zlib.Z_SYNC_FLUSH))
        from engine.compress.zlib import ZlibEncoder
        if ZlibEncoder(LEVEL).backend == "isal":
            from isal import isal_zlib
            libs["ISA-L"] = measure(lambda: isal_zlib.compressobj(LEVEL),
                                    lambda s: s.flush(isal_zlib.Z_SYNC_FLUSH))
    if "zstd" in codecs:
        libs["zstd"] = measure(
            lambda: zstandard.ZstdCompressor(level=LEVEL).compressobj(),
            lambda s: s.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    return libs


# Summary

def summarise(results: dict) -> dict:
    """Per cell: medians over the repeats, ratios and the verdicts."""
    reps = results["repeats"]
    sock = {t: {n: median(r["socket_gbps"][t].get(str(n)) for r in reps)
                for n in results["channels"]} for t in results["transports"]}
    memcpy = median(r["memcpy_gbps"] for r in reps)
    work = {codec: {side: median(r["work_floor"][codec][side] for r in reps
                                 if codec in r.get("work_floor", {}))
                    for side in ("source_cpu_s", "destination_cpu_s")}
            for codec in results["codecs"]}
    cpus = results["host"]["cpus"] or 1
    cells = []
    for mode in results["modes"]:
        for transport in results["transports"]:
            for channels in results["channels"]:
                for codec in results["codecs"]:
                    key = cell_key(channels, codec, mode, transport)
                    cell = compare_cell([r["cells"][key] for r in reps if key in r["cells"]],
                                        target_for(mode, channels, codec),
                                        CPU_TARGETS.get(codec) if mode == "resident" else None)
                    cell.update(key=key, mode=mode, transport=transport, channels=channels,
                                codec=codec)
                    eng = cell.get("engine")
                    w = work.get(codec, {})
                    if w.get("source_cpu_s") is not None:
                        src_s, dst_s = w["source_cpu_s"], w["destination_cpu_s"]
                        cell["floor_ms"] = 1000 * max((src_s + dst_s) / cpus,
                                                      src_s / channels, dst_s / channels)
                    if eng:
                        cell["engine_over_socket"] = (eng["guest_gbps"]
                                                      / sock[transport][channels])
                        cell["engine_over_memcpy"] = eng["guest_gbps"] / memcpy
                        if "floor_ms" in cell:
                            cell["engine_over_floor"] = eng["total_time_ms"] / cell["floor_ms"]
                    cells.append(cell)
    return {"socket_gbps_median": {t: {str(k): v for k, v in d.items()}
                                   for t, d in sock.items()},
            "memcpy_gbps_median": memcpy, "work_cpu_s_median": work, "cells": cells}


def print_table(results: dict, out=sys.stdout) -> None:
    s = results["summary"]
    print(f"\nmultifd, {human_size(results['size_bytes'])} mixed image "
          f"({'/'.join(f'{int(p * 100)}' for p in MIXED)}% zero/text/random pages), "
          f"paused guest, median of {results['repeat']}; "
          f"engine zero-page-detection={results['zero_page_detection']}", file=out)
    host = results["host"]
    print(f"host: {host['cpus']} CPUs, load average {host['loadavg_at_start'][0]:.2f} at "
          f"start, {results['loadavg_at_end'][0]:.2f} at end; "
          f"QEMU: {results.get('qemu_version', results.get('qemu_skipped'))}", file=out)
    for mode in results["modes"]:
        print(f"{mode}: {MODES[mode]}", file=out)
    print_cells(s["cells"], results.get("qemu_version_short", "qemu"), out)
    for t, d in s["socket_gbps_median"].items():
        limits = ", ".join(f"{n} streams {v:.2f}" for n, v in d.items())
        print(f"limits (GB/s), {t}: {limits}; memcpy {s['memcpy_gbps_median']:.2f}", file=out)
    floors = ", ".join(f"{cell_key(c['channels'], c['codec'])} {c['floor_ms']:.0f}"
                       for c in s["cells"] if "floor_ms" in c
                       and c["mode"] == results["modes"][0]
                       and c["transport"] == results["transports"][0])
    work = ", ".join(f"{codec} {v['source_cpu_s'] * 1000:.0f}+{v['destination_cpu_s'] * 1000:.0f}"
                     for codec, v in s.get("work_cpu_s_median", {}).items()
                     if v.get("source_cpu_s") is not None)
    if work:
        print(f"work floor: the engine's page work in one process, ms CPU source+destination: "
              f"{work}; floor = max(total / {results['host']['cpus']} CPUs, "
              f"each side / channels), ms: {floors}", file=out)
    if results.get("codec_limits"):
        libs = ", ".join(f"{name} {v['mbps']:.0f} MB/s x{v['ratio']:.3f}"
                         for name, v in results["codec_limits"].items())
        print(f"level {LEVEL}, one core, input MB/s x compressed/input: {libs}", file=out)


def plot(results: dict, path: str) -> str | None:
    """Write a bar chart of engine and QEMU times per cell; the reason if it cannot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "the chart needs matplotlib (pip install matplotlib)"
    cells = results["summary"]["cells"]
    labels = [c["key"] for c in cells]
    nan = float("nan")  # a side with no figure gets no bar
    eng = [c["engine"]["total_time_ms"] if c.get("engine") else nan for c in cells]
    qemu = [c["qemu"]["total_time_ms"] if c.get("qemu") else nan for c in cells]
    xs = list(range(len(cells)))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cells) + 2), 4.5))
    ax.bar([x - width / 2 for x in xs], eng, width, label="engine")
    ax.bar([x + width / 2 for x in xs], qemu, width,
           label=results.get("qemu_version_short", "qemu"))
    for x, c in zip(xs, cells):
        if "engine_over_qemu" in c:
            top = max(eng[x], qemu[x])  # both exist when there is a ratio
            ax.annotate(f"{c['engine_over_qemu']:.2f}x", (x, top), ha="center",
                        va="bottom", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_yscale("log")  # zlib takes about ten times as long as the rest
    ax.set_ylabel("total-time (ms, log scale), lower is better")
    ax.set_title(f"multifd, {human_size(results['size_bytes'])} mixed image, "
                 f"median of {results['repeat']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------
# Driver

def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}")
    if not values or any(v < 1 or v > 255 for v in values):
        raise argparse.ArgumentTypeError(f"channel counts are 1..255: {text}")
    return values


def _codec_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in CODECS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"codecs are {', '.join(CODECS)}: {text}")
    return values


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(ap)
    ap.add_argument("--channels", type=_int_list, default=[1, 2, 4],
                    help="comma-separated channel counts (default 1,2,4)")
    ap.add_argument("--codecs", type=_codec_list, default=list(CODECS),
                    help="comma-separated multifd-compression values (default none,zlib,zstd)")
    ap.add_argument("--zero-page-detection", choices=("multifd", "legacy", "none"),
                    default="multifd", help="the engine's zero-page-detection (default multifd)")
    ap.add_argument("--png", metavar="FILE", help="bar chart of engine and QEMU times per cell")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = check_run_args(args, parse_size)
    if size is None:
        return 2
    short = check_shm_free(SHM_FILES * size + 2 * size, "the benchmark (with memcpy)")
    if short:
        print(f"bench: {short}", file=sys.stderr)
        return 2
    exit_through_finally_on_signals()

    results: dict = {"size_bytes": size, "transports": args.uri, "modes": args.mode,
                     "repeat": args.repeat,
                     "channels": args.channels, "codecs": args.codecs,
                     "zero_page_detection": args.zero_page_detection,
                     "compression_level": LEVEL, "max_bandwidth": MAX_BANDWIDTH,
                     "downtime_limit_ms": DOWNTIME_LIMIT_MS,
                     "image": {"seed": IMAGE_SEED, "mix_zero_text_random": list(MIXED)},
                     "host": host_info(), "repeats": []}
    qemu_ok, why, short_name = qemu_status("--no-qemu" if args.no_qemu else None,
                                           args.qemu)
    if qemu_ok:
        results["qemu_version"], results["qemu_version_short"] = why, short_name
        results["qemu_binary"] = qemu_ok.binary
        print(f"bench: baseline {why} ({qemu_ok.binary})", flush=True)
    else:
        results["qemu_skipped"] = why
        print(f"bench: QEMU skipped: {why}", file=sys.stderr)

    try:
        with Scratch() as scratch:
            image = make_image(scratch, size, results["image"])
            results["codec_limits"] = codec_limits(image, args.codecs)
            # Each side its own copy: neither can disturb the other's input.
            sources = {}
            for side in ("engine", "qemu") if qemu_ok else ("engine",):
                sources[side] = scratch.shm(f"{side}-src")
                copy_file(image, sources[side])
                scratch.hold(sources[side])
            for rep in range(1, args.repeat + 1):
                row: dict = {"socket_gbps": {}, "cells": {}}
                for transport in args.uri:
                    row["socket_gbps"][transport] = {
                        str(n): socket_limit(scratch, size, transport, args.timeout, streams=n)
                        for n in args.channels}
                row["memcpy_gbps"] = memcpy_limit(size)
                row["work_floor"] = {
                    codec: work_floor(scratch, image, size, codec,
                                      args.zero_page_detection != "none")
                    for codec in args.codecs}
                floors = ", ".join(f"{c} {v['source_cpu_s'] * 1000:.0f}+"
                                   f"{v['destination_cpu_s'] * 1000:.0f}"
                                   for c, v in row["work_floor"].items())
                print(f"repeat {rep}/{args.repeat}: memcpy {row['memcpy_gbps']:.2f} GB/s; "
                      f"work ms CPU (source+destination) {floors}", flush=True)
                for mode in args.mode:
                    for transport in args.uri:
                        for channels in args.channels:
                            for codec in args.codecs:
                                key = cell_key(channels, codec, mode, transport)
                                cell = run_cell(scratch, sources, image, size, args, mode,
                                                transport, channels, codec, rep, qemu_ok)
                                row["cells"][key] = cell
                                times = ", ".join(
                                    f"{side} {v['total_time_ms']} ms {v['cpu_s']:.2f} s CPU"
                                    for side, v in cell.items() if "error" not in v)
                                print(f"  {key:<26} {times}", flush=True)
                results["repeats"].append(row)
    except RUN_FAILURES as exc:
        return run_failed(exc)

    results["loadavg_at_end"] = list(os.getloadavg())
    results["summary"] = summarise(results)
    print_table(results)
    write_json(args.json, results)
    if args.png:
        why_not = plot(results, args.png)
        print(f"bench: no chart: {why_not}" if why_not else f"chart: {args.png}",
              file=sys.stderr if why_not else sys.stdout)
    failed = any(c.get("engine_errors") or c.get("qemu_errors")
                 for c in results["summary"]["cells"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
