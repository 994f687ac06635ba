"""``engine migrate``: a live guest to a local destination (or to ``--to URI``).

With no ``--to`` this starts a destination process (``engine incoming``) on
this host, migrates the source guest to it, and checks the result: the
destination hashes its memory the moment loading ends (before its vCPUs run)
and the source hashes its own at switchover (vCPUs stopped); the two must be
equal, and on an `ab` guest the destination's pattern must pass QEMU's check.

On a terminal a progress line on stderr follows the migration (status, pass,
MiB sent and left, throughput, dirty rate, ETA); ``--plot FILE.png`` draws
the same samples once it is over, whatever the outcome.  Both read one
:class:`~engine.telemetry.MigrationSampler`, which polls ``query-migrate``
from its own thread and is woken by the status and pass hooks.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib

from engine.commands.args import EXIT_FAILED, EXIT_MISMATCH, EXIT_OK
from engine.commands.common import (Progress, check_multifd_transport, options_from,
                                    profile_and_ram_id, workload_spec, write_json)
from engine.errors import ChannelError, ConfigError, MigrationError
from engine.trace import trace

#: how long to wait for the local destination to start listening
DESTINATION_START_SECONDS = 60
#: how long the local destination may take to exit at each step of kill()
DESTINATION_EXIT_SECONDS = 10
#: after an interrupt, how long the destination gets to fail by itself before
#: it is told to (its source is gone: it only has to notice, and failing on
#: its own is its clean path; a SIGINT may land in its cleanup)
INTERRUPTED_GRACE_SECONDS = 3.0


#: a line of engine.trace output: pid@seconds:event
_TRACE_LINE = re.compile(r"^\d+@\d+\.\d+:\w")


class LocalDestination:
    """An ``engine incoming`` child process and what it reports."""

    def __init__(self, args, uri: str, workdir: str, pass_fds=()):
        self.report_path = os.path.join(workdir, "destination.json")
        cmd = [sys.executable, "-m", "engine", "incoming", uri,
               "--machine", args.machine, "--ram", str(args.ram),
               "--vcpus", str(args.vcpus), "--workload", args.workload or "ab",
               "--dirty-rate", str(args.dirty_rate), "--hot-set", str(args.hot_set),
               "--json", self.report_path, "--quiet",
               "--postcopy-faults", args.postcopy_faults]
        if not args.no_verify:
            cmd.append("--verify")
        if args.prealloc:
            cmd.append("--prealloc")
        if args.ram_id:
            cmd += ["--ram-id", args.ram_id]
        if args.uuid is not None:
            cmd += ["--uuid", str(uuidlib.UUID(bytes=args.uuid))]  # the same VM
        if args.dst_mem_path:
            cmd += ["--mem-path", args.dst_mem_path]
        for c in args.cap:
            cmd += ["--cap", c]
        for p in args.param:
            cmd += ["--param", p]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, pass_fds=pass_fds,
                                     start_new_session=True)
        self.uri: str | None = None
        self._ready = threading.Event()
        self._out: list[str] = []
        self._err: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self):
        assert self.proc.stdout is not None     # Popen(stdout=PIPE)
        for line in self.proc.stdout:
            self._out.append(line)
            if line.startswith("listening on "):
                self.uri = line.split(" ", 2)[2].strip()
                self._ready.set()
        self._ready.set()

    def _read_stderr(self):
        assert self.proc.stderr is not None     # Popen(stderr=PIPE)
        for line in self.proc.stderr:
            if _TRACE_LINE.match(line):
                # The destination's trace points join ours, as they happen.
                sys.stderr.write(line)
                sys.stderr.flush()
                continue
            self._err.append(line)

    def wait_listening(self) -> str:
        if not self._ready.wait(DESTINATION_START_SECONDS) or self.uri is None:
            self.kill()
            raise MigrationError("local destination did not start: " + self.stderr())
        return self.uri

    def stderr(self) -> str:
        return "".join(self._err).strip()

    def finish(self, timeout: float = 120) -> tuple[int, dict | None]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.returncode
        try:
            with open(self.report_path) as f:
                return rc, json.load(f)
        except (OSError, ValueError):
            return rc, None

    def kill(self, grace: float = DESTINATION_EXIT_SECONDS) -> None:
        """Make sure the destination has exited, and has cleaned up after itself.

        It gets *grace* seconds to end on its own (once the source has
        closed the channel it is failing already), then a SIGINT, which it
        handles like Ctrl-C: its guest is closed, its vCPUs reaped and its
        segments unlinked.  SIGTERM would kill it on the spot and leave all
        that to the resource tracker; SIGKILL is the last resort.
        """
        steps = ((None, grace), (signal.SIGINT, DESTINATION_EXIT_SECONDS), (signal.SIGKILL, None))
        if self.proc.poll() is None:
            # A stopped destination (SIGSTOP, a debugger) must run to notice
            # that its source is gone, and to clean up after itself.
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
        for sig, wait in steps:
            if self.proc.poll() is not None:
                return
            if sig is not None:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass


class _PausedWatcher:
    """A postcopy that pauses (a channel broke) cannot be recovered from
    here: this command has no monitor to send migrate-recover to the
    destination.  Rather than wait forever, give it up with the reason."""

    def __init__(self, mig, dest):
        self.mig, self.dest = mig, dest
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        from engine.state import MigrationStatus as S
        while not self._stop.wait(0.1):
            if self.mig.state.status is not S.POSTCOPY_PAUSED:
                continue
            cause = self.mig.pause_error
            if self.dest is not None and self.dest.proc.poll() is not None:
                why = f"the destination exited with code {self.dest.proc.returncode}"
            else:
                why = "engine migrate has no monitor to recover it (migrate-recover)"
            self.mig.abandon(f"{cause}; {why}")
            return



#: how long `engine migrate` waits, at most, for a live guest's vCPUs to be
#: writing before it starts (so that their rate before the migration is known)
WAIT_GUEST_WRITING_SECONDS = 3.0

def _connect_retry(uri: str, deadline: float):
    from engine.transport import connect
    while True:
        try:
            return connect(uri)
        except ChannelError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_migrate(args) -> int:
    from engine.migration.source import SourceMigration
    from engine.ram.guest import Guest
    from engine.stats import format_info_migrate
    from engine.transport import FileAddress, parse_uri

    # Everything that can be refused is refused before anything starts.
    options = options_from(args)
    profile, ram_id = profile_and_ram_id(args)
    workload = workload_spec(args, "ab")
    args.workload = workload.name
    if args.vcpus < 0:
        raise ConfigError("--vcpus must be >= 0")
    if args.to and args.uri:
        raise ConfigError("--to and --uri exclude each other")
    target = parse_uri(args.to) if args.to else None
    local = parse_uri(args.uri) if args.uri else None
    if local is not None and not isinstance(local, (FileAddress,)) and \
            local.uri.split(":", 1)[0] not in ("tcp", "unix"):
        raise ConfigError(f"--uri {args.uri}: a local destination takes tcp:, unix: or file:")
    chosen = target or local
    if chosen is not None:   # the default, a private unix socket, suits multifd
        check_multifd_transport(options, chosen)
    plot = getattr(args, "plot", None)
    if plot:
        _check_plot_path(plot)
    from engine.commands.converge import ConvergenceWatch, timeout_policy
    policy = timeout_policy(args, options)

    workdir = tempfile.mkdtemp(prefix="engine-migrate-")
    guest = dest = mig = sampler = watch = None
    connected = False   # whether the local destination has a source to lose
    try:
        if target is None and not isinstance(local, FileAddress):
            # The local destination starts while the source guest is made:
            # both are process start-ups, and neither needs the other yet.
            dest = LocalDestination(args, args.uri or
                                    f"unix:{os.path.join(workdir, 'migration.sock')}", workdir)
        trace("engine_migrate_start")
        guest = Guest.create([(ram_id, args.ram, args.mem_path)], vcpus=args.vcpus,
                             workload=workload, start=workload.name != "none",
                             prealloc=args.prealloc)
        if args.postcopy_after is not None and not options.cap("postcopy-ram"):
            raise ConfigError("--postcopy-after needs --cap postcopy-ram=on")
        if args.postcopy_after is not None and args.postcopy_after < 0:
            raise ConfigError("--postcopy-after must be >= 0")
        progress = Progress(args.quiet)
        # Watching from now on: the guest's own rate before the migration.
        watch = ConvergenceWatch(guest, policy, progress).start()
        if plot or progress.enabled:
            # One sampler feeds both the live line and the plot; made before
            # the migration so that its hooks mark statuses and passes
            # exactly, and so that a failure before the migration runs still
            # leaves a (blank) picture behind.
            from engine.telemetry import MigrationSampler
            sampler = MigrationSampler(lambda: _live_info(mig),
                                       on_sample=progress.update if progress.enabled else None)
        mig = SourceMigration(guest, profile, options, vcpus=args.vcpus,
                              postcopy_after=args.postcopy_after, uuid=args.uuid,
                              on_status=sampler.note_status if sampler else None,
                              on_pass=_both(sampler.note_pass if sampler else None,
                                            watch.note_pass))
        watch.attach(mig)
        mig.compute_digests = target is None and not args.no_verify
        if target is not None:
            mig.prepare()
            uri = target.uri
            channel = _connect_retry(uri, time.monotonic() + 10)
        elif isinstance(local, FileAddress):
            from engine.transport import connect
            uri = local.uri
            channel = connect(local)
        else:
            mig.prepare()            # multifd workers start while the destination does
            assert dest is not None     # made above for this case
            trace("engine_guest_ready")
            uri = dest.wait_listening()
            trace("engine_destination_listening", uri=uri)
            if args.vcpus and args.workload != "none":
                watch.wait_guest_writing(timeout=WAIT_GUEST_WRITING_SECONDS)
            channel = _connect_retry(uri, time.monotonic() + 10)
        connected = True
        watcher = _PausedWatcher(mig, dest)
        with channel, progress, sampler or contextlib.nullcontext(), watcher, watch:
            info = mig.run(channel, uri)
        # The source guest has served its purpose (its switchover digests are
        # taken): it goes while the destination finishes, not after.  A
        # Ctrl-C must not cut its close in two (a segment unlinked but still
        # registered with the resource tracker): it is held until the end.
        with _signals_held():
            guest.close()
            guest = None
        if isinstance(local, FileAddress) and info.status == "completed":
            dest = LocalDestination(args, local.uri, workdir)
        dest_rc, dest_report = dest.finish() if dest else (None, None)
        trace("engine_destination_exited", rc=dest_rc)
        # After postcopy the destination guest has been running (and writing)
        # since before its memory was complete: its memory is no longer the
        # source's at switchover, and the ab check is the proof.
        ran = _postcopied(mig) and args.vcpus > 0 and workload.name != "none"
        verification = _verify(mig, dest_rc, dest_report, ab=workload.name == "ab",
                               compare_memory=not ran)
        convergence = watch.report(mig.page_size)
        if not args.quiet:
            print(format_info_migrate(info))
            for line in verification["messages"] + [f"warning: {w}" for w in watch.warnings]:
                print(line)
        write_json(args.json, {"migration": info.to_qmp(), "verification": verification,
                               "destination": dest_report, "convergence": convergence,
                               "warnings": watch.warnings})
        if info.status != "completed":
            print(f"engine: migration {info.status}: {mig.error}", file=sys.stderr)
            if dest is not None and dest.stderr():
                print("destination: " + dest.stderr(), file=sys.stderr)
            return EXIT_FAILED
        if verification["ok"] is False:
            # --quiet silences the report, never the reason for a failure.
            print("engine: verification failed: " + "; ".join(verification["messages"]),
                  file=sys.stderr)
            return EXIT_MISMATCH
        return EXIT_OK
    finally:
        # Interrupted (Ctrl-C, SIGTERM): the destination has lost its source
        # and fails by itself at once, unless it is stopped; either way there
        # is no point waiting long for it.  A second Ctrl-C or SIGTERM while
        # cleaning up must not cut the cleanup short (processes, segments and
        # the work directory would be left behind): it is held until the end.
        interrupted = isinstance(sys.exc_info()[1], (KeyboardInterrupt, SystemExit))
        with _signals_held():
            if watch is not None:
                watch.stop()
            if mig is not None and mig.pool is not None:
                mig.pool.kill()
            if dest is not None:
                grace = DESTINATION_EXIT_SECONDS if connected else 0
                dest.kill(grace=min(grace, INTERRUPTED_GRACE_SECONDS) if interrupted
                          else grace)
            if guest is not None:
                guest.close()
                trace("engine_guest_closed")
            shutil.rmtree(workdir, ignore_errors=True)
            # Last: the processes and segments are released first, and what was
            # recorded is drawn whatever the outcome.
            if plot and sampler is not None:
                _write_plot(plot, sampler, args, mig)


def _both(first, second):
    """One hook calling two (``first`` may be None)."""
    if first is None:
        return second

    def hook(*a):
        first(*a)
        second(*a)
    return hook


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM noted instead of acted on for the duration (main
    thread only); one that came is raised afterwards, unless an exception
    is already on its way out (it ends the command the same way)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signums = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if held and sys.exc_info()[1] is None:
        signal.raise_signal(held[0])


def _check_plot_path(path: str) -> None:
    from engine.plot import require_matplotlib
    require_matplotlib()
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--plot {path}: directory {parent} does not exist")


def _live_info(mig):
    """``mig.info()``, with ``remaining`` counted now while in postcopy.

    The source refreshes ``remaining`` only between precopy iterations and
    at syncs, so in postcopy its figure stands still at the switchover's
    until the end; QEMU's (migration_dirty_pages) falls as pages go out.
    Counting the dirty bitmap (numpy, about 6 us per GiB of guest) once per
    sample costs the migration nothing it could measure.
    """
    from dataclasses import replace
    from engine.state import POSTCOPY_STATES, MigrationStatus as S
    info = mig.info()
    if info.ram is None or S(info.status) not in POSTCOPY_STATES:
        return info
    with mig.ram.lock:
        pending = mig.ram.pending_pages()
    return replace(info, ram=replace(info.ram, remaining=pending * mig.page_size))


def _write_plot(path: str, sampler, args, mig) -> None:
    """Draw what was recorded, whatever the outcome; a plot that cannot be
    written is reported, never allowed to hide the migration's own result."""
    from engine.plot import plot_timeline
    try:
        plot_timeline(sampler.timeline(), path, subtitle=_plot_subtitle(args, mig))
    except Exception as exc:    # noqa: BLE001 - matplotlib raises anything
        print(f"engine: could not write the plot {path}: {exc}", file=sys.stderr)


