"""Command line: ``engine migrate``, ``engine incoming``, ``engine load``.

Options follow qemu-system and QMP where they overlap: ``--cap NAME=on|off``
and ``--param NAME=VALUE`` take QEMU's capability and parameter names, URIs
are QEMU's (tcp:, unix:, file:, exec:, fd:), sizes take QEMU's suffixes.
Everything is validated before any process or segment is created, so a bad
option costs nothing to undo.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from engine import trace
from engine.commands.args import (EXIT_FAILED, EXIT_MISMATCH, EXIT_OK, EXIT_USAGE,
                                  add_guest_options, add_vcpus_option, integer, output_file,
                                  seconds, uri)
from engine.errors import ConfigError, EngineError, Terminated

#: re-exported for callers that import them from here
__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_MISMATCH",
           "Terminated"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="engine", description=__doc__.splitlines()[0])
    trace_help = ("trace events matching these comma-separated globs to stderr, like "
                  "QEMU's -trace (e.g. 'migrate_set_state,multifd_*'); "
                  f"the {trace.ENV} environment variable does the same")
    ap.add_argument("--trace", metavar="PATTERN", help=trace_help)
    # Also after the subcommand, where users put options; SUPPRESS keeps a
    # value given before it.
    traced = argparse.ArgumentParser(add_help=False)
    traced.add_argument("--trace", metavar="PATTERN", default=argparse.SUPPRESS,
                        help=trace_help)
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser("migrate", parents=[traced],
                       help="migrate a live guest (to a local destination by default)")
    add_guest_options(m, ram_default="1G")
    m.add_argument("--dst-mem-path", metavar="PATH", help="file-backed RAM for the local destination")
    m.add_argument("--to", type=uri, metavar="URI", help="migrate to a destination already listening "
                   "(engine or QEMU) instead of starting a local one")
    m.add_argument("--uri", type=uri, metavar="URI", help="transport for the local destination "
                   "(default: unix socket in a private directory)")
    m.add_argument("--no-verify", action="store_true",
                   help="skip checking the destination (memory digests, the ab pattern)")
    m.add_argument("--postcopy-after", type=integer(0), default=None, metavar="N",
                   help="with --cap postcopy-ram=on: switch to postcopy after N dirty-bitmap "
                        "passes (QMP migrate-start-postcopy)")
    m.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                   help="seconds the precopy may take (finite, > 0; virsh migrate --timeout); "
                        "then --timeout-action")
    m.add_argument("--timeout-action", choices=("suspend", "postcopy", "cancel"), default=None,
                   help="at --timeout: suspend = stop the guest and complete now (the default), "
                        "postcopy = switch to postcopy (needs --cap postcopy-ram=on), "
                        "cancel = cancel (the source keeps running)")
    m.add_argument("--plot", type=output_file, metavar="FILE.png",
                   help="draw throughput, dirty rate and remaining RAM over time, with passes "
                        "and switchover (needs matplotlib: engine[bench])")

    i = sub.add_parser("incoming", parents=[traced], help="wait for one incoming migration")
    i.add_argument("uri", type=uri)
    add_guest_options(i, ram_default=None)
    i.add_argument("--verify", action="store_true",
                   help="hash memory and run the ab check before the guest resumes")
    i.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                   help="seconds to wait for the source to connect (finite, > 0)")

    ld = sub.add_parser("load", parents=[traced],
                        help="load a migration stream file and report its sections")
    ld.add_argument("file")
    ld.add_argument("--machine", default=None, help="machine profile (default: from the stream)")
    add_vcpus_option(ld, default=None,
                     help="check that the stream carries N vCPUs (default: as the stream says)")
    ld.add_argument("--mem-path", metavar="PATH", help="also write the RAM image to PATH")
    ld.add_argument("--json", type=output_file, metavar="FILE")

    # Commands whose options live with their code (engine/commands/<name>.py:
    # add_arguments(parser) and run(args)).
    for name, help_text in _MODULE_COMMANDS.items():
        p = sub.add_parser(name, parents=[traced], help=help_text)
        _command_module(name).add_arguments(p)
    return ap


#: subcommand -> help; each is engine/commands/<name>.py with add_arguments() and run()
_MODULE_COMMANDS = {
    "vm": "run one guest with a QMP monitor, like qemu-system (-S, --incoming, --qmp)",
    "info": "ask a running engine vm over QMP and print like HMP 'info migrate'",
    "dirtyrate": "measure a running engine vm's dirty rate over QMP (calc-dirty-rate)",
    "stress": "run a seeded matrix of migrations with injected faults (CI)",
}


#: commands that start vCPUs, workers or a fault handler
_SPAWNING = frozenset({"migrate", "incoming", "vm", "stress"})


def _command_module(name: str):
    import importlib
    return importlib.import_module(f"engine.commands.{name}")


def _on_sigterm(signum, frame) -> None:
    raise Terminated(128 + signum)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        # A refused command line (argparse printed why: exit 2) or --help (0).
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.trace:
        # Set for the children too: workers, vCPUs and the local destination
        # trace the same events into the same stderr.
        os.environ[trace.ENV] = args.trace
    trace.enable_from_env()
    # A service manager or CI timeout stops us with SIGTERM: leave nothing
    # behind then either (worker processes, segments, socket files).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    if args.command in _SPAWNING:
        # The template its children fork from imports numpy, zmq and the
        # codecs while this process makes the guest.
        from engine.procs import warm_up
        warm_up()
    try:
        if args.command == "migrate":
            from engine.commands.migrate import run_migrate
            return run_migrate(args)
        if args.command == "incoming":
            from engine.commands.incoming import run_incoming
            return run_incoming(args)
        if args.command in _MODULE_COMMANDS:
            return _command_module(args.command).run(args)
        from engine.commands.load import run_load
        return run_load(args)
    except ConfigError as exc:
        print(f"engine: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EngineError as exc:
        print(f"engine: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("engine: interrupted", file=sys.stderr)
        return 130
