"""The VM behind an ``engine vm`` monitor: one guest, its run state, its migrations.

:class:`Machine` is what QEMU's monitor commands act on.  Its methods are
the QMP commands (with QEMU's checks and error texts, raising
:class:`~engine.qmp.errors.QMPError`); :mod:`engine.qmp.commands` maps
requests onto them.  It raises QEMU's events through an ``emit(name,
data)`` callable:

* ``STOP`` / ``RESUME`` whenever the vCPUs stop or start, whoever asks
  (``stop``/``cont``, the switchover, a failed migration restarting the
  source, a destination starting the guest it received);
* ``MIGRATION {status}`` at every status change of either side, and
  ``MIGRATION_PASS {pass}`` at every dirty-bitmap sync of the source, both
  only when the ``events`` capability is on (as QEMU);
* ``SHUTDOWN`` is the caller's (it knows why the process ends).

The QMP is QEMU 10.2's: ``migrate`` and ``migrate-incoming`` take ``uri``
or ``channels`` (:mod:`engine.qmp.channels`), ``query-migrationthreads``
names the migration thread and the multifd workers (processes here) for
pinning, ``yank`` shuts down every channel of the migration.

Threads.  In-band commands run under :attr:`Machine.lock` (QEMU's big
lock); ``migrate-pause``, ``migrate-recover``, ``yank`` and ``query-yank``
run out of band, without it.  Migrations run in one long-lived *migration
thread*: multifd workers and the postcopy fault handler are processes that
die with the thread that spawned them, so they are spawned there, one
migration after another.
The guest itself (and its vCPU processes) belongs to the caller, who
creates it in a thread that lives as long as the VM.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import queue
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping

from engine.errors import ChannelBrokenError, ConfigError, EngineError, StateError
from engine.machine import MachineProfile
from engine.migration import check_implemented
from engine.options import MigrationOptions
from engine.qmp.channels import migration_uri
from engine.qmp.dirtyrate import DirtyRateCalculation
from engine.qmp.errors import ERROR_CLASS_DEVICE_NOT_FOUND, ERROR_CLASS_GENERIC, QMPError
from engine.qmp.runstate import RunState, RunStateMachine
from engine.state import (ACTIVE_STATES, CANCELLABLE_STATES, POSTCOPY_STATES, TERMINAL_STATES,
                          MigrationStatus as S)
from engine.transport import Address, Listener, TcpAddress, UnixAddress

if TYPE_CHECKING:
    from engine.migration.destination import DestinationMigration
    from engine.migration.source import SourceMigration

__all__ = ["Machine", "MIGRATION_ACTIVE"]

#: QEMU's QERR_MIGRATION_ACTIVE
MIGRATION_ACTIVE = "There's a migration process in progress"
#: seconds a source may take to connect to its destination (QEMU: the OS's)
CONNECT_SECONDS = 30.0
#: seconds migrate-start-postcopy waits for a just-started migration to reach setup
START_SECONDS = 30.0
#: parameters the destination reads when migrate-incoming starts it
_INCOMING_PARAMETERS = ("multifd-channels", "multifd-compression")

_R = RunState


def _error(desc: str) -> QMPError:
    return QMPError(ERROR_CLASS_GENERIC, desc)


def _never_raises(callback):
    """For callbacks the migration drivers call: a failure in one (a vCPU
    that died when asked to start, say) is reported, and the migration's
    status change goes on."""
    def wrapper(*args):
        try:
            callback(*args)
        except Exception:
            import traceback
            traceback.print_exc(file=sys.stderr)
    return wrapper


class _MigrationThread:
    """The thread every migration runs in, one job after another."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="migration", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._pending += 1
        self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException:   # a bug in a job must not end the thread
                import traceback
                traceback.print_exc(file=sys.stderr)
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    @property
    def native_id(self) -> int | None:
        """The thread's id in the kernel (what QEMU reports as ``thread-id``)."""
        return self._thread.native_id

    def wait_idle(self, timeout: float) -> bool:
        """Whether every submitted job has ended within ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)


class _MigrationGuest:
    """The guest as a migration driver sees it: its ``start``/``stop`` go
    through the machine, which moves the run state and raises RESUME/STOP."""

    def __init__(self, machine: "Machine", role: str):
        self._machine, self._role = machine, role

    def __getattr__(self, name: str) -> Any:
        return getattr(self._machine.guest, name)

    @property
    def running(self) -> bool:
        return self._machine.guest.running

    def stop(self, timeout: float = 10.0) -> None:
        target = _R.FINISH_MIGRATE if self._role == "source" else _R.PAUSED
        self._machine._stop_vcpus(target, timeout)

    def start(self) -> None:
        # QEMU restarts a source after a failed migration only if it was
        # running at the switchover: a `stop` since then keeps it stopped.
        if self._role == "source" and self._machine._user_paused:
            return
        self._machine._start_vcpus()


def _alive(pid: int | None) -> bool:
    import psutil
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _worker_threads(pool, name: str) -> list[dict]:
    """MigrationThreadInfo for each live worker of a multifd ``pool``: a worker
    is a process, its main thread's id is its pid."""
    if pool is None:
        return []
    return [{"name": name % i, "thread-id": p.pid}
            for i, p in enumerate(list(pool.procs)) if _alive(p.pid)]


