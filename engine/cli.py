"""Command line: ``engine migrate``, ``engine incoming``, ``engine load``.

Options follow qemu-system and QMP where they overlap: ``--cap NAME=on|off``
and ``--param NAME=VALUE`` take QEMU's capability and parameter names, URIs
are QEMU's (tcp:, unix:, file:, exec:, fd:), sizes take QEMU's suffixes.
Everything is validated before any process or segment is created, so a bad
option costs nothing to undo.
"""
from __future__ import annotations

import argparse
import uuid as uuidlib
import os
import signal
import sys
import threading

from engine import trace
from engine.errors import ConfigError, EngineError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISMATCH = 0, 1, 2, 3


def _size(text: str) -> int:
    from engine.options import parse_size
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _uuid(text: str) -> bytes:
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid UUID {text!r}: expected 8-4-4-4-12 hex digits") from None


def _add_guest_options(p: argparse.ArgumentParser, *, ram_default: str | None) -> None:
    p.add_argument("--ram", type=_size, default=_size(ram_default) if ram_default else None,
                   metavar="SIZE", help="guest RAM size (QEMU suffixes: 512M, 1G)"
                   + ("" if ram_default else "; default: accept the stream's block list"))
    p.add_argument("--mem-path", metavar="PATH",
                   help="file-backed RAM (like memory-backend-file,share=on); "
                        "its content is the guest memory")
    p.add_argument("--ram-id", metavar="NAME",
                   help="RAM block name (default: the machine's, 'm0' for -M none)")
    p.add_argument("--prealloc", action="store_true",
                   help="populate guest RAM at start-up, like QEMU's memory-backend "
                        "prealloc=on (a migration then writes to memory already there)")
    p.add_argument("--machine", default="engine",
                   help="machine profile: engine, none (QEMU's -M none) or none-7.2 "
                        "(-M none speaking QEMU 7.2's migration dialect)")
    p.add_argument("--uuid", type=_uuid, default=None, metavar="UUID",
                   help="the VM's UUID, as QEMU's -uuid: multifd channels carry it, and "
                        "with validate-uuid the destination checks it")
    p.add_argument("--vcpus", type=int, default=1, metavar="N")
    p.add_argument("--workload", default=None, choices=("none", "ab", "random"))
    p.add_argument("--dirty-rate", type=float, default=64.0, metavar="MB/s",
                   help="ab and random workloads: guest dirty rate in MiB/s (0: as fast as the vCPUs go)")
    p.add_argument("--hot-set", type=float, default=1.0, metavar="FRACTION",
                   help="random workload: fraction of pages taking 90%% of writes")
    p.add_argument("--global", dest="globals_", action="append", default=[],
                   metavar="migration.PROPERTY=VALUE",
                   help="a migration object property, as QEMU's -global (e.g. "
                        "migration.multifd-flush-after-each-section=on to speak QEMU "
                        "7.2's multifd dialect; --machine none-7.2 implies it)")
    p.add_argument("--cap", action="append", default=[], metavar="NAME=on|off")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--json", metavar="FILE", help="write the final report as JSON")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--postcopy-faults", default="auto",
                   choices=("auto", "userfaultfd", "software"),
                   help="postcopy on the destination: how missing pages are caught "
                        "(auto: userfaultfd when this host has it, else software)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="engine", description=__doc__.splitlines()[0])
    ap.add_argument("--trace", metavar="PATTERN",
                    help="trace events matching these comma-separated globs to stderr, "
                         "like QEMU's -trace (e.g. 'migrate_set_state,multifd_*'); "
                         f"the {trace.ENV} environment variable does the same")
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser("migrate", help="migrate a live guest (to a local destination by default)")
    _add_guest_options(m, ram_default="1G")
    m.add_argument("--dst-mem-path", metavar="PATH", help="file-backed RAM for the local destination")
    m.add_argument("--to", metavar="URI", help="migrate to a destination already listening "
                   "(engine or QEMU) instead of starting a local one")
    m.add_argument("--uri", metavar="URI", help="transport for the local destination "
                   "(default: unix socket in a private directory)")
    m.add_argument("--no-verify", action="store_true", help="skip checking the destination (memory digests, the ab pattern)")
    m.add_argument("--postcopy-after", type=int, default=None, metavar="N",
                   help="with --cap postcopy-ram=on: switch to postcopy after N dirty-bitmap "
                        "passes (QMP migrate-start-postcopy)")
    m.add_argument("--plot", metavar="FILE.png", help="draw throughput, dirty rate and remaining "
                   "RAM over time, with passes and switchover (needs matplotlib: engine[bench])")

    i = sub.add_parser("incoming", help="wait for one incoming migration")
    i.add_argument("uri")
    _add_guest_options(i, ram_default=None)
    i.add_argument("--verify", action="store_true",
                   help="hash memory and run the ab check before the guest resumes")
    i.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the source to connect")

    ld = sub.add_parser("load", help="load a migration stream file and report its sections")
    ld.add_argument("file")
    ld.add_argument("--machine", default=None, help="machine profile (default: from the stream)")
    ld.add_argument("--vcpus", type=int, default=1)
    ld.add_argument("--mem-path", metavar="PATH", help="also write the RAM image to PATH")
    ld.add_argument("--json", metavar="FILE")

    # Commands whose options live with their code (engine/commands/<name>.py:
    # add_arguments(parser) and run(args)).
    for name, help_text in _MODULE_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        _command_module(name).add_arguments(p)
    return ap


#: subcommand -> help; each is engine/commands/<name>.py with add_arguments() and run()
_MODULE_COMMANDS = {
    "vm": "run one guest with a QMP monitor, like qemu-system (-S, --incoming, --qmp)",
    "info": "ask a running engine vm over QMP and print like HMP 'info migrate'",
    "stress": "run a seeded matrix of migrations with injected faults (CI)",
}


#: commands that start vCPUs, workers or a fault handler
_SPAWNING = frozenset({"migrate", "incoming", "vm", "stress"})


def _command_module(name: str):
    import importlib
    return importlib.import_module(f"engine.commands.{name}")


class Terminated(SystemExit):
    """SIGTERM, turned into an exception so every ``finally`` still cleans up."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
