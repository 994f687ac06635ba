"""Command-line argument types and the options every guest-running command shares.

Each type refuses a bad value while argparse parses, so the refusal is a
usage error (exit status 2) naming the option as typed, and comes before
any process, segment or file exists.  Numbers are read as QEMU reads them:
ASCII digits only (Python's ``int()`` and ``float()`` also take Arabic-Indic
or fullwidth digits and underscores, which QEMU's qemu_strtoi refuses), and
never NaN or infinite.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import uuid as uuidlib

from engine.errors import ConfigError
from engine.options import check_parameter, parse_cap_arg, parse_param_arg, parse_size

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISMATCH = 0, 1, 2, 3
"""Exit statuses: success, a failed run, a refused command line, a
destination whose memory does not match the source's."""

MAX_VCPUS_PER_CPU = 4
"""Each vCPU is a process: a host runs at most this many per CPU it has."""


def max_vcpus() -> int:
    """The largest ``--vcpus`` this host accepts: 4 per host CPU, at least 8."""
    return max(8, MAX_VCPUS_PER_CPU * (os.cpu_count() or 1))


_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def _ascii_int(text: str) -> int:
    if not _INT.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}: expected ASCII digits")
    return int(text)


def _ascii_float(text: str) -> float:
    # Also refuses 'nan', 'inf' and 'infinity', which float() takes.
    if not _FLOAT.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(
            f"invalid number {text!r}: expected ASCII digits, e.g. 1.5")
    value = float(text)
    if not math.isfinite(value):        # '1e999' overflows to inf
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: not finite")
    return value


def integer(lo: int | None = None, hi: int | None = None, *, hint: str = ""):
    """An argparse type: an integer in ``[lo, hi]`` (either bound optional)."""
    def parse(text: str) -> int:
        value = _ascii_int(text)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if hi is None:
                want = f">= {lo}"
            elif lo is None:
                want = f"<= {hi}"
            else:
                want = f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {want}{hint}")
        return value
    parse.__name__ = "integer"
    return parse


def number(lo: float = 0.0, hi: float | None = None, *, lo_open: bool = False):
    """An argparse type: a finite number ``>= lo`` (``> lo`` with ``lo_open``)
    and ``<= hi``."""
    def parse(text: str) -> float:
        value = _ascii_float(text)
        if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
            want = f"{'>' if lo_open else '>='} {lo:g}"
            if hi is not None:
                want += f" and <= {hi:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {want}")
        return value
    parse.__name__ = "number"
    return parse


#: seconds of a timeout: finite and positive
seconds = number(0.0, lo_open=True)


def size(text: str) -> int:
    """A size in bytes with QEMU's suffixes (512M, 1G)."""
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def uuid(text: str) -> bytes:
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid UUID {text!r}: expected 8-4-4-4-12 hex digits") from None


def uri(text: str) -> str:
    """A migration URI; only emptiness is refused here (the transport parses it)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty URI: expected tcp:, unix:, file:, exec: or fd:")
    return text


def output_file(text: str) -> str:
    """A file a report will be written to at the end of the run: refused now
    if it could not be (a directory, or in a folder that does not exist),
    rather than after a migration that then fails to report."""
    if not text:
        raise argparse.ArgumentTypeError("empty file name")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(
            f"cannot write {text!r}: directory {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {folder!r} is not writable")
    return text


def cap_arg(text: str) -> str:
    """``--cap NAME=on|off``: a known capability and a boolean (the whole
    set is checked once all are known)."""
    try:
        parse_cap_arg(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def param_arg(text: str) -> str:
    """``--param NAME=VALUE``: a known parameter and a value of its type and
    range (the rules between parameters are checked once all are known)."""
    try:
        name, value = parse_param_arg(text)
        check_parameter(name, value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_guest_options(p: argparse.ArgumentParser, *, ram_default: str | None) -> None:
    """The options of a command that runs a guest (migrate, incoming, vm)."""
    p.add_argument("--ram", type=size, default=size(ram_default) if ram_default else None,
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
    p.add_argument("--uuid", type=uuid, default=None, metavar="UUID",
                   help="the VM's UUID, as QEMU's -uuid: multifd channels carry it, and "
                        "with validate-uuid the destination checks it")
    add_vcpus_option(p)
    p.add_argument("--workload", default=None, choices=("none", "ab", "random"))
    p.add_argument("--dirty-rate", type=number(0.0), default=64.0, metavar="MB/s",
                   help="ab and random workloads: guest dirty rate in MiB/s "
                        "(0: as fast as the vCPUs go)")
    p.add_argument("--hot-set", type=number(0.0, 1.0, lo_open=True), default=1.0,
                   metavar="FRACTION",
                   help="random workload: fraction of pages taking 90%% of writes, in (0, 1]")
    p.add_argument("--global", dest="globals_", action="append", default=[],
                   metavar="migration.PROPERTY=VALUE",
                   help="a migration object property, as QEMU's -global (e.g. "
                        "migration.multifd-flush-after-each-section=on to speak QEMU "
                        "7.2's multifd dialect; --machine none-7.2 implies it)")
    p.add_argument("--cap", type=cap_arg, action="append", default=[], metavar="NAME=on|off")
    p.add_argument("--param", type=param_arg, action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--json", type=output_file, metavar="FILE",
                   help="write the final report as JSON")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--postcopy-faults", default="auto",
                   choices=("auto", "userfaultfd", "software"),
                   help="postcopy on the destination: how missing pages are caught "
                        "(auto: userfaultfd when this host has it, else software)")


def add_vcpus_option(p: argparse.ArgumentParser, default: int | None = 1,
                     help: str | None = None) -> None:
    limit = max_vcpus()
    p.add_argument("--vcpus", type=integer(0, limit, hint=" (4 per host CPU, at least 8)"),
                   default=default, metavar="N",
                   help=help or f"vCPUs, each a process (0: none; at most {limit} on this "
                                f"host: {MAX_VCPUS_PER_CPU} per CPU, at least 8)")
