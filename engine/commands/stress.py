"""``engine stress``: a seeded matrix of migrations with injected faults, for CI.

Each case migrates a small guest (transport x channels x codec x mode x
fault, drawn from ``--seed``) and ends with a verdict: completed with the
memory verified, failed cleanly with the source intact, or (postcopy, the
destination killed) failed as expected with the state on the destination.
Anything else - a lost or corrupted page, a source not intact, a hang, a
leaked segment or process - is a bad verdict, and the exit status is then
non-zero (3 for a lost or corrupted page, 1 otherwise).
"""
from __future__ import annotations

import sys

from engine.commands.args import integer, output_file, seconds, size
from engine.errors import ConfigError


def add_arguments(parser) -> None:
    from engine.stress.matrix import EXTRA_FAULT_KINDS, FAULT_KINDS
    parser.add_argument("--seed", type=integer(0), default=1, metavar="N",
                        help="seed of the case sampling and fault timings (default 1)")
    parser.add_argument("--cases", type=integer(1), default=30, metavar="N",
                        help="number of cases (default 30)")
    parser.add_argument("--time-limit", type=seconds, default=None, metavar="SECONDS",
                        help="bound on the whole run: no case starts unless the longest so "
                             "far would still fit; the rest are reported as skipped")
    parser.add_argument("--case-timeout", type=seconds, default=90.0, metavar="SECONDS",
                        help="a case not over after this long is a hang (default 90)")
    parser.add_argument("--faults", default=",".join(FAULT_KINDS), metavar="KIND[,KIND]",
                        help=f"fault kinds to draw from (default: all of {', '.join(FAULT_KINDS)}; "
                             f"also: {', '.join(EXTRA_FAULT_KINDS)}, which must fail)")
    parser.add_argument("--only", default=None, metavar="ID[,ID]",
                        help="run only these cases of the sample (to reproduce one)")
    parser.add_argument("--ram", type=size, default=size("32M"), metavar="SIZE",
                        help="guest RAM per case (default 32M)")
    parser.add_argument("--postcopy-faults", default="auto",
                        choices=("auto", "userfaultfd", "software"),
                        help="how postcopy destinations catch missing pages")
    parser.add_argument("--converge", default=None, nargs="?", const="all",
                        metavar="STRATEGY[,STRATEGY]",
                        help="run the convergence cases instead of the fault matrix: each "
                             "strategy (default all: none, auto-converge, postcopy, "
                             "timeout-suspend) against a guest dirtying faster than the link")
    parser.add_argument("--junit", type=output_file, metavar="FILE", help="write JUnit XML")
    parser.add_argument("--json", type=output_file, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--list", action="store_true",
                        help="print the sampled cases and exit")
    parser.add_argument("--quiet", action="store_true",
                        help="no line per case as it ends; only the table")


def run(args) -> int:
    if args.converge:
        return run_converge(args)
    from engine.commands.common import write_json
    from engine.stress import report
    from engine.stress.matrix import sample
    from engine.stress.runner import Settings, run_matrix

    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    cases = sample(args.seed, args.cases, kinds)
    if args.only:
        wanted = {w.strip().zfill(2) for w in args.only.split(",") if w.strip()}
        unknown = wanted - {c.id for c in cases}
        if unknown:
            raise ConfigError(f"--only: no case {', '.join(sorted(unknown))} among the "
                              f"{len(cases)} of seed {args.seed}")
        cases = [c for c in cases if c.id in wanted]
    if args.list:
        for c in cases:
            at = "" if c.fault.at is None else f" at {c.fault.at:.2f}"
            print(f"{c.id}  {c.transport:4}  {c.channels_label:9}  {c.codec:4}  "
                  f"{c.mode:16}  {c.workload:4}  {c.fault.label}{at}")
        return report.EXIT_OK
    if args.ram < (4 << 20) or args.ram % 4096:
        raise ConfigError("--ram must be a multiple of 4 KiB, at least 4M")
    settings = Settings(ram=args.ram, case_timeout=args.case_timeout,
                        postcopy_faults=args.postcopy_faults)
    meta = {"seed": args.seed, "cases_requested": args.cases, "faults": kinds,
            "time_limit": args.time_limit, "ram": args.ram,
            "case_timeout": args.case_timeout, "only": args.only}

    def progress(result) -> None:
        if not args.quiet:
            c = result.case
            print(f"[{c.id}] {c.fault.label:32} {c.mode:16} {result.verdict.value} "
                  f"({result.seconds:.1f} s): {result.detail}", file=sys.stderr, flush=True)

    results: list = []      # filled as cases end, so an interrupted run still reports

    def on_result(result) -> None:
        results.append(result)
        progress(result)

    try:
        run_matrix(cases, settings, args.time_limit, on_result=on_result)
    finally:
        # Reports for what ran, even when interrupted.
        if args.junit:
            with open(args.junit, "wb") as f:
                f.write(report.junit_xml(results, {k: v for k, v in meta.items()
                                                   if v is not None}))
        write_json(args.json, report.to_json(results, meta))
    print(report.table(results))
    bad = report.failures(results)
    if bad:
        print(bad)
    return report.exit_code(results)


def run_converge(args) -> int:
    """``engine stress --converge``: one case per strategy, a verdict each
    (converged / did not converge); exit 1 if any is not the expected one."""
    from engine.commands.common import write_json
    from engine.stress.converge_run import run_convergence_case
    from engine.stress.convergence import STRATEGIES, convergence_cases

    names = None if args.converge == "all" else \
        [n.strip() for n in args.converge.split(",") if n.strip()]
    cases = convergence_cases(names)
    if args.list:
        for c in cases:
            print(f"{c.strategy:16} {STRATEGIES[c.strategy].why}")
        return 0
    results = []
    for case in cases:
        r = run_convergence_case(case)
        results.append(r)
        if not args.quiet:
            print(f"[{case.strategy}] {r.verdict.value} ({r.seconds:.1f} s): {r.detail}",
                  file=sys.stderr, flush=True)
    write_json(args.json, {"convergence": [r.to_dict() for r in results]})
    print(f"{'strategy':16} {'verdict':18} {'expected':8} {'time s':>7} {'downtime ms':>11} "
          f"{'throttle %':>10} {'guest rate':>10}")
    for r in results:
        o = r.observation
        slow = o.guest.get("slowdown")
        downtime = o.downtime_ms if o.downtime_ms is not None else "-"
        print(f"{r.case.strategy:16} {r.verdict.value:18} {'yes' if r.expected else 'NO':8} "
              f"{(o.total_ms or 0) / 1000:7.1f} {downtime:>11} "
              f"{o.throttle:>10} {f'{slow:.2f}x' if slow else '-':>10}")
    return 0 if all(r.expected for r in results) else 1
