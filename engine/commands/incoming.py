"""``engine incoming URI``: a destination that loads one migration."""
from __future__ import annotations

import sys

from engine.commands.args import EXIT_FAILED, EXIT_MISMATCH, EXIT_OK
from engine.commands.common import (ab_summary, check_multifd_transport, json_values,
                                    options_from, profile_and_ram_id,
                                    workload_spec, write_json)
from engine.errors import ConfigError


def run_incoming(args) -> int:
    """Listen, load one migration, report it.

    ``--timeout`` bounds both waits on the source: for it to connect, and,
    in postcopy, for a recovery after its channel broke.  Nobody can send
    this process migrate-recover (it has no monitor), so without
    ``--timeout`` a paused postcopy is given up at once, reported as
    postcopy-paused with the reason; the source cannot resume it either.
    """
    from engine.migration.channels import NULL_UUID, accept_channels
    from engine.migration.destination import DestinationMigration
    from engine.ram.guest import Guest
    from engine.stats import format_info_migrate
    from engine.transport import listen, parse_uri

    options = options_from(args)
    profile, ram_id = profile_and_ram_id(args)
    workload = workload_spec(args, "none")
    address = parse_uri(args.uri)
    check_multifd_transport(options, address)
    if args.vcpus < 0:
        raise ConfigError("--vcpus must be >= 0")
    guest = None
    made: list = []

    def factory(announced):
        blocks = [(b.idstr, b.used_length, args.mem_path if i == 0 else None)
                  for i, b in enumerate(announced.blocks)]
        g = Guest.create(blocks, vcpus=args.vcpus, workload=workload, start=False,
                             prealloc=args.prealloc)
        made.append(g)
        return g

    try:
        if args.ram is not None:
            guest = Guest.create([(ram_id, args.ram, args.mem_path)], vcpus=args.vcpus,
                                 workload=workload, start=False,
                             prealloc=args.prealloc)
            made.append(guest)
        mig = DestinationMigration(profile, options, guest=guest,
                                   guest_factory=None if guest else factory,
                                   vcpus=args.vcpus, verify=args.verify,
                                   ab_check=args.verify and workload.name == "ab",
                                   postcopy_faults=args.postcopy_faults, uuid=args.uuid,
                                   pause_timeout=args.timeout or 0.0)
        try:
            mig.prepare()            # multifd workers start before anyone connects
            with listen(address) as listener:
                print(f"listening on {listener.uri}", flush=True)
                n = int(options.param("multifd-channels")) if mig.multifd else 0
                channel, multifd = accept_channels(listener, n, timeout=args.timeout,
                                                   uuid=args.uuid or NULL_UUID)
                # The listener stays open while loading only for postcopy's
                # preempt channel, which connects when postcopy starts.
                keep = listener if options.cap("postcopy-preempt") else None
                if keep is None:
                    listener.close()
                with channel:
                    info = mig.run(channel, multifd, listener=keep)
        finally:
            mig.close()     # workers and received bitmaps, however it ended
        if not args.quiet:
            print(format_info_migrate(info))
            for name, values in mig.devices_loaded.items():
                print(f"device {name}: {json_values(values)}")
        for warning in mig.warnings:
            print(f"engine: warning: {warning}", file=sys.stderr)
        if info.status != "completed" and info.error_desc:
            # --quiet silences the report, never the reason for a failure.
            print(f"engine: error: {info.error_desc}", file=sys.stderr)
        report = {
            "migration": info.to_qmp(),
            "configuration": {"machine": mig.configuration.machine} if mig.configuration else None,
            "devices": {k: json_values(v) for k, v in mig.devices_loaded.items()},
            "pages": mig.pages, "zero_pages": mig.zero_pages,
            "xbzrle_pages": getattr(mig.ram, "xbzrle_pages", 0),
            "multifd_pages": mig.multifd_pages[0], "multifd_zero_pages": mig.multifd_pages[1],
            "verification": {"digests": mig.digests, "ab": ab_summary(mig.ab_result)},
        }
        write_json(args.json, report)
        if info.status != "completed":
            return EXIT_FAILED
        if mig.ab_result is not None and not mig.ab_result.ok:
            return EXIT_MISMATCH
        return EXIT_OK
    finally:
        for g in made:
            g.close()