def _plot_subtitle(args, mig) -> str:
    guest = f"{args.vcpus} vCPU{'s' if args.vcpus != 1 else ''}, workload {args.workload}"
    if args.workload in ("ab", "random"):
        guest += " unthrottled" if not args.dirty_rate else f" at {args.dirty_rate:g} MiB/s"
    caps = ", ".join(mig.options.enabled_capabilities()) if mig is not None else ""
    parts = [guest, "caps: " + (caps or "none")]
    if args.param:
        parts.append("params: " + " ".join(args.param))
    if args.postcopy_after is not None:
        parts.append(f"postcopy after pass {args.postcopy_after}")
    return " | ".join(parts)


def _postcopied(mig) -> bool:
    from engine.state import MigrationStatus as S
    return any(status in (S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE)
               for _, status in mig.state.history)


def _verify(mig, dest_rc, dest_report, ab: bool, compare_memory: bool = True) -> dict:
    """Compare source memory at switchover with the destination's on arrival."""
    from engine.migration.verify import compare_digests
    out: dict = {"ok": None, "memory_equal": None, "ab": None, "messages": []}
    if dest_report is None:
        if dest_rc is not None:
            out["ok"] = False
            out["messages"].append(f"destination exited {dest_rc} without a report")
        return out
    if dest_report["migration"].get("status") != "completed":
        out["ok"] = False
        out["messages"].append("destination: " + str(dest_report["migration"].get("error-desc")))
        return out
    ver = dest_report.get("verification") or {}
    if not compare_memory:
        out["messages"].append("memory: not compared (the destination guest ran during "
                               "postcopy, before its memory was complete)")
    elif mig.switchover_digests is not None and ver.get("digests"):
        problems = compare_digests(mig.switchover_digests, ver["digests"])
        out["memory_equal"] = not problems
        out["messages"] += problems or ["memory: destination equals source at switchover "
                                        f"({len(ver['digests'])} block(s), sha256)"]
    if ab and ver.get("ab") is not None:
        out["ab"] = ver["ab"]
        out["messages"].append("ab check: " + ("passed" if ver["ab"]["ok"] else
                                               f"FAILED, {ver['ab']['bad_pages']} bad pages"))
    checks = [v for v in (out["memory_equal"], (out["ab"] or {}).get("ok")) if v is not None]
    out["ok"] = all(checks) if checks else None
    if dest_rc not in (0, None) and out["ok"]:
        out["ok"] = False
        out["messages"].append(f"destination exited {dest_rc}")
    return out
