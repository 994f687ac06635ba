"""``engine dirtyrate``: measure a running ``engine vm``'s dirty rate over QMP.

``engine dirtyrate --qmp unix:PATH [--calc-time S] [--mode M]`` sends
``calc-dirty-rate``, polls ``query-dirty-rate`` until it is measured and
prints what HMP's ``info dirty_rate`` prints (per vCPU with ``dirty-ring``);
``--json FILE`` writes the DirtyRateInfo.  It works with QEMU too.
"""
from __future__ import annotations

import sys
import time

from engine.commands.args import EXIT_FAILED, EXIT_OK, integer, output_file, seconds, uri
from engine.commands.common import write_json

#: how often the measurement's status is asked for (seconds)
_POLL = 0.1


def add_arguments(parser) -> None:
    parser.add_argument("--qmp", type=uri, required=True, metavar="unix:PATH|tcp:HOST:PORT",
                        help="the monitor of the VM to measure")
    parser.add_argument("--calc-time", type=seconds, default=1.0, metavar="SECONDS",
                        help="how long to measure (0.05 to 60 s; default 1)")
    parser.add_argument("--mode", choices=("page-sampling", "dirty-bitmap", "dirty-ring"),
                        default="page-sampling", help="how to measure (QEMU's modes)")
    parser.add_argument("--sample-pages", type=integer(128, 16384), default=None, metavar="N",
                        help="page-sampling: pages sampled per GiB (default 512)")
    parser.add_argument("--timeout", type=seconds, default=10.0, metavar="SECONDS",
                        help="seconds to wait for the monitor, beyond the measuring time")
    parser.add_argument("--json", type=output_file, metavar="FILE",
                        help="write query-dirty-rate's answer as JSON")


def run(args) -> int:
    from engine.qmp.client import QMPClient
    from engine.qmp.errors import QMPError

    calc = {"calc-time": max(1, round(args.calc_time * 1000)), "calc-time-unit": "millisecond",
            "mode": args.mode}
    if args.sample_pages is not None:
        calc["sample-pages"] = args.sample_pages
    try:
        with QMPClient(args.qmp, timeout=args.timeout) as qmp:
            qmp.execute("calc-dirty-rate", calc)
            deadline = time.monotonic() + args.calc_time + args.timeout
            while True:
                info = qmp.execute("query-dirty-rate", {"calc-time-unit": "millisecond"})
                if info["status"] == "measured":
                    break
                if time.monotonic() > deadline:
                    print(f"engine: error: the dirty rate was not measured within "
                          f"{args.calc_time + args.timeout:g} s", file=sys.stderr)
                    return EXIT_FAILED
                time.sleep(_POLL)
    except QMPError as exc:
        print(f"engine: error: {exc.desc}", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(format_dirty_rate(info))
    write_json(args.json, info)
    return EXIT_OK


def format_dirty_rate(info: dict) -> str:
    """HMP's ``info dirty_rate`` lines for a DirtyRateInfo (times as given)."""
    unit = "ms" if info.get("calc-time-unit") == "millisecond" else "sec"
    lines = [f"Status: {info['status']}", f"Start Time: {info['start-time']} (ms)"]
    if info["mode"] == "page-sampling":
        lines.append(f"Sample Pages: {info['sample-pages']} (per GB)")
    lines += [f"Period: {info['calc-time']} ({unit})", f"Mode: {info['mode']}"]
    if "dirty-rate" in info:
        lines.append(f"Dirty rate: {info['dirty-rate']} (MB/s)")
        for vcpu in info.get("vcpu-dirty-rate", ()):
            lines.append(f"vcpu[{vcpu['id']}], Dirty rate: {vcpu['dirty-rate']} (MB/s)")
    else:
        lines.append("Dirty rate: (not ready)")
    return "\n".join(lines) + "\n"
