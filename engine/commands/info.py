"""``engine info``: ask a running ``engine vm`` (or QEMU) over QMP, print like HMP.

``engine info migrate --qmp unix:PATH`` prints what QEMU 7.2's ``info
migrate`` prints (the capabilities line, then the migration); ``status``
prints ``info status``; ``migrate_capabilities`` and
``migrate_parameters`` the matching HMP listings.
"""
from __future__ import annotations

import sys

from engine.commands.args import EXIT_FAILED, EXIT_OK, seconds, uri

#: HMP's 'info status' words for QMP run states that print differently
_STATUS_WORDS = {"running": "running", "paused": "paused", "prelaunch": "paused (prelaunch)",
                 "inmigrate": "paused (inmigrate)", "postmigrate": "paused (postmigrate)",
                 "finish-migrate": "paused (finish-migrate)", "shutdown": "paused (shutdown)"}


def add_arguments(parser) -> None:
    parser.add_argument("what", choices=("migrate", "status", "migrate_capabilities",
                                         "migrate_parameters"),
                        help="what to show, as HMP's 'info' subcommands")
    parser.add_argument("--qmp", type=uri, required=True, metavar="unix:PATH|tcp:HOST:PORT",
                        help="the monitor to ask")
    parser.add_argument("--timeout", type=seconds, default=10.0, metavar="SECONDS",
                        help="seconds to wait for the monitor's answers (finite, > 0)")


def run(args) -> int:
    from engine.qmp.client import QMPClient
    from engine.qmp.errors import QMPError
    from engine.stats import MigrationInfo, format_info_migrate

    try:
        with QMPClient(args.qmp, timeout=args.timeout) as qmp:
            if args.what == "migrate":
                caps = {c["capability"]: c["state"]
                        for c in qmp.execute("query-migrate-capabilities")}
                info = MigrationInfo.from_qmp(qmp.execute("query-migrate"))
                sys.stdout.write(format_info_migrate(info, caps))
            elif args.what == "status":
                st = qmp.execute("query-status")["status"]
                print(f"VM status: {_STATUS_WORDS.get(st, f'paused ({st})')}")
            elif args.what == "migrate_capabilities":
                for c in qmp.execute("query-migrate-capabilities"):
                    print(f"{c['capability']}: {'on' if c['state'] else 'off'}")
            else:
                for name, value in qmp.execute("query-migrate-parameters").items():
                    print(f"{name}: {_param_text(value)}")
    except QMPError as exc:
        print(f"engine: error: {exc.desc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _param_text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)
