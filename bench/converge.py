#!/usr/bin/env python3
"""Convergence: how each strategy gets a guest that dirties faster than the link across.

The same workload for every strategy: a ``--size`` guest, one vCPU writing
random pages over all of its RAM at ``--dirty-rate`` MiB/s, ``max-bandwidth``
``--bandwidth`` MiB/s (the rate must be well above the bandwidth: plain
precopy never converges).  Each strategy is one row of
:data:`engine.stress.convergence.STRATEGIES` (none, auto-converge,
dirty-limit, xbzrle, postcopy, timeout-suspend), run as
``engine migrate`` with its JSON report, bounded by ``--bound`` seconds
(then cancelled).

Figures per strategy (medians over ``--repeat``):

* ``converged``: runs that completed (of ``--repeat``);
* ``time``: total-time of the migration, s (the bound when it did not);
* ``downtime``: ms, as query-migrate reports it;
* ``throttle``: auto-converge's highest cpu-throttle-percentage;
* the guest's own slowdown, from its vCPU's count of pages written: its
  rate while the migration ran here (precopy) against its rate before,
  and the same as guestperf's ms per GiB written (before / during / over
  the last second before the switchover).

Everything a run starts (destination, vCPUs, segments) is ``engine
migrate``'s and goes with it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.commands.args import number, output_file, size  # noqa: E402
from engine.stress.converge_run import run_convergence_case  # noqa: E402
from engine.stress.convergence import STRATEGIES, ConvergenceCase  # noqa: E402

MIB = 1 << 20


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def measure(case: ConvergenceCase, repeat: int) -> dict:
    runs = [run_convergence_case(case) for _ in range(repeat)]
    obs = [r.observation for r in runs]
    guest = [o.guest for o in obs]
    return {
        "strategy": case.strategy,
        "converged": sum(r.verdict.value == "converged" for r in runs),
        "runs": repeat,
        "expected": all(r.expected for r in runs),
        "time_s": _median([(o.total_ms / 1000 if o.total_ms is not None else case.bound)
                           for o in obs]),
        "downtime_ms": _median([o.downtime_ms for o in obs]),
        "throttle_pct": max(o.throttle for o in obs),
        "slowdown": _median([g.get("slowdown") for g in guest]),
        "slowdown_last_second": _median([g.get("slowdown-last-second") for g in guest]),
        "ms_per_gib_before": _median([g.get("ms-per-gib-before") for g in guest]),
        "ms_per_gib_during": _median([g.get("ms-per-gib-during") for g in guest]),
        "ms_per_gib_last_second": _median([g.get("ms-per-gib-last-second") for g in guest]),
        "details": [r.detail for r in runs],
    }


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows) -> str:
    head = (f"{'strategy':16} {'converged':>9} {'time s':>7} {'downtime ms':>11} "
            f"{'throttle %':>10} {'rate during':>11} {'last 1 s':>8} "
            f"{'ms/GiB before':>13} {'during':>8}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['strategy']:16} {r['converged']:>4}/{r['runs']:<4} {_fmt(r['time_s'], '7.1f')} "
            f"{_fmt(r['downtime_ms'], '>11')} {r['throttle_pct']:>10} "
            f"{_fmt(r['slowdown'], '10.2f')}x {_fmt(r['slowdown_last_second'], '7.2f')}x "
            f"{_fmt(r['ms_per_gib_before'], '13.0f')} {_fmt(r['ms_per_gib_during'], '8.0f')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=size, default=size("64M"), help="guest RAM (default 64M)")
    ap.add_argument("--dirty-rate", type=number(0.0, lo_open=True), default=200.0,
                    metavar="MiB/s", help="the guest's dirty rate (default 200)")
    ap.add_argument("--bandwidth", type=number(0.0, lo_open=True), default=64.0,
                    metavar="MiB/s", help="max-bandwidth (default 64)")
    ap.add_argument("--bound", type=number(2.0, lo_open=True), default=20.0, metavar="SECONDS",
                    help="a run not over by then is cancelled (default 20)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help=f"comma-separated rows of the table (default {','.join(STRATEGIES)})")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", type=output_file, default=None)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or args.repeat < 1:
        ap.error(f"unknown strategies {unknown} (known: {', '.join(STRATEGIES)})" if unknown
                 else "--repeat must be >= 1")
    rows = []
    for name in names:
        case = ConvergenceCase(name, ram=args.size, dirty_rate=args.dirty_rate,
                               bandwidth=int(args.bandwidth * MIB), bound=args.bound)
        rows.append(measure(case, args.repeat))
        print(f"{name}: {rows[-1]['details']}", file=sys.stderr, flush=True)
    print(f"guest {args.size >> 20} MiB dirtying {args.dirty_rate:g} MiB/s, link "
          f"{args.bandwidth:g} MiB/s, bound {args.bound:g} s")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "dirty_rate": args.dirty_rate,
                       "bandwidth": args.bandwidth, "bound": args.bound,
                       "strategies": names, "rows": rows}, f, indent=1)
    return 0 if all(r["expected"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