def _yank_workers(pool, address) -> None:
    """Shut down the multifd channels of ``pool``'s workers (their sockets)."""
    from engine.qmp.yank import channel_matcher, shutdown_process_sockets
    if pool is None:
        return
    is_channel = channel_matcher(address.path if isinstance(address, UnixAddress) else None)
    for proc in list(pool.procs):
        if not _alive(proc.pid):
            continue
        try:
            shutdown_process_sockets(proc.pid, is_channel)
        except OSError:
            # Its descriptors are out of reach (no pidfd_getfd, or not
            # permitted): the worker goes instead, and its sockets with it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


def _socket_address(address) -> dict | None:
    """QEMU's SocketAddress for ``socket-address`` (ports are strings there)."""
    if isinstance(address, TcpAddress):
        return {"type": "inet", "host": address.host or "0.0.0.0", "port": str(address.port)}
    if isinstance(address, UnixAddress):
        return {"type": "unix", "path": address.path}
    return None


class Machine:
    """One monitored guest.

    ``guest`` is an :class:`engine.ram.guest.Guest` the caller created (with
    ``start=False``) and closes; ``vcpus`` its vCPU count (device sections);
    ``options`` the initial capabilities and parameters.  The initial run
    state is ``inmigrate`` with ``incoming``, else ``prelaunch`` with
    ``start_paused`` (``-S``), else ``running`` (the vCPUs are started).
    ``incoming`` other than ``"defer"`` starts listening at once (errors
    propagate).  ``emit(name, data)`` raises an event.
    """

    def __init__(self, guest, profile: MachineProfile, options: MigrationOptions, *,
                 vcpus: int, emit: Callable[[str, Mapping | None], None] | None = None,
                 incoming: str | None = None, start_paused: bool = False,
                 postcopy_faults: str = "auto", workload: str = "none",
                 uuid: bytes | None = None):
        check_implemented(options)
        self.guest = guest
        #: QEMU's -uuid (None: not set)
        self.uuid = uuid
        self.profile = profile
        self.options = options
        self.vcpus = vcpus
        self.workload = workload
        self.postcopy_faults = postcopy_faults
        self.emit: Callable[[str, Mapping | None], None] = emit or (lambda name, data: None)
        #: QEMU's big lock: held while an in-band command runs
        self.lock = threading.RLock()
        #: orders vCPU starts and stops with the run state they imply
        self._vcpu_lock = threading.Lock()
        #: QEMU's `autostart`: whether a received guest is started (not -S)
        self.autostart = not start_paused
        #: a `stop` since the last `cont` (a failed migration must not restart)
        self._user_paused = False
        self.outgoing: SourceMigration | None = None        # the latest
        self._outgoing_address: Address | None = None
        #: the DestinationMigration, once migrate-incoming ran
        self.incoming: DestinationMigration | None = None
        self._outgoing_pending = False
        self._incoming_started = False
        self._incoming_listener: Listener | None = None
        self._incoming_address: dict | None = None
        self._last_pass = 0
        self._closing = False
        #: set when the VM should end; :attr:`exit_code` and
        #: :attr:`shutdown_reason` say why (QEMU's SHUTDOWN reasons)
        self.shutdown_requested = threading.Event()
        self.exit_code = 0
        self.shutdown_reason = "host-qmp-quit"
        #: calc-dirty-rate's last (or current) measurement of the guest
        self.dirty_rate = DirtyRateCalculation(guest)
        # The drivers are imported before the migration thread exists: a QMP
        # thread and the migration thread importing their shared modules at
        # once can trip importlib's deadlock detection (a KeyError from the
        # import machinery in one of them).
        for module in ("channels", "destination", "source"):
            importlib.import_module(f"engine.migration.{module}")
        self._thread = _MigrationThread()
        try:
            if incoming is not None:
                self.runstate = RunStateMachine(_R.INMIGRATE)
                if incoming != "defer":
                    self._start_incoming(incoming, exit_on_error=True)
            else:
                self.runstate = RunStateMachine(_R.PRELAUNCH)
                if not start_paused:
                    self._start_vcpus()
        except BaseException:
            self._thread.close(5)
            raise

    # -- vCPUs and the run state ----------------------------------------------------
    def _start_vcpus(self) -> None:
        with self._vcpu_lock:
            if self.runstate.state is _R.RUNNING:
                return
            self.guest.start()
            self.runstate.set(_R.RUNNING)
            self.emit("RESUME", None)

    def _stop_vcpus(self, target: RunState, timeout: float = 10.0) -> None:
        with self._vcpu_lock:
            was_running = self.runstate.state is _R.RUNNING
            if self.guest.running:
                self.guest.stop(timeout)
            self.runstate.set(target)
            if was_running:
                self.emit("STOP", None)

    def request_shutdown(self, exit_code: int = 0, reason: str = "host-qmp-quit") -> None:
        """Ask the VM's owner to end the process (the first request wins)."""
        if not self.shutdown_requested.is_set():
            self.exit_code, self.shutdown_reason = exit_code, reason
            self.shutdown_requested.set()

    # -- run control commands ---------------------------------------------------------
    def query_status(self) -> dict:
        state = self.runstate.state
        # QEMU 9.0 dropped 'singlestep' from StatusInfo.
        return {"status": state.value, "running": state is _R.RUNNING}

    def stop(self) -> dict:
        """QMP stop: pause the vCPUs (or, while waiting for an incoming
        migration, do not start the guest when it arrives)."""
        state = self.runstate.state
        if state is _R.INMIGRATE:
            self._set_autostart(False)
        elif state is _R.RUNNING:
            self._user_paused = True
            self._stop_vcpus(_R.PAUSED)
        return {}

    def cont(self) -> dict:
        """QMP cont: run the vCPUs (or start the guest once it has arrived)."""
        state = self.runstate.state
        if state is _R.FINISH_MIGRATE:
            raise _error("Migration is not finalized yet")
        if state in (_R.SHUTDOWN, _R.INTERNAL_ERROR):
            raise _error("Resetting the Virtual Machine is required")
        if state is _R.INMIGRATE:
            self._set_autostart(True)
            return {}
        self._user_paused = False
        self._start_vcpus()
        return {}

    def _set_autostart(self, value: bool) -> None:
        self.autostart = value
        inc = self.incoming
        if inc is not None:
            inc.resume = value      # read when loading ends (or postcopy runs)

    def quit(self) -> dict:
        self.request_shutdown(0, "host-qmp-quit")
        return {}

    # -- capabilities and parameters -----------------------------------------------------
    def _outgoing_running(self) -> bool:
        mig = self.outgoing
        return mig is not None and (self._outgoing_pending or mig.state.status in ACTIVE_STATES
                                    or mig.state.status is S.CANCELLING)

    def _outgoing_live(self) -> bool:
        """From migrate until the outgoing migration has ended (connecting
        included): the span of QEMU's yank instance and migration thread."""
        mig = self.outgoing
        if mig is None:
            return False
        status = mig.state.status
        return status not in TERMINAL_STATES and (status is not S.NONE or self._outgoing_pending)

    def _incoming_running(self) -> bool:
        inc = self.incoming
        return inc is not None and inc.state.status not in TERMINAL_STATES

    def query_migrate_capabilities(self) -> list:
        return self.options.to_qmp_capabilities()

    def migrate_set_capabilities(self, capabilities: list[Mapping[str, Any]]) -> dict:
        if self._outgoing_running():
            raise _error(MIGRATION_ACTIVE)
        if self._incoming_started:
            raise _error("The incoming migration has already been started; set capabilities "
                         "before migrate-incoming (-incoming defer) or with --cap")
        caps = {c["capability"]: c["state"] for c in capabilities}
        try:
            new = self.options.with_capabilities(caps)
            check_implemented(new)
        except ConfigError as exc:
            raise _error(str(exc)) from None
        self.options = new
        return {}

    def query_migrate_parameters(self) -> dict:
        return self.options.to_qmp_parameters()

    def migrate_set_parameters(self, params: Mapping[str, Any]) -> dict:
        if self._incoming_started:
            late = [p for p in _INCOMING_PARAMETERS if p in params
                    and params[p] != self.options.param(p)]
            if late:
                raise _error(f"The incoming migration has already been started; set "
                             f"{', '.join(late)} before migrate-incoming")
        try:
            new = self.options.with_parameters(params)
            mig = self.outgoing
            if mig is not None and self._outgoing_running():
                mig.set_parameters(dict(params))    # max-bandwidth & co. apply at once
        except ConfigError as exc:
            raise _error(str(exc)) from None
        self.options = new
        return {}

    # -- outgoing -----------------------------------------------------------------------
    def migrate(self, uri: str | None = None, *, channels: list | None = None,
                detach: bool = False, resume: bool = False) -> dict:
        """QMP migrate to ``uri`` or ``channels``: start an outgoing migration
        (returns at once; watch query-migrate or the MIGRATION events), or
        resume a paused postcopy."""
        from engine.migration.checks import check_multifd_transport
        from engine.migration.source import SourceMigration
        from engine.transport import parse_uri

        uri = migration_uri("migrate", uri, channels)
        if resume:
            mig = self.outgoing
            if mig is None or mig.state.status is not S.POSTCOPY_PAUSED:
                raise _error("Cannot resume if there is no paused migration")
            try:
                mig.resume(uri)
            except EngineError as exc:
                raise _error(str(exc)) from None
            return {}
        if self._outgoing_running():
            raise _error(MIGRATION_ACTIVE)
        state = self.runstate.state
        if state is _R.INMIGRATE or self._incoming_running():
            raise _error("Guest is waiting for an incoming migration")
        if state is _R.POSTMIGRATE:
            raise _error("Can't migrate the vm that was paused due to previous migration")
        try:
            address = parse_uri(uri)
            check_multifd_transport(self.options, address)
            # The stream's global state says whether the destination should run it.
            runstate = {_R.PAUSED: "paused", _R.PRELAUNCH: "prelaunch"}.get(state)
            box: dict = {}
            mig = SourceMigration(
                _MigrationGuest(self, "source"), self.profile, self.options,
                on_status=lambda old, new: self._on_outgoing_status(box["mig"], old, new),
                on_pass=lambda n: self._on_pass(box["mig"], n),
                vcpus=self.vcpus, runstate=runstate, uuid=self.uuid)
            box["mig"] = mig
        except EngineError as exc:
            raise _error(str(exc)) from None
        self._last_pass = 0
        self.outgoing = mig
        self._outgoing_address = address
        self._outgoing_pending = True
        self._thread.submit(lambda: self._run_outgoing(mig, address.uri))
        return {}

    def _run_outgoing(self, mig, uri: str) -> None:
        """Migration thread: connect (QEMU does it asynchronously too), migrate."""
        from engine.transport import connect
        try:
            try:
                mig.prepare()       # multifd workers, spawned from this thread
                channel = connect(uri, timeout=CONNECT_SECONDS)
            except (EngineError, OSError) as exc:
                if mig.pool is not None:
                    mig.pool.kill()
                    mig.pool.close()
                mig.error = exc if isinstance(exc, EngineError) else \
                    ChannelBrokenError(f"{uri}: {exc}")
                mig.state.transition(S.SETUP)
                mig.state.transition(S.FAILED)
                return
            with channel:
                mig.run(channel, uri)
        finally:
            self._outgoing_pending = False

    @_never_raises
    def _on_pass(self, mig, n: int) -> None:
        self._last_pass = n
        if mig.options.cap("events"):
            self.emit("MIGRATION_PASS", {"pass": n})

    @_never_raises
    def _on_outgoing_status(self, mig, old: S, new: S) -> None:
        """Source status change (migration thread, under the status lock)."""
        if old is S.DEVICE:
            # The switchover's last bitmap sync happens in 'device' and is no
            # iteration pass: its MIGRATION_PASS goes out here.
            count = mig.stats.dirty_sync_count
            if count > self._last_pass:
                self._on_pass(mig, count)
        if new in (S.DEVICE, S.PRE_SWITCHOVER):
            # A guest stopped already (paused, prelaunch) moves without STOP.
            if self.runstate.state is not _R.FINISH_MIGRATE:
                self._stop_vcpus(_R.FINISH_MIGRATE)
        elif new is S.COMPLETED:
            self.runstate.set(_R.POSTMIGRATE)
        if mig.options.cap("events"):
            self.emit("MIGRATION", {"status": new.value})
        if new in (S.FAILED, S.CANCELLED) and self.runstate.state is _R.FINISH_MIGRATE:
            # Not restarted (stopped by the user, or the guest now runs on the
            # destination): QEMU's postmigrate.
            self.runstate.set(_R.POSTMIGRATE)

    def migrate_cancel(self) -> dict:
        mig = self.outgoing
        if mig is None:
            return {}
        status = mig.state.status
        if status in POSTCOPY_STATES:
            raise _error("Postcopy migration in progress, cannot cancel.")
        if status in CANCELLABLE_STATES or (status is S.NONE and self._outgoing_pending):
            try:
                mig.cancel()
            except StateError as exc:
                raise _error(str(exc)) from None
        return {}

    def migrate_continue(self, state: str) -> dict:
        mig = self.outgoing
        current = mig.state.status.value if mig is not None else S.NONE.value
        if current != state:
            raise _error(f"Migration not in expected state: {current}")
        if mig is None:     # state 'none' and no migration: QEMU's succeeds, waking nobody
            return {}
        try:
            mig.migrate_continue(state)
        except StateError as exc:
            raise _error(str(exc)) from None
        return {}

    def migrate_start_postcopy(self) -> dict:
        mig = self.outgoing
        options = mig.options if mig is not None and self._outgoing_running() else self.options
        if not options.cap("postcopy-ram"):
            raise _error("Enable postcopy with migrate-set-capabilities before the start "
                         "of migration")
        if mig is None or (mig.state.status is S.NONE and not self._outgoing_pending):
            raise _error("Postcopy must be started after migration has been started")
        if mig.state.status is S.NONE:
            mig.state.wait_for(*(set(S) - {S.NONE}), timeout=START_SECONDS)
        if mig.state.status in (S.SETUP, S.WAIT_UNPLUG, S.ACTIVE):
            with contextlib.suppress(StateError):     # it just moved on: as QEMU, no error
                mig.start_postcopy()
        return {}

    # -- both sides ---------------------------------------------------------------------
    def migrate_pause(self) -> dict:
        """Out of band: break a postcopy's channels (source or destination)."""
        alive = (S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER)
        mig = self.outgoing
        if mig is not None and mig.state.status in alive:
            try:
                mig.pause()
            except StateError as exc:
                raise _error(str(exc)) from None
            return {}
        inc = self.incoming
        if inc is not None and inc.state.status in alive:
            channel = getattr(inc, "channel", None)
            if channel is not None:
                channel.shutdown()
            return {}
        raise _error("migrate-pause is currently only supported during postcopy-active "
                     "or postcopy-recover state")

    def query_migrate(self) -> dict:
        mig = self.outgoing
        if mig is not None:
            info = mig.info().to_qmp()
            if not info and self._outgoing_pending:
                info = {"status": S.SETUP.value}     # connecting: run() has not begun
            return info
        inc = self.incoming
        if inc is None:
            return {}
        info = inc.info().to_qmp()
        address = self._incoming_address
        if address is not None and inc.state.status not in TERMINAL_STATES:
            info["socket-address"] = [address]
        return info

    # -- incoming -----------------------------------------------------------------------
    def migrate_incoming(self, uri: str | None = None, *, channels: list | None = None,
                         exit_on_error: bool = True) -> dict:
        if self._incoming_started:
            raise _error("The incoming migration has already been started")
        if self.runstate.state is not _R.INMIGRATE:
            raise _error("'-incoming' was not specified on the command line")
        uri = migration_uri("migrate-incoming", uri, channels)
        try:
            self._start_incoming(uri, exit_on_error)
        except EngineError as exc:
            raise _error(str(exc)) from None
        return {}

    def _start_incoming(self, uri: str, exit_on_error: bool) -> None:
        from engine.migration.checks import check_multifd_transport
        from engine.migration.destination import DestinationMigration
        from engine.transport import listen, parse_uri

        address = parse_uri(uri)
        check_multifd_transport(self.options, address)
        options = self.options
        listener = listen(address)      # bound now: its errors are the command's
        try:
            box: dict = {}
            inc = DestinationMigration(
                self.profile, options, guest=_MigrationGuest(self, "destination"),
                vcpus=self.vcpus, resume=self.autostart,
                on_status=lambda old, new: self._on_incoming_status(box, options, old, new),
                postcopy_faults=self.postcopy_faults, uuid=self.uuid)
        except BaseException:
            listener.close()
            raise
        box["mig"] = inc
        self.incoming = inc
        self._incoming_started = True
        self._incoming_listener = listener
        self._incoming_address = _socket_address(listener.address)
        self._thread.submit(lambda: self._run_incoming(inc, listener, options, exit_on_error))

    def _run_incoming(self, inc, listener, options: MigrationOptions,
                      exit_on_error: bool) -> None:
        """Migration thread: accept the channels, load, start the guest."""
        from engine.migration.channels import NULL_UUID, accept_channels
        try:
            try:
                inc.prepare()       # workers and fault handler, spawned from this thread
                n = int(options.param("multifd-channels")) if inc.multifd else 0
                channel, multifd = accept_channels(listener, n, uuid=self.uuid or NULL_UUID)
            except (EngineError, OSError) as exc:
                inc.error = exc if isinstance(exc, EngineError) else \
                    ChannelBrokenError(f"{listener.uri}: {exc}")
                inc.state.transition(S.FAILED)
            else:
                # The listener stays open only for postcopy's preempt channel.
                keep = listener if options.cap("postcopy-preempt") else None
                if keep is None:
                    listener.close()
                with channel:
                    inc.run(channel, multifd, listener=keep)
        finally:
            inc.close()
            listener.close()
        for warning in inc.warnings:
            print(f"engine vm: warning: {warning}", file=sys.stderr)    # QEMU's warn_report
        if inc.state.status is S.FAILED and exit_on_error and not self._closing:
            # QEMU's destination exits when loading fails (exit-on-error).
            print(f"engine vm: load of migration failed: {inc.error}", file=sys.stderr)
            self.request_shutdown(1, "host-error")

    @_never_raises
    def _on_incoming_status(self, box: dict, options: MigrationOptions,
                            old: S, new: S) -> None:
        """Destination status change (migration thread, under the status lock)."""
        inc = box.get("mig")
        if inc is not None and new in (S.COMPLETED, S.POSTCOPY_ACTIVE) \
                and self.runstate.state is _R.INMIGRATE:
            self._settle_incoming(inc, new)
        if options.cap("events"):
            self.emit("MIGRATION", {"status": new.value})

    def _settle_incoming(self, inc, new: S) -> None:
        """QEMU's run state when an incoming guest is ready: running if the
        source ran it and -S was not given (or cont came), else paused; a
        source that was not running passes its own state on.  The driver has
        started a guest with vCPUs already (or will, at postcopy RUN)."""
        source = inc.guest_state.runstate
        if source == "running":
            if self.autostart:
                if new is S.COMPLETED or not self.vcpus:
                    self._start_vcpus()
            else:
                self.runstate.set(_R.PAUSED)
        else:
            try:
                self.runstate.set(RunState(source))
            except (ValueError, StateError):
                self.runstate.set(_R.PAUSED)

    def migrate_recover(self, uri: str) -> dict:
        """Out of band: listen on ``uri`` for a paused postcopy's new channel."""
        inc = self.incoming
        if inc is None or inc.state.status is not S.POSTCOPY_PAUSED:
            raise _error("Migrate recover can only be run when postcopy is paused.")
        try:
            inc.recover(uri)
        except EngineError as exc:
            raise _error(str(exc)) from None
        return {}

    # -- threads and yank -----------------------------------------------------------------
    def query_migrationthreads(self) -> list:
        """QEMU's MigrationThreadInfo list, so the threads can be pinned.

        QEMU 10.2 lists the source's migration thread (``mig/src/main``) and
        multifd send threads (``mig/src/send_N``) while they run; here the
        multifd channels are worker processes (a process's main thread id is
        its pid), and the destination's receive workers are listed too, under
        QEMU's name for those threads (``mig/dst/recv_N``).
        """
        threads: list[dict] = []
        mig = self.outgoing
        if mig is not None and self._outgoing_live():
            threads.append({"name": "mig/src/main", "thread-id": self._thread.native_id})
            threads += _worker_threads(mig.pool, "mig/src/send_%d")
        inc = self.incoming
        if inc is not None and self._incoming_running():
            threads += _worker_threads(inc.pool, "mig/dst/recv_%d")
        return threads

    def _migration_yankable(self) -> bool:
        # QEMU registers the 'migration' yank instance at migrate (or
        # migrate-incoming) and removes it when the migration is cleaned up:
        # completed, failed or cancelled.
        return self._outgoing_live() or self._incoming_running()

    def query_yank(self) -> list:
        """Out of band: the yank instances, ``{"type": "migration"}`` while a
        migration (either direction) runs."""
        return [{"type": "migration"}] if self._migration_yankable() else []

    def yank(self, instances: list[Mapping[str, Any]]) -> dict:
        """Out of band: shut down every channel of each instance (QEMU's
        yank_generic_iochannel: shutdown, not close), all or none of them
        named: an instance that does not exist fails the command first."""
        for instance in instances:
            if instance["type"] != "migration" or not self._migration_yankable():
                raise QMPError(ERROR_CLASS_DEVICE_NOT_FOUND, "Instance not found")
        if not instances:
            return {}
        mig = self.outgoing
        if mig is not None and self._outgoing_live():
            mig.yank()
            _yank_workers(mig.pool, self._outgoing_address)
        inc = self.incoming
        if inc is not None and self._incoming_running():
            inc.yank()
            listener = self._incoming_listener
            _yank_workers(inc.pool, listener.address if listener is not None else None)
        return {}

    # -- engine-specific (x-) ------------------------------------------------------------
    def _check_quiet_memory(self, command: str) -> None:
        """Refuse to read memory that is changing.  Called under the vCPU lock;
        the incoming migration's status is read before it is taken (its status
        callbacks take the vCPU lock under the status lock)."""
        if self.guest.running and self.vcpus:
            raise _error(f"{command}: the guest is running; stop it first")

    def x_check_ab(self) -> dict:
        """Run QEMU's a-b consistency check on guest memory (guest stopped)."""
        if self.workload != "ab":
            raise _error(f"x-engine-check-ab: the guest runs the {self.workload!r} "
                         "workload, not 'ab'")
        if self._incoming_running():
            raise _error("x-engine-check-ab: an incoming migration is in progress")
        with self._vcpu_lock:
            self._check_quiet_memory("x-engine-check-ab")
            result = self.guest.check_ab(slices=max(1, self.vcpus))
        return {"ok": bool(result.ok), "bad-pages": int(result.bad_pages),
                "first-bad": [list(map(int, t)) for t in result.first_bad],
                "edges": [int(e) for e in result.edges]}

    def x_memory_digests(self) -> dict:
        """sha256 of every RAM block (guest stopped), to compare two VMs."""
        from engine.migration.verify import memory_digests
        if self._incoming_running():
            raise _error("x-engine-memory-digests: an incoming migration is in progress")
        with self._vcpu_lock:
            self._check_quiet_memory("x-engine-memory-digests")
            return {"blocks": memory_digests(self.guest.blocks)}

    # -- the end ------------------------------------------------------------------------
    def close(self, timeout: float = 30.0) -> None:
        """End every migration and the migration thread (the guest stays the caller's).

        An outgoing precopy is cancelled; a postcopy (the guest runs on the
        destination) is abandoned; an incoming migration's channels and
        listeners are closed, so it fails.
        """
        self._closing = True
        mig = self.outgoing
        if mig is not None and (self._outgoing_pending or
                                mig.state.status not in TERMINAL_STATES | {S.NONE}):
            try:
                mig.cancel()
            except StateError:
                with contextlib.suppress(StateError):
                    mig.pause()
                mig.abandon("the source VM is shutting down")
                channel = getattr(mig, "channel", None)
                if channel is not None:
                    with contextlib.suppress(Exception):
                        channel.shutdown()
        inc = self.incoming
        if inc is not None:
            if self._incoming_listener is not None:
                self._incoming_listener.close()
            channel = getattr(inc, "channel", None)
            if channel is not None:
                with contextlib.suppress(Exception):
                    channel.shutdown()
        if not self._thread.wait_idle(min(timeout, 5.0)) and inc is not None:
            inc.close()     # a paused postcopy waits for a recovery: end the wait
        self._thread.close(timeout)
        self.dirty_rate.close()     # a measurement reads the guest, which goes next
