"""``engine vm``: one guest with a QMP monitor, driven like qemu-system.

::

    engine vm --ram 1G --workload ab --qmp unix:/tmp/src.qmp
    engine vm --ram 1G --workload ab --qmp unix:/tmp/dst.qmp --incoming defer

The guest options are ``engine migrate``'s.  As with qemu-system, ``-S``
leaves the guest in ``prelaunch`` until ``cont``; ``--incoming URI``
listens at once and ``--incoming defer`` waits for ``migrate-incoming``,
both starting in ``inmigrate``.  Migrations are then driven over QMP
(``migrate``, ``query-migrate``, events ...).  The process ends on
``quit``, SIGTERM or SIGINT (exit status 0, as QEMU), or when an incoming
migration fails (status 1, QEMU's exit-on-error); every migration, worker
process and shared-memory segment goes with it.
"""
from __future__ import annotations

import sys

from engine.commands.args import EXIT_FAILED, EXIT_OK
from engine.commands.args import add_guest_options as _add_guest_options
from engine.errors import Terminated
from engine.commands.common import options_from, profile_and_ram_id, workload_spec, write_json
from engine.errors import ConfigError

#: seconds the migrations get to end when the VM stops
CLOSE_SECONDS = 30.0


def add_arguments(parser) -> None:
    _add_guest_options(parser, ram_default="128M")       # QEMU's default -m
    parser.add_argument("--qmp", required=True, metavar="unix:PATH|tcp:HOST:PORT",
                        help="serve QMP there (several clients may connect)")
    parser.add_argument("-S", dest="start_paused", action="store_true",
                        help="do not start the guest (prelaunch) until 'cont'")
    parser.add_argument("--incoming", metavar="URI|defer",
                        help="wait for an incoming migration on URI, or for "
                             "migrate-incoming with 'defer'")


def run(args) -> int:
    from engine.qmp.commands import Commands
    from engine.qmp.machine import Machine
    from engine.qmp.server import QMPServer
    from engine.ram.guest import Guest
    from engine.transport import parse_uri

    # Refuse what can be refused before anything starts.
    options = options_from(args, monitor=True)
    profile, ram_id = profile_and_ram_id(args)
    workload = workload_spec(args, "ab")
    if args.vcpus < 0:
        raise ConfigError("--vcpus must be >= 0")
    if args.incoming is not None and args.incoming != "defer":
        parse_uri(args.incoming)
    server: QMPServer | None = None
    machine: Machine | None = None
    guest = Guest.create([(ram_id, args.ram, args.mem_path)], vcpus=args.vcpus,
                         workload=workload, start=False,
                             prealloc=args.prealloc)
    try:
        machine = Machine(guest, profile, options, vcpus=args.vcpus,
                          incoming=args.incoming, start_paused=args.start_paused,
                          postcopy_faults=args.postcopy_faults, workload=workload.name,
                          uuid=args.uuid)
        server = QMPServer(args.qmp, Commands(machine))
        machine.emit = server.emit
        server.start()
        if not args.quiet:
            print(f"qmp listening on {server.uri}", flush=True)
        try:
            while not machine.shutdown_requested.wait(0.5):
                pass
            code, reason = machine.exit_code, machine.shutdown_reason
        except (KeyboardInterrupt, Terminated) as exc:
            # QEMU: "terminating on signal N", SHUTDOWN host-signal, exit 0.
            signum = exc.code - 128 if isinstance(exc, Terminated) else 2
            print(f"engine vm: terminating on signal {signum}", file=sys.stderr)
            code, reason = EXIT_OK, "host-signal"
        server.quiesce()
        server.emit("SHUTDOWN", {"guest": False, "reason": reason})
        machine.close(CLOSE_SECONDS)
        write_json(args.json, {"status": machine.query_status(),
                               "migration": machine.query_migrate()})
        return code if code in (EXIT_OK, EXIT_FAILED) else EXIT_FAILED
    finally:
        if server is not None:
            server.close()
        if machine is not None:
            machine.close(CLOSE_SECONDS)    # idempotent; here for error paths
        guest.close()
