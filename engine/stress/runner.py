"""One case from start to verdict, and a matrix of them within a time budget.

A case runs in this process with the library, as the end-to-end tests do:
a source :class:`~engine.ram.guest.Guest` and :class:`SourceMigration`, and
a destination that is either a :class:`DestinationMigration` with its own
guest (in a thread here) or, when the fault is to kill it, an ``engine
incoming`` process.  vCPUs, multifd workers and the postcopy fault handler
are real processes either way, started from this (the main) thread: a
child is tied to the thread that started it.

The runner then *supervises*: it pokes the fault trigger, recovers a
postcopy that both sides paused (``migrate-recover`` on the destination,
``resume`` on the source, as an operator would), gives up a paused postcopy
whose destination is gone (``abandon``), and calls a case hung if it is not
over within the case timeout.  Afterwards it observes both sides, tears
everything down, checks for leaks and hands the :class:`Observation` to
:func:`~engine.stress.verdict.classify`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import numpy as np
import psutil

from engine.errors import EngineError, StateError
from engine.library import make_options
from engine.machine import get_profile
from engine.migration.channels import accept_channels
from engine.migration.destination import DestinationMigration
from engine.migration.source import SourceMigration
from engine.migration.verify import compare_digests
from engine.options import MigrationOptions
from engine.ram.guest import Guest
from engine.ram.image import fill_mixed
from engine.ram.workloads import REG_CHUNKS, REG_PASSES, WorkloadSpec
from engine.state import MigrationStatus as S
from engine.stress import leaks
from engine.stress.faults import ChannelTap, Relay, Trigger
from engine.stress.matrix import Case
from engine.stress.verdict import Observation, Verdict, classify, expectation
from engine.transport import connect, listen

PROFILE = get_profile("engine")
#: the guests' RAM block
RAM_ID = PROFILE.default_ram_id
#: how long the checks after a case may wait for vCPUs to show progress (seconds)
PROGRESS_SECONDS = 10.0
#: recoveries tried per paused postcopy before the runner gives it up
MAX_RECOVERIES = 3
#: supervision period (seconds)
TICK = 0.02
#: faults that need the main channel to go through a relay
RELAYED = ("channel-dropped", "packet-corrupted", "silent-corruption")
#: how long a destination that never got a connection may wait after the
#: source ended, before it is stopped (seconds)
UNCONNECTED_GRACE = 5.0


@dataclass(frozen=True)
class Settings:
    """How cases run.  Sizes in bytes, rates in bytes/s, times in seconds."""

    ram: int = 32 << 20
    case_timeout: float = 90.0
    #: max-bandwidth (QEMU's default); well above the ab guest's dirty rate,
    #: so precopy converges
    bandwidth: int = 128 << 20
    #: max-postcopy-bandwidth until a recovery (then unlimited): postcopy
    #: lasts about a second, for a fault to land in
    postcopy_bandwidth: int = 32 << 20
    #: the ab guest's dirty rate, MiB/s (paced: two vCPUs must not take both cores)
    ab_dirty_rate: float = 32.0
    #: precopy's downtime-limit (ms) from the second pass on; the first pass
    #: runs with 1 ms, so that all of it is ``active`` (see case_options)
    downtime_limit: int = 300
    postcopy_faults: str = "auto"
    #: where sockets and reports go (default: a new temporary directory)
    workdir: str | None = None


@dataclass(frozen=True)
class CaseResult:
    case: Case
    verdict: Verdict
    detail: str
    seconds: float
    observation: Observation | None = None

    @property
    def good(self) -> bool:
        return self.verdict.good

    def to_dict(self) -> dict:
        return {"case": self.case.to_dict(), "verdict": self.verdict.value,
                "good": self.good, "detail": self.detail,
                "seconds": round(self.seconds, 3),
                "observation": self.observation.to_dict() if self.observation else None}


def case_options(case: Case, settings: Settings) -> MigrationOptions:
    """Capabilities and parameters of a case (both sides use the same)."""
    caps: dict = {"return-path": True}
    # A 1 ms downtime limit keeps the first pass from ending in a switchover
    # (a small guest would otherwise switch over after a third of it): the
    # first pass is the ``active`` moment a fault aims at.  Precopy raises
    # the limit after the first pass (_after_first_pass), so that it converges.
    params: dict = {"max-bandwidth": settings.bandwidth, "downtime-limit": 1}
    if case.channels:
        caps["multifd"] = True
        params["multifd-channels"] = case.channels
        params["multifd-compression"] = case.codec
    if case.postcopy:
        caps["postcopy-ram"] = True
        params["max-postcopy-bandwidth"] = settings.postcopy_bandwidth
    if case.mode == "postcopy-preempt":
        caps["postcopy-preempt"] = True
    if case.fault.kind == "cancel" and case.fault.moment == "pre-switchover":
        caps["pause-before-switchover"] = True
    return make_options(caps, params)


def _workload(case: Case, settings: Settings) -> tuple[WorkloadSpec, int]:
    if case.workload == "ab":
        return WorkloadSpec("ab", dirty_rate_mbps=settings.ab_dirty_rate), 2
    return WorkloadSpec("none"), 1


# ---------------------------------------------------------------------------
# Destinations


class InProcessDestination:
    """A DestinationMigration with its guest, loading in a thread."""

    def __init__(self, case: Case, settings: Settings, options: MigrationOptions,
                 uri: str):
        spec, vcpus = _workload(case, settings)
        self.guest = Guest.create([(RAM_ID, settings.ram)], vcpus=vcpus, workload=spec,
                                  start=False)
        try:
            self.mig = DestinationMigration(
                PROFILE, options, guest=self.guest, vcpus=vcpus, verify=True,
                ab_check=case.workload == "ab", postcopy_faults=settings.postcopy_faults)
            self.mig.prepare()
            self.workers = list(self.mig.pool.procs) if self.mig.pool is not None else []
            self.listener = listen(uri)
        except BaseException:
            with contextlib.suppress(Exception):
                self.mig.close()
            self.guest.close()
            raise
        self.uri = self.listener.uri
        self.channels = case.channels
        self.preempt = case.mode == "postcopy-preempt"
        self.error: str | None = None
        self._thread = threading.Thread(target=self._serve, name="stress-destination",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            main, multifd = accept_channels(self.listener, self.channels)
            if not self.preempt:
                self.listener.close()
            with main:
                self.mig.run(main, multifd, listener=self.listener if self.preempt else None)
        except BaseException as exc:    # noqa: BLE001 - reported in the observation
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.mig.close()

    @property
    def status(self) -> str:
        return self.mig.state.status.value

    @property
    def ended(self) -> bool:
        return not self._thread.is_alive()

    def kill_worker(self, index: int) -> str:
        proc = self.workers[index]
        proc.kill()
        return f"killed destination multifd worker {index} (pid {proc.pid})"

    def recover(self, uri: str) -> str:
        return self.mig.recover(uri)

    def join(self, timeout: float) -> bool:
        self._thread.join(max(0.0, timeout))
        return not self._thread.is_alive()

    def observe(self) -> dict:
        info = self.mig.info()
        return {"status": info.status, "error": info.error_desc or self.error,
                "running": self.guest.running if not self.guest.closed else False,
                "digests": self.mig.digests,
                "ab_ok": None if self.mig.ab_result is None else bool(self.mig.ab_result.ok),
                "ab_bad": None if self.mig.ab_result is None else
                int(self.mig.ab_result.bad_pages)}

    def pages(self) -> np.ndarray:
        return self.guest.blocks[0].pages

    def abort(self) -> None:
        self.listener.close()
        self.mig.close()

    def close(self) -> None:
        self.abort()
        self._thread.join(30)
        self.guest.close()


class ProcessDestination:
    """An ``engine incoming`` process: the destination a case can kill."""

    def __init__(self, case: Case, settings: Settings, options: MigrationOptions,
                 uri: str, workdir: str):
        spec, vcpus = _workload(case, settings)
        self.report_path = os.path.join(workdir, "destination.json")
        cmd = [sys.executable, "-m", "engine", "incoming", uri, "--ram", str(settings.ram),
               "--ram-id", RAM_ID, "--vcpus", str(vcpus), "--workload", spec.name,
               "--dirty-rate", str(settings.ab_dirty_rate), "--json", self.report_path,
               "--verify", "--quiet", "--postcopy-faults", settings.postcopy_faults,
               "--timeout", str(settings.case_timeout)]
        for name in sorted(options.enabled_capabilities()):
            if name != "pause-before-switchover":      # a source-side setting
                cmd += ["--cap", f"{name}=on"]
        if case.channels:
            cmd += ["--param", f"multifd-channels={case.channels}",
                    "--param", f"multifd-compression={case.codec}"]
        # It is killed with SIGKILL, so it cannot remove its temp directories
        # (a postcopy fault handler's, a multifd pool's): they go in the
        # case's workdir, which the runner removes, as it reaps the victims.
        tmp = os.path.join(workdir, "tmp")
        os.makedirs(tmp, exist_ok=True)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, env={**os.environ, "TMPDIR": tmp})
        self.killed = False
        self.victims: list[int] = []
        self._err: list[str] = []
        self._listening = threading.Event()
        self.uri = ""
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self._listening.wait(60) or not self.uri:
            self.close()
            raise EngineError("engine incoming did not start: " + "".join(self._err)[-500:])

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None     # Popen(stdout=PIPE)
        for line in self.proc.stdout:
            if line.startswith("listening on "):
                self.uri = line.split(" ", 2)[2].strip()
                self._listening.set()
        self._listening.set()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None     # Popen(stderr=PIPE)
        for line in self.proc.stderr:
            self._err.append(line)

    @property
    def status(self) -> str:
        rc = self.proc.poll()
        if rc is None:
            return "running"
        if self.killed:
            return "killed"
        return self._report().get("status", "failed" if rc else "completed")

    @property
    def ended(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> str:
        """SIGKILL, no chance to clean up; its descendants must die on their own."""
        with contextlib.suppress(psutil.Error):
            self.victims = [p.pid for p in
                            psutil.Process(self.proc.pid).children(recursive=True)]
        self.killed = True
        self.proc.kill()
        return f"killed engine incoming (pid {self.proc.pid}, {len(self.victims)} children)"

    def _report(self) -> dict:
        try:
            with open(self.report_path) as f:
                return json.load(f)["migration"]
        except (OSError, ValueError, KeyError):
            return {}

    def join(self, timeout: float) -> bool:
        try:
            self.proc.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return False
        return True

    def observe(self) -> dict:
        try:
            with open(self.report_path) as f:
                report = json.load(f)
        except (OSError, ValueError):
            report = {}
        ver = report.get("verification") or {}
        ab = ver.get("ab")
        err: str | None
        if self.killed:
            err = "killed with SIGKILL by the stress runner"
        else:
            err = (report.get("migration") or {}).get("error-desc") or \
                "".join(self._err).strip()[-300:] or None
        return {"status": self.status, "error": err,
                "running": False,       # an engine incoming that ended runs nothing
                "digests": ver.get("digests"),
                "ab_ok": None if ab is None else bool(ab["ok"]),
                "ab_bad": None if ab is None else int(ab["bad_pages"])}

    def pages(self):
        return None

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        self.abort()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.close()


# ---------------------------------------------------------------------------
# One case


def run_case(case: Case, settings: Settings = Settings()) -> CaseResult:
    """Run ``case`` and judge it; never raises for the case's own trouble."""
    t0 = time.monotonic()
    before = leaks.snapshot()
    workdir = tempfile.mkdtemp(prefix=f"engine-stress-{case.id}-", dir=settings.workdir)
    run = _CaseRun(case, settings, workdir)
    try:
        obs = run.execute()
    except Exception as exc:    # set-up trouble or a bug here: a bad verdict, not a crash
        obs = Observation(source_status="unknown",
                          runner_error=f"{type(exc).__name__}: {exc}",
                          notes=tuple(traceback.format_exc().splitlines()[-6:]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    segs, procs = leaks.find_leaks(before, victims=run.victims)
    obs = replace(obs, leaked_segments=tuple(segs), leaked_processes=tuple(procs))
    verdict, detail = classify(expectation(case), obs)
    return CaseResult(case, verdict, detail, time.monotonic() - t0, obs)


class _CaseRun:
    def __init__(self, case: Case, settings: Settings, workdir: str):
        self.case = case
        self.settings = settings
        self.workdir = workdir
        self.victims: list[int] = []
        self.notes: list[str] = []

    def _uri(self, name: str) -> str:
        if self.case.transport == "unix":
            return f"unix:{os.path.join(self.workdir, name)}.sock"
        return "tcp:127.0.0.1:0"

    def execute(self) -> Observation:
        case, settings = self.case, self.settings
        options = case_options(case, settings)
        spec, vcpus = _workload(case, settings)
        guest: Guest | None = None
        dest: ProcessDestination | InProcessDestination | None = None
        relay: Relay | None = None
        mig: SourceMigration | None = None
        thread: threading.Thread | None = None
        try:
            guest = Guest.create([(RAM_ID, settings.ram)], vcpus=vcpus, workload=spec,
                                 start=False)
            if case.workload == "none":
                fill_mixed(guest.blocks[0].pages, seed=case.seed * 1000 + case.index)
            guest.start()
            digest = _digest(guest) if case.workload == "none" else None
            if case.workload == "ab":
                _await_first_pass(guest)
            if case.fault.kind == "destination-killed":
                dest = ProcessDestination(case, settings, options, self._uri("dst"),
                                          self.workdir)
            else:
                dest = InProcessDestination(case, settings, options, self._uri("dst"))
            main_uri = dest.uri
            if case.fault.kind in RELAYED:
                # Following the stream costs a decoder; only corruption needs it.
                follow = PROFILE.lookup(vcpus) if case.fault.kind != "channel-dropped" \
                    else None
                relay = Relay(self._uri("relay"), dest.uri, follow)
                main_uri = relay.uri
            trigger = Trigger(case.fault, guest.blocks[0].npages, lambda: _progress(mig),
                              lambda: self._act(mig, dest, relay))
            mig = SourceMigration(guest, PROFILE, options, vcpus=vcpus,
                                  postcopy_after=case.postcopy_after,
                                  on_status=trigger.on_status,
                                  on_pass=None if case.postcopy else
                                  lambda n: _after_first_pass(mig, settings),
                                  on_multifd_ack=trigger.poke)
            mig.compute_digests = True
            mig.prepare()
            outcome: dict = {}
            thread = threading.Thread(target=_run_source,
                                      args=(mig, main_uri, dest.uri, trigger.poke, outcome),
                                      name="stress-source", daemon=True)
            thread.start()
            hung = self._supervise(mig, dest, thread, trigger)
            return self._observe(mig, guest, digest, dest, relay, trigger, outcome, hung)
        finally:
            if thread is not None and thread.is_alive():     # interrupted, or a bug here
                assert mig is not None      # the thread runs it
                self._unstick(mig, dest)
                thread.join(15)
            if relay is not None:
                relay.close()
            if dest is not None:
                dest.close()
                self.victims += getattr(dest, "victims", [])
            if mig is not None and mig.pool is not None:
                mig.pool.kill()
            if guest is not None:
                guest.close()

    def _act(self, mig: SourceMigration | None, dest, relay: Relay | None) -> str | None:
        assert mig is not None      # the trigger fires while the migration runs
        f = self.case.fault
        if f.kind == "worker-killed":
            if f.side == "source":
                proc = mig.pool.procs[f.target]
                proc.kill()
                return f"killed source multifd worker {f.target} (pid {proc.pid})"
            return dest.kill_worker(f.target)
        if f.kind == "channel-dropped":
            assert relay is not None    # a relayed fault: execute() made one
            relay.cut()
            return "cut the main channel"
        if f.kind == "packet-corrupted":
            assert relay is not None    # a relayed fault: execute() made one
            relay.arm("structure")
            return None
        if f.kind == "silent-corruption":
            assert relay is not None    # a relayed fault: execute() made one
            relay.arm("payload")
            return None
        if f.kind == "destination-killed":
            return dest.kill()
        if f.kind == "cancel":
            status = mig.state.status.value
            try:
                mig.cancel()
            except StateError as exc:
                return f"cancel refused in {status}: {exc}"
            return f"cancelled in {status}"
        return None

    def _supervise(self, mig: SourceMigration, dest, thread: threading.Thread,
                   trigger: Trigger) -> str | None:
        """Until the source's migration ends; returns why it hung, if it did."""
        deadline = time.monotonic() + self.settings.case_timeout
        recovered_pauses = 0
        while thread.is_alive():
            if time.monotonic() > deadline:
                why = (f"source still {mig.state.status.value}, destination "
                       f"{dest.status}, after {self.settings.case_timeout:.0f} s")
                self._unstick(mig, dest)
                thread.join(15)
                return why
            trigger.poke()
            if mig.state.status is S.POSTCOPY_PAUSED:
                pauses = sum(1 for _, s in mig.state.history if s is S.POSTCOPY_PAUSED)
                if isinstance(dest, InProcessDestination) and dest.status == "postcopy-paused":
                    if pauses > recovered_pauses and pauses <= MAX_RECOVERIES:
                        recovered_pauses = pauses
                        self._recover(mig, dest)
                    elif pauses > MAX_RECOVERIES:
                        mig.abandon(f"still paused after {MAX_RECOVERIES} recoveries")
                elif dest.ended or dest.status in ("failed", "completed", "killed"):
                    mig.abandon(f"the destination is {dest.status}")
            thread.join(TICK)
        # The destination ends on its own once the source has (one that never
        # got a connection would wait for it: it is stopped).
        if dest.status == "setup" and not dest.join(UNCONNECTED_GRACE):
            self.notes.append("the destination never got a connection; stopped it")
            dest.abort()
        if not dest.join(deadline - time.monotonic()):
            why = f"destination still {dest.status} after the source ended"
            dest.abort()
            dest.join(15)
            return why
        return None

    def _recover(self, mig: SourceMigration, dest: InProcessDestination) -> None:
        try:
            uri = dest.recover(self._uri(f"recover-{len(self.notes)}"))
            # Recovered: no reason to crawl any more.
            mig.set_parameters({"max-postcopy-bandwidth": 0})
            mig.resume(uri)
            self.notes.append(f"postcopy recovery via {uri}")
        except EngineError as exc:
            self.notes.append(f"recovery attempt failed: {exc}")

    @staticmethod
    def _unstick(mig: SourceMigration, dest) -> None:
        with contextlib.suppress(EngineError):
            mig.cancel()
        mig.abandon("the stress case timed out")
        dest.abort()

    def _observe(self, mig, guest, digest, dest, relay, trigger, outcome, hung) -> Observation:
        case = self.case
        info = mig.info()
        history = tuple(s.value for _, s in mig.state.history)
        d = dest.observe() if not hung else {"status": dest.status, "error": None,
                                             "running": None}
        obs: dict = dict(
            source_status=info.status,
            source_error=str(mig.error) if mig.error is not None else
            (outcome.get("error") or None),
            source_history=history, destination_status=d["status"],
            destination_error=d.get("error"), destination_running=d.get("running"),
            fault_fired=trigger.fired, fault_status=trigger.fired_status,
            fault_note=trigger.note, hung=hung,
            recovered=S.POSTCOPY_RECOVER.value in history and info.status == "completed")
        notes = list(self.notes)
        if trigger.error:
            notes.append(f"fault action failed: {trigger.error}")
        if relay is not None:
            if case.fault.kind in ("packet-corrupted", "silent-corruption"):
                obs["fault_fired"] = relay.corrupted_at is not None
                if relay.corrupted_at is not None:
                    obs["fault_note"] = (f"flipped the {relay.corrupted_what} at main-channel "
                                         f"offset {relay.corrupted_at}")
            if relay.follow_error:
                notes.append(f"relay stopped following the stream: {relay.follow_error}")
            if relay.error:
                notes.append(f"relay: {relay.error}")
        if hung:
            return Observation(**obs, notes=tuple(notes))
        postcopied = any(s in history for s in ("postcopy-active", "postcopy-paused"))
        if info.status == "completed":
            if not postcopied and mig.switchover_digests and d.get("digests"):
                problems = compare_digests(mig.switchover_digests, d["digests"])
                obs["memory_equal"] = not problems
                if problems and case.workload == "none" and dest.pages() is not None:
                    bad = np.flatnonzero((guest.blocks[0].pages != dest.pages()).any(axis=1))
                    obs["bad_pages"] = int(len(bad))
                    obs["first_bad_page"] = int(bad[0]) if len(bad) else None
            obs["ab_ok"] = d.get("ab_ok")
            if d.get("ab_ok") is False:
                obs["bad_pages"] = d.get("ab_bad")
        else:
            obs.update(_source_intact(guest, digest, case.workload))
        return Observation(**obs, notes=tuple(notes))


def _run_source(mig: SourceMigration, main_uri: str, dest_uri: str, hook, outcome: dict) -> None:
    try:
        channel = connect(main_uri)
    except BaseException as exc:    # noqa: BLE001 - the observation says
        outcome["error"] = f"cannot connect: {exc}"
        return
    try:
        outcome["info"] = mig.run(ChannelTap(channel, hook), dest_uri)
    except BaseException as exc:    # noqa: BLE001
        outcome["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        channel.close()


def _after_first_pass(mig: SourceMigration | None, settings: Settings) -> None:
    """Precopy: the operator's downtime limit, once the first pass is over."""
    assert mig is not None      # a pass ended: the migration exists
    if int(mig.options.param("downtime-limit")) != settings.downtime_limit:
        mig.set_parameters({"downtime-limit": settings.downtime_limit})


def _progress(mig: SourceMigration | None) -> tuple[str, int, int]:
    """(status, pages sent, pages remaining) of the source."""
    if mig is None:
        return "none", 0, 0
    info = mig.info()
    ram = info.ram
    if ram is None:
        return info.status, 0, 0
    return info.status, ram.normal + ram.duplicate, ram.remaining // ram.page_size


def _digest(guest: Guest) -> str:
    return hashlib.sha256(guest.blocks[0].buf).hexdigest()


def _await_first_pass(guest: Guest, timeout: float = 30.0) -> None:
    """Let every ab vCPU walk its slice once, so its memory is not still zero."""
    regs = guest.registers
    deadline = time.monotonic() + timeout
    while not (regs[:, REG_PASSES] >= 1).all():
        if time.monotonic() > deadline:
            raise EngineError("the ab guest's vCPUs did not complete a pass")
        time.sleep(0.02)


def _source_intact(guest: Guest, digest: str | None, workload: str) -> dict:
    """Running, memory its own, vCPUs progressing; a split source is only checked
    for consistency (it must stay stopped)."""
    out: dict = {"source_running": guest.running}
    if workload == "none":
        out["source_memory_ok"] = _digest(guest) == digest
        return out
    was_running = guest.running
    if was_running:
        guest.stop()
    result = guest.check_ab()
    out["source_memory_ok"] = bool(result.ok)
    if not was_running:
        return out
    guest.start()
    regs = guest.registers
    before = regs[:, REG_CHUNKS].copy()
    deadline = time.monotonic() + PROGRESS_SECONDS
    while not (regs[:, REG_CHUNKS] > before).all():
        if time.monotonic() > deadline:
            out["source_progressing"] = False
            return out
        time.sleep(0.01)
    out["source_progressing"] = True
    return out


# ---------------------------------------------------------------------------
# A matrix


#: the duration estimate before any case has been measured (seconds): the
#: first case always starts
INITIAL_ESTIMATE = 0.0


def run_matrix(cases: Iterable[Case], settings: Settings = Settings(),
               time_limit: float | None = None,
               on_result: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    """Run ``cases`` in order.  With ``time_limit`` (seconds for the whole run),
    a case is only started if the longest case so far would still fit; the
    rest are reported as skipped."""
    t0 = time.monotonic()
    results: list[CaseResult] = []
    measured: list[float] = []
    out_of_time = False
    for case in cases:
        elapsed = time.monotonic() - t0
        longest = max(measured, default=INITIAL_ESTIMATE)
        if time_limit is not None and (out_of_time or elapsed + longest > time_limit):
            out_of_time = True
            result = CaseResult(case, Verdict.SKIPPED,
                                f"{elapsed:.0f} s of {time_limit:.0f} s used; the longest "
                                f"case so far took {longest:.0f} s", 0.0)
        else:
            result = run_case(case, settings)
            measured.append(result.seconds)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
