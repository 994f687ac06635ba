"""Pieces shared by the subcommands: options, guests, progress, reports."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import TextIO

from engine.commands.args import EXIT_FAILED, EXIT_MISMATCH, EXIT_OK, EXIT_USAGE
from engine.errors import InvalidCapabilityError
from engine.machine import MachineProfile, get_profile
from engine.migration.checks import check_multifd_transport
from engine.options import MigrationOptions, check_implemented, options_from_args

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_MISMATCH", "options_from",
           "check_multifd_transport", "workload_spec", "profile_and_ram_id", "write_json",
           "json_values", "ab_summary", "Progress", "EtaCountdown", "format_eta",
           "format_progress", "progress_fields"]


def options_from(args, *, monitor: bool = False) -> MigrationOptions:
    """Validated options: the machine profile's compat settings, then the
    user's ``--global``, ``--cap`` and ``--param``.  Without a ``monitor`` (QMP)
    refuses what a command-line run cannot honour."""
    machine = getattr(args, "machine", None)
    base = get_profile(machine).default_options() if machine else MigrationOptions.default()
    options = options_from_args(args.cap, args.param, base, getattr(args, "globals_", ()))
    check_implemented(options)
    if not monitor and options.cap("pause-before-switchover"):
        raise InvalidCapabilityError(
            "pause-before-switchover", "needs a monitor to send migrate-continue; "
            "use the library (SourceMigration.migrate_continue)")
    return options


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


MIB = 1 << 20
"""Bytes per MiB: the progress display's unit (rates in MiB/s)."""

#: statuses in which a migration still has somewhere to go
_RUNNING = frozenset({"setup", "wait-unplug", "active", "pre-switchover", "device",
                      "postcopy-device", "postcopy-active", "postcopy-paused",
                      "postcopy-recover-setup", "postcopy-recover", "cancelling"})
#: statuses in which the ETA means something (RAM is moving)
_ESTIMATED = frozenset({"active", "device", "postcopy-device", "postcopy-active"})


class EtaCountdown:
    """Seconds left, as a countdown that never goes up.

    A plain ``remaining / bandwidth`` runs backwards whenever the guest
    dirties memory faster than it was sent: remaining grows, and the
    estimate with it.  This one follows these rules:

    1. The estimate is ``remaining / (bandwidth - dirty_rate)`` (bytes and
       bytes/s), when ``bandwidth > dirty_rate``.  Otherwise the migration
       cannot converge at these rates: the answer is ``None`` (shown "--")
       and the countdown is forgotten.
    2. With no countdown running (the first estimate, or the first after a
       "--") the estimate is taken as it is.
    3. After that the value is ``min(estimate, previous value - seconds
       elapsed)``: a falling estimate is followed at once; one that jumps up
       is not, the previous value goes on counting down in real time until
       the estimate meets it.
    4. A value at or below 0 while the migration still runs is ``None``
       ("--"): the countdown was wrong, it is forgotten, and the next
       estimate starts a new one.

    So between two "--" the values returned never increase.  Call
    :meth:`update` with each new measurement; ``now`` is in seconds on any
    clock that does not go backwards.
    """

    def __init__(self) -> None:
        self._value: float | None = None
        self._at = 0.0

    @staticmethod
    def estimate(remaining: float, bandwidth: float, dirty_rate: float) -> float | None:
        """Rule 1 alone: seconds, or ``None`` when it cannot converge."""
        net = bandwidth - dirty_rate
        if bandwidth <= 0 or net <= 0:
            return None
        return max(remaining, 0) / net

    def update(self, now: float, remaining: float, bandwidth: float,
               dirty_rate: float = 0.0) -> float | None:
        """The value to show at ``now``, in seconds, or ``None`` for "--"."""
        est = self.estimate(remaining, bandwidth, dirty_rate)
        if est is None:
            self._value = None
            return None
        if self._value is None:
            value = est
        else:
            value = min(est, self._value - (now - self._at))
        if value <= 0:
            self._value = None
            return None
        self._value, self._at = value, now
        return value

    def reset(self) -> None:
        """Forget the countdown (the migration is not estimating any more)."""
        self._value = None


