"""Pieces shared by the subcommands: options, guests, progress, reports."""
from __future__ import annotations

import json
import sys
import threading
from typing import Callable

from engine.errors import ConfigError
from engine.machine import MachineProfile, get_profile
from engine.options import MigrationOptions, options_from_args


def options_from(args) -> MigrationOptions:
    """Validated options; refuses what a command-line run cannot honour."""
    from engine.errors import InvalidCapabilityError
    from engine.migration import check_implemented
    options = options_from_args(args.cap, args.param)
    check_implemented(options)
    if options.cap("pause-before-switchover"):
        raise InvalidCapabilityError(
            "pause-before-switchover", "needs a monitor to send migrate-continue; "
            "use the library (SourceMigration.migrate_continue)")
    return options


def check_multifd_transport(options: MigrationOptions, address) -> None:
    """QEMU: multifd needs a socket transport (file: only with mapped-ram)."""
    from engine.transport import TcpAddress, UnixAddress
    if options.cap("multifd") and not isinstance(address, (TcpAddress, UnixAddress)):
        raise ConfigError(f"multifd needs a socket transport (tcp: or unix:), "
                          f"not {address.uri}")


def workload_spec(args, default: str):
    from engine.ram.workloads import WorkloadSpec
    name = args.workload or default
    return WorkloadSpec(name, dirty_rate_mbps=args.dirty_rate, hot_set=args.hot_set)


def profile_and_ram_id(args) -> tuple[MachineProfile, str]:
    profile = get_profile(args.machine)
    return profile, args.ram_id or profile.default_ram_id


def write_json(path: str | None, obj: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")


def json_values(values: dict) -> dict:
    """Device values for a JSON report: C strings as text, arrays as lists."""
    out = {}
    for k, v in values.items():
        if isinstance(v, (bytes, bytearray, memoryview)):
            v = bytes(v).split(b"\0", 1)[0].decode(errors="replace")
        elif isinstance(v, dict):
            v = json_values(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def ab_summary(result) -> dict | None:
    if result is None:
        return None
    return {"ok": bool(result.ok), "bad_pages": int(result.bad_pages),
            "first_bad": [list(map(int, t)) for t in result.first_bad],
            "edges": [int(e) for e in result.edges]}


class Progress:
    """A one-line live status on stderr, only when stderr is a terminal."""

    def __init__(self, info: Callable[[], object], quiet: bool, period: float = 0.5):
        self.info, self.period = info, period
        self.enabled = not quiet and sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def _loop(self):
        while not self._stop.wait(self.period):
            q = self.info().to_qmp()
            ram = q.get("ram") or {}
            line = (f"{q['status']:>10}  pass {ram.get('dirty-sync-count', 0):>3}  "
                    f"sent {ram.get('transferred', 0) / 2**20:9.1f} MiB  "
                    f"remaining {ram.get('remaining', 0) / 2**20:8.1f} MiB  "
                    f"{ram.get('mbps', 0.0):8.1f} mbps  "
                    f"dirty {ram.get('dirty-pages-rate', 0):>7} pages/s")
            sys.stderr.write("\r\033[K" + line)
            sys.stderr.flush()