def format_eta(seconds: float | None) -> str:
    """``--``, ``7s``, ``1m05s``, ``2h03m``; seconds are rounded up, so a
    countdown shows 1s until it is over, never 0s."""
    if seconds is None:
        return "--"
    s = math.ceil(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# Fields in display order, and which go first when the terminal is narrow:
# the status, what is left and the ETA stay.  All seven fit in 100 columns,
# all but 'sent' in 80.
_DROP_ORDER = ("sent", "pass", "dirty", "throughput", "throttle")


def _num(x: float, width: int) -> str:
    """``x`` in ``width`` characters: one decimal while it fits, else none."""
    text = f"{x:{width}.1f}"
    return text if len(text) <= width else f"{x:{width}.0f}"


def progress_fields(sample, eta: float | None, warning: str | None = None) -> dict[str, str]:
    """The display's fields for one :class:`~engine.telemetry.Sample`, in order.

    Fixed widths, so that the line does not shift as the numbers change:
    sizes in MiB, rates in MiB/s, the dirty rate shown only while the
    source's vCPUs run (0 after the switchover).  auto-converge's throttle
    and a *warning* (a stalled precopy) are added while there are any.
    """
    dirty = sample.dirty_rate if sample.guest_running_here else 0.0
    done = sample.status == "completed"
    fields = {
        "status": f"{sample.status:<10}",
        "pass": f"pass {sample.passes:>2}",
        "sent": f"sent {_num(sample.transferred / MIB, 6)} MiB",
        "remaining": f"left {_num(sample.remaining / MIB, 6)} MiB",
        "throughput": f"{_num(sample.throughput / MIB, 5)} MiB/s",
        "dirty": f"dirty {_num(dirty / MIB, 5)} MiB/s",
        "eta": f"ETA {'done' if done else format_eta(eta):>5}",
    }
    if getattr(sample, "throttle", 0):
        fields["throttle"] = f"throttle {sample.throttle:>2}%"
    if warning:
        fields["warning"] = warning
    return fields


def format_progress(sample, eta: float | None, width: int = 120,
                    warning: str | None = None) -> str:
    """One line of at most ``width - 1`` characters (the last column is
    left free: a line that fills it wraps on some terminals, and a wrapped
    line cannot be redrawn with a carriage return)."""
    fields = progress_fields(sample, eta, warning)
    line = "  ".join(fields.values())
    for name in _DROP_ORDER:
        if len(line) < width:
            break
        fields.pop(name, None)
        line = "  ".join(fields.values())
    return line[:max(width - 1, 0)]


class Progress:
    """A one-line live status on stderr, only when stderr is a terminal.

    Feed it samples (it is a :class:`~engine.telemetry.MigrationSampler`
    ``on_sample`` listener): it redraws the line in place at most every
    ``refresh`` seconds, and at once when the status changes.  Status names
    are QEMU's; sizes in MiB, rates in MiB/s; the ETA is an
    :class:`EtaCountdown`, fed the sampler's throughput and, while the
    source's vCPUs run, QEMU's dirty-page rate.  Leaving the ``with`` block
    erases the line.  A write that fails (the terminal went away) turns the
    display off instead of failing the migration.
    """

    def __init__(self, quiet: bool, *, stream: TextIO | None = None, refresh: float = 0.2):
        self.stream = stream if stream is not None else sys.stderr
        self.refresh = refresh
        self.enabled = not quiet and _isatty(self.stream)
        self.eta = EtaCountdown()
        self._drawn_at: float | None = None
        self._drawn_status: str | None = None
        self.last_line: str | None = None
        #: a short warning shown at the end of the line (a stalled precopy)
        self.warning: str | None = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self.last_line is not None:
            self._write("\r\033[K")

    def update(self, sample) -> None:
        """Take a sample; redraw if it is time to."""
        if sample.status in _ESTIMATED:
            dirty = sample.dirty_rate if sample.guest_running_here else 0.0
            eta = self.eta.update(sample.t, sample.remaining, sample.throughput, dirty)
        else:
            self.eta.reset()
            eta = None
        if not self.enabled or sample.status == "none":
            return
        due = (self._drawn_at is None or sample.status != self._drawn_status
               or sample.t - self._drawn_at >= self.refresh)
        if not due:
            return
        self._drawn_at, self._drawn_status = sample.t, sample.status
        self.last_line = format_progress(sample, eta, _columns(self.stream), self.warning)
        self._write("\r\033[K" + self.last_line)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return 80
