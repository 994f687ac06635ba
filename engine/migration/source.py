"""The outgoing migration: QEMU's migration thread and savevm, for one channel.

:class:`SourceMigration` drives one precopy migration of a :class:`Guest`
over a connected :class:`~engine.transport.Channel`:

1. ``setup``: file header and configuration, the return path
   (OPEN_RETURN_PATH + PING 1) when asked for, the RAM SECTION_START with the
   block list.
2. ``active``: iterations.  Each sends one RAM SECTION_PART, bounded by the
   ``max-bandwidth`` budget of 100 ms windows and by a 50 ms time slice, as
   QEMU's ram_save_iterate is.  Before each one the loop measures bandwidth
   and computes the switchover threshold (bandwidth x downtime-limit);
   whenever the pages still to send fit under it a bitmap sync refreshes
   the count, and when the refreshed count still fits the guest is stopped.
3. ``device``: vCPUs stopped, final bitmap sync, every remaining page in the
   SECTION_END, the device FULL sections, EOF and the JSON vmdesc.
4. ``completed``; with a return path, once the destination has said SHUT(0).

Errors and cancel at any point before completion leave the source guest
running (restarted if the switchover had stopped it), with its memory
untouched: the source only ever reads guest memory.

Postcopy (``postcopy-ram``; spec 4.5) switches instead of completing once
asked to (``start_postcopy()`` or ``postcopy_after`` passes): a "postcopy
prepare" PART section (multifd's last sync: multifd carries precopy pages
only), the guest stops, the pages still dirty go out as DISCARD ranges, then
one PACKAGED blob (LISTEN, the devices, PING 3, PING 0x42, RUN) after which
the destination runs the guest.  ``postcopy-device`` lasts until the PONG of
0x42 says the destination loaded the devices; a failure until then is a
precopy failure (the guest restarts here).  In ``postcopy-active`` the rest
of RAM goes out in the background (``max-postcopy-bandwidth``), pages the
destination faults on first: its REQ_PAGES are queued for this thread, or,
with ``postcopy-preempt``, sent at once by the return-path thread on a
channel of their own.  A broken channel then pauses (``postcopy-paused``)
until ``resume(uri)``: the destination's received bitmaps say what is still
to send.  Nothing can cancel a postcopy, and nothing can restart the guest
here once the destination runs it.

The loop runs in the caller's thread.  ``cancel()``, ``info()``,
``start_postcopy()``, ``pause()`` and ``resume()`` are safe from any other
thread (a progress display, a QMP monitor, a signal handler).

Parts along QEMU's seams, each a module beside this one (which keeps the
thread and its control API): postcopy_source, returnpath, multifd_source,
ratelimit, autoconverge, dirtylimit, xbzrle.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable

from engine.errors import (ChannelClosedError, ChannelError, ConfigError, EngineError,
                           InvalidCapabilityError, MigrationCancelled, MigrationError,
                           PostcopyPaused, StateError)
from engine.machine import RAM_SECTION_ID, GuestState, MachineProfile
from engine.migration import autoconverge, check_implemented
from engine.migration.outbound import Outbound
from engine.migration.postcopy_source import (POSTCOPY_SWITCH_INTERVAL, RESUME_ACK_VALUE,
                                              PostcopyHooks, PostcopySource)
from engine.migration.dirtylimit import DirtyLimitSource
from engine.migration.multifd_source import MultifdMode, MultifdSource
from engine.migration.peer import destination_gave_up, peer_closed as _peer_closed
from engine.migration.ramsave import PRECOPY_BATCH_PAGES, RamSaver
from engine.migration.ratelimit import WINDOW_SECONDS, RateLimiter
from engine.migration.returnpath import ReturnPathReader
from engine.migration.verify import memory_digests
from engine.options import MigrationOptions
from engine.procs import CpuMeter, no_cycle_collection
from engine.ram.seams import SourceGuest
from engine.state import POSTCOPY_STATES, MigrationState, MigrationStatus as S
from engine.stats import MigrationInfo, StatsAccumulator
from engine.stream import encoder as enc
from engine.stream import returnpath as rp
from engine.stream.constants import (QEMU_VM_PING_PACKAGED_LOADED, RAM_SECTION_IDSTR,
                                     RAM_SECTION_VERSION, TARGET_PAGE_SIZE)
from engine.stream.vmdesc import build_vmdesc
from engine.transport import parse_uri
from engine.transport.seams import ByteChannel
from engine.trace import trace

__all__ = ["SourceMigration", "RateLimiter", "WINDOW_SECONDS", "POSTCOPY_SWITCH_INTERVAL",
           "RESUME_ACK_VALUE", "MultifdMode"]

#: ram_save_iterate's time slice.
ITERATION_SECONDS = 0.05
#: how often waits look at the return path and control requests
POLL_SECONDS = 0.05
#: how long a source whose channel broke waits for the destination's SHUT.
RP_GRACE_SECONDS = 1.0
#: statuses in which migrate_cancel shuts the channels down at once (QEMU's
#: migration_cancel -> qemu_file_shutdown): a send blocked on a destination
#: that stopped reading must not hold the cancel up
_CANCEL_SHUTDOWN_STATES = frozenset({S.SETUP, S.WAIT_UNPLUG, S.ACTIVE, S.PRE_SWITCHOVER,
                                     S.DEVICE})


class SourceMigration:
    """One outgoing migration.  Create, then ``run(channel)`` once.

    ``postcopy_after`` (needs ``postcopy-ram``): switch to postcopy by itself
    once that many dirty-bitmap passes have completed (0: before the first
    page is sent), as if ``start_postcopy()`` had been called then.

    Who owns what, as QEMU's multifd.h documents it.  The migration thread
    is the one in :meth:`run`; "control" is any thread calling the public
    methods (a monitor, a signal handler); "return path" is the
    :class:`~engine.migration.returnpath.ReturnPathReader`'s thread.

    ========================  ====================================================
    ``state``                 migration thread (transitions); read by all.
                              Its table is the truth: no flag shadows it
    ``stats``, ``error``      written under ``_lock`` (migration thread, return
                              path's request count, multifd acknowledgements)
    ``out``                   the main channel, its rate limiter and the channels
                              to close (see :class:`~engine.migration.outbound.
                              Outbound`); ``channel`` and ``limiter`` read it
    ``uri``                   migration thread
    ``mfd`` (and ``pool``)    migration thread (the pool may be made by the
                              caller's thread in :meth:`prepare`, before ``run``)
    ``return_path``           migration thread (one reader per channel); its
                              outcome is written by the reader's thread only
    ``pongs``                 appended by the return path, read by all
    ``postcopy``              :class:`PostcopySource` (see its table)
    ``_cancel``, ``_continue``, control threads set; the migration thread waits
    ``_postcopy_requested``
    ``_switchover_acked``     return path sets; the migration thread reads
    ``_wake``                 anyone sets (news for the migration thread); the
                              migration thread clears before it looks
    ``_yanked``               control sets (our own shutdown of the channels)
    ``_eof_sent``             migration thread: the main stream is complete
    ========================  ====================================================
    """

    def __init__(self, guest: SourceGuest, machine: MachineProfile, options: MigrationOptions,
                 *, on_status: Callable[[S, S], None] | None = None,
                 on_pass: Callable[[int], None] | None = None,
                 vcpus: int | None = None, runstate: str | None = None,
                 postcopy_after: int | None = None, uuid: bytes | None = None,
                 on_multifd_ack: Callable[[], None] | None = None):
        check_implemented(options)
        self.guest = guest
        #: the VM's UUID (QEMU's -uuid), None when not set: it goes in every
        #: MultiFDInit (zeros when not set) and, with validate-uuid, in the
        #: configuration section for the destination to check
        self.uuid = uuid
        self.machine = machine
        self.options = options
        self.vcpus = vcpus if vcpus is not None else len(getattr(guest, "registers", ()))
        self.state = MigrationState("source", on_change=on_status)
        self.on_pass = on_pass
        self.page_size = TARGET_PAGE_SIZE
        detect = options.param("zero-page-detection") != "none"
        cache = int(options.param("xbzrle-cache-size")) if options.cap("xbzrle") else None
        self.ram = RamSaver(guest, self.page_size, detect_zero=detect, xbzrle_cache=cache)
        self.stats = StatsAccumulator(self.ram.total_bytes, self.page_size, xbzrle_cache=cache)
        self.dirty_limit = DirtyLimitSource(self._options, guest, self.page_size)
        self.error: EngineError | None = None
        self._lock = threading.Lock()
        self.out = Outbound(self.stats, self.ram, self._lock)
        self._cancel = threading.Event()
        self._continue = threading.Event()
        self._switchover_acked = threading.Event()
        self._wake = threading.Event()
        self.return_path: ReturnPathReader | None = None
        self.pongs: list[int] = []
        self.guest_state = GuestState(guest)
        #: globalstate's runstate; by default 'running' or 'prelaunch'
        self.runstate = runstate
        self.switchover_digests: dict[str, str] | None = None
        self.compute_digests = False
        self.multifd = options.cap("multifd")
        self.mfd = MultifdSource(self.out, self.ram, guest.blocks, self._options,
                                 check_abort=self._multifd_checkpoint, on_ack=on_multifd_ack)
        self.uri: str | None = None
        self._eof_sent = False
        #: auto-converge's throttle (None without the capability)
        self.autoconverge = autoconverge.for_migration(self._options, guest)
        self._switchover_now = threading.Event()
        self._yanked = False

        self.postcopy_enabled = options.cap("postcopy-ram")
        self.preempt = options.cap("postcopy-preempt")
        if postcopy_after is not None:
            if not self.postcopy_enabled:
                raise InvalidCapabilityError(
                    "postcopy-ram", "switching to postcopy needs it enabled")
            if postcopy_after < 0:
                raise ConfigError(f"postcopy_after must be >= 0, not {postcopy_after}")
        self.postcopy_after = postcopy_after
        self._postcopy_requested = threading.Event()
        self.postcopy = PostcopySource(self.out, self.ram, self.state, self.mfd, PostcopyHooks(
            checkpoint=self._checkpoint, wait_until=self._wait_until, wake=self._wake,
            options=self._options, count_sync=self._count_sync,
            device_sections=self._device_sections, end_ram_section=self._end_ram_section,
            start_return_path=self._start_return_path,
            stop_return_path=self._stop_return_path, return_path=lambda: self.return_path),
            preempt=self.preempt)
        #: CPU of this process and its multifd workers during the migration
        self.cpu = CpuMeter(lambda: [p.pid for p in self.pool.procs] if self.pool else [])

    def _options(self) -> MigrationOptions:
        """The options as of now (the parts ask: set_parameters replaces them)."""
        return self.options

    @property
    def channel(self) -> ByteChannel | None:
        """The main channel (a postcopy recovery replaces it)."""
        return self.out.channel

    @property
    def limiter(self) -> RateLimiter | None:
        """The rate limiter of the current phase (None while the guest is stopped)."""
        return self.out.limiter

    # Read-only views kept for callers of the undivided class.
    @property
    def preempt_channel(self):
        return self.postcopy.preempt_channel

    @property
    def pause_error(self) -> EngineError | None:
        return self.postcopy.pause_error

    def prepare(self) -> None:
        """Start the multifd workers now, before the migration's clock runs.

        QEMU's channels are threads and cost nothing to start; ours are
        processes, so a caller that knows a migration is coming (the command
        line, a monitor) starts them ahead, like a thread pool.  ``run`` calls
        this itself if nobody did.
        """
        if self.multifd:
            self.mfd.prepare()

    @property
    def pool(self):
        """The multifd send pool (None without multifd, or before :meth:`prepare`)."""
        return self.mfd.pool

    # -- control from other threads ------------------------------------
    def cancel(self) -> None:
        """migrate_cancel: the migration ends in ``cancelled``, the guest running.

        As QEMU's migration_cancel shuts the migration's QEMUFile down, the
        channels are shut down at once: a send blocked on a destination that
        stopped reading (a stopped process, a full socket) fails now instead
        of whenever the peer moves.  The source's memory is never written, so
        cutting a page record short costs nothing here.

        Refused (:class:`StateError`) once postcopy has started: the
        destination may already run the guest, and only it has the pages
        the guest wrote there.
        """
        status = self.state.status
        if status in POSTCOPY_STATES:
            err = StateError(status.value, S.CANCELLING.value, "source")
            err.args = (f"cannot cancel a migration in {status.value}: the guest runs on "
                        "the destination, and cancelling would lose it",)
            raise err
        self._cancel.set()
        trace("migrate_cancel", status=status.value)
        if status in _CANCEL_SHUTDOWN_STATES:
            self._shutdown_channels()
        self._wake.set()

    def _shutdown_channels(self) -> None:
        """Shut down (not close) the main and preempt channels; any thread."""
        channel = self.channel
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.shutdown()
        self.postcopy.shutdown_preempt()

    def start_postcopy(self) -> None:
        """QMP migrate-start-postcopy: switch to postcopy at the next iteration.

        Raises :class:`~engine.errors.InvalidCapabilityError` without
        ``postcopy-ram`` and :class:`StateError` unless the migration is in
        ``setup`` or ``active``.
        """
        if not self.postcopy_enabled:
            raise InvalidCapabilityError(
                "postcopy-ram", "enable it before the migration starts to use "
                "migrate-start-postcopy")
        self.state.expect(S.SETUP, S.WAIT_UNPLUG, S.ACTIVE)
        self._postcopy_requested.set()

    def switchover_now(self) -> None:
        """Stop the guest and complete at the next iteration, whatever is
        still to send (a time-out's suspend: virsh migrate --timeout-suspend)."""
        self.state.expect(S.SETUP, S.WAIT_UNPLUG, S.ACTIVE)
        self._switchover_now.set()
        self._wake.set()

    def pause(self) -> None:
        """QMP migrate-pause: break the channels; the migration waits in
        ``postcopy-paused`` for :meth:`resume` (only in ``postcopy-active`` or
        ``postcopy-recover``; :class:`StateError` otherwise)."""
        self.state.expect(S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER)
        self.postcopy.request_pause((self.channel,))
        self._wake.set()

    def yank(self) -> None:
        """QEMU's yank of the migration: shut down (not close) the main channel
        (the return path rides on it) and the preempt channel, from any thread.

        Nothing is told to the migration: it fails, or in postcopy pauses,
        on the errors that follow, as it would on a dead network.  The multifd
        channels are the workers' sockets; the caller reaches those.
        """
        self._yanked = True
        trace("migration_yank", status=self.state.status.value)
        self._shutdown_channels()
        self._wake.set()

    def resume(self, uri: str) -> None:
        """QMP migrate with resume=true: reconnect a paused postcopy to ``uri``.

        Only in ``postcopy-paused`` (:class:`StateError` otherwise); ``uri``
        is checked here (:class:`~engine.errors.BadURIError`).  The migration
        thread connects; if that or the handshake fails it is back in
        ``postcopy-paused`` and ``resume`` may be called again.
        """
        parse_uri(uri)
        self.state.expect(S.POSTCOPY_PAUSED)
        self.postcopy.request_resume(uri)

    def abandon(self, reason: str) -> None:
        """Give up a paused postcopy that nobody can recover (the destination
        is gone, or there is no monitor to send migrate-recover there): the
        migration fails; the guest now exists only where it ran last."""
        self.postcopy.abandon(reason)

    def set_parameters(self, params: dict) -> None:
        """migrate-set-parameters while migrating: validated, applied at once.

        Like QEMU, max-bandwidth, max-postcopy-bandwidth and downtime-limit
        take effect on the running migration (the next iteration reads them),
        xbzrle-cache-size resizes the cache at once; the others wait for the
        next migration.
        """
        self.options = self.options.with_parameters(params)
        if self.ram.xbzrle is not None and "xbzrle-cache-size" in params:
            self.stats.xbzrle_cache = self.ram.xbzrle.resize(
                int(self.options.param("xbzrle-cache-size")))
        limiter = self.limiter
        if limiter is not None:
            name = "max-postcopy-bandwidth" if self.state.status in POSTCOPY_STATES \
                else "max-bandwidth"
            if name in params:
                limiter.limit = int(self.options.param(name))
                self._wake.set()

    def migrate_continue(self, expected: str = "pre-switchover") -> None:
        """QMP migrate-continue: leave pre-switchover (guarded by the state)."""
        self.state.expect(S(expected))
        self._continue.set()
        self._wake.set()

    def info(self) -> MigrationInfo:
        """query-migrate; ``error-desc`` only with status failed, as QEMU shows it
        (a cancel is not an error; :attr:`error` still says what ended it)."""
        with self._lock:
            status = self.state.status
            failed = status is S.FAILED and self.error is not None
            info = self.stats.snapshot(status.value,
                                       error_desc=str(self.error) if failed else None)
        if self.autoconverge is not None and self.autoconverge.percentage:
            info.extra["cpu-throttle-percentage"] = self.autoconverge.percentage
        info.extra.update(self.dirty_limit.info_fields())
        return info

    def _stop_throttle(self) -> None:
        """The migration is over: the guest runs at full speed (cpu_throttle_stop)."""
        if self.autoconverge is not None:
            self.autoconverge.stop()

    # -- the migration thread ------------------------------------------
    def run(self, channel: ByteChannel, uri: str | None = None) -> MigrationInfo:
        """Migrate over ``channel`` (connected); multifd and the postcopy preempt
        channel connect to ``uri``.  The caller keeps owning ``channel``."""
        with no_cycle_collection():
            return self._run(channel, uri)

    def _run(self, channel: ByteChannel, uri: str | None) -> MigrationInfo:
        self.out.channel = channel
        self.uri = uri
        self.out.limiter = None
        trace("migration_thread_setup", channel=channel.name, uri=uri)
        was_running = bool(getattr(self.guest, "running", False))
        if self.runstate is not None:
            self.guest_state.runstate = self.runstate
        else:
            self.guest_state.runstate = "running" if was_running else "prelaunch"
        if was_running:
            self.guest_state.note_started()
        stopped_by_us = False
        self.state.transition(S.SETUP)
        self.stats.start()
        self.cpu.start()
        if self._cancel.is_set():
            # A cancel that came before the channel was ours to shut down.
            self._shutdown_channels()
        try:
            self._setup()
            # A migrate_cancel issued during setup ends it in setup, as in QEMU,
            # instead of after a first pass of active.
            self._checkpoint()
            self.stats.setup_done()
            self.state.transition(S.ACTIVE)
            postcopy = self._iterate()
            if postcopy:
                self.postcopy.prepare(self.uri, lambda: bool(self.pongs))
            # QEMU's migration_completion: stop the VM first, then (with
            # pause-before-switchover) wait in pre-switchover for
            # migrate-continue, then serialise devices in 'device'.
            if was_running:
                # Set before stop(): a stop cut short (Ctrl-C, a vCPU that does
                # not acknowledge) has already cleared the run flag, and the
                # guest must be restarted all the same.
                stopped_by_us = True
                self.guest.stop()
                self.guest_state.note_stopped()
            self.stats.vm_stopped()
            trace("migration_completion_vm_stop", was_running=was_running)
            if self.autoconverge is not None:
                self.autoconverge.release()
            # The guest is stopped: whatever is left goes out as fast as the
            # channels carry it (QEMU checks max-bandwidth only while iterating;
            # a cap here would stretch the downtime, and with multifd it shrank
            # every hand-out to a page or two).
            self.out.limiter = None
            if self.options.cap("pause-before-switchover"):
                self.state.transition(S.PRE_SWITCHOVER)
                self._wait_until(self._continue.is_set)
            self.state.transition(S.DEVICE)
            if postcopy:
                self.postcopy.switch()
                self.postcopy.run()
            else:
                self._complete()
                self._await_return_path()
            with self._lock:
                self.stats.completed()
                self.stats.set_cpu_seconds(self.cpu.stop() or 0.0)    # started above
            self._stop_throttle()
            self.state.transition(S.COMPLETED)
            if self.compute_digests:
                # The guest stays stopped after completion (QEMU's postmigrate)
                # and nothing else writes its memory, so hashing it now gives
                # the switchover contents without adding to the downtime.
                self.switchover_digests = memory_digests(self.guest.blocks)
        except BaseException as exc:  # includes KeyboardInterrupt: cancel path
            trace("migration_thread_error", error=f"{type(exc).__name__}: {exc}")
            if self.pool is not None:
                self.pool.kill()
            self._abort(self._with_destination_reason(exc), stopped_by_us)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            self.dirty_limit.stop()
            self.postcopy.restore_switch_interval()
            self._stop_return_path()
            self.postcopy.close_preempt()
            self.out.close_owned()
            if self.pool is not None:
                self.pool.close()
            trace("migration_thread_after_loop", status=self.state.status.value)
        return self.info()

    def _abort(self, exc: BaseException, stopped_by_us: bool) -> None:
        """Leave the source as it was: guest running, memory untouched.

        Except once the destination may run the guest (postcopy after
        ``postcopy-device``): then restarting it here would run it twice.
        """
        status = self.state.status
        split = status in POSTCOPY_STATES and status is not S.POSTCOPY_DEVICE
        self._shutdown_channels()
        # No cancel once postcopy started (cancel() refuses it; one that came
        # just before the switch lost the race).
        cancelled = status not in POSTCOPY_STATES and (
            self._cancel.is_set() or isinstance(exc, (KeyboardInterrupt, MigrationCancelled)))
        with self._lock:
            if split:
                what = "interrupted" if isinstance(exc, KeyboardInterrupt) else \
                    f"failed ({type(exc).__name__}: {exc})"
                self.error = MigrationError(
                    f"postcopy {what} in {status.value}: the guest runs on the destination "
                    "and its state is now split between the two sides; the source's memory "
                    "is intact but stale, and the source cannot resume the guest")
            elif cancelled:
                self.error = MigrationCancelled("migration cancelled")
            elif isinstance(exc, KeyboardInterrupt):
                self.error = MigrationError(f"interrupted in {status.value}")
            elif isinstance(exc, EngineError):
                self.error = exc
            else:
                self.error = MigrationError(f"{type(exc).__name__}: {exc}")
        # QEMU's order (and its events): cancelling or failed first, then the
        # guest runs again (RESUME), then cancelled.
        if cancelled and self.state.status not in (S.CANCELLED, S.COMPLETED):
            if self.state.status != S.CANCELLING:
                self.state.transition(S.CANCELLING)
        elif self.state.can_transition(S.FAILED):
            self.state.transition(S.FAILED)
        self._stop_throttle()
        if stopped_by_us and not split:
            self.guest.start()
            self.guest_state.note_started()
        if self.state.status is S.CANCELLING:
            self.state.transition(S.CANCELLED)

    def _checkpoint(self) -> None:
        """Raise what must end or pause the migration thread now; the one place
        that decides (QEMU spreads it over migration_iteration_run,
        migration_detect_error and the postcopy waits).

        * before postcopy: a migrate_cancel;
        * in postcopy: a migrate-pause (cancel() refuses those states);
        * always: the return path's error or the destination's failure SHUT
          (sending on, or stopping the guest for a switchover, cannot succeed),
          and in a recovery any end of the return path;
        * PONG 0x42 in ``postcopy-device``: the destination loaded the devices,
          the postcopy is ``postcopy-active`` from here on.
        """
        status = self.state.status
        if status in POSTCOPY_STATES:
            if self.postcopy.pause_requested.is_set():
                raise PostcopyPaused("paused by migrate-pause")
        elif self._cancel.is_set():
            raise MigrationCancelled("migration cancelled")
        rpath = self.return_path
        if rpath is not None:
            rpath.check(recovering=status is S.POSTCOPY_RECOVER)
        if status is S.POSTCOPY_DEVICE and self.postcopy.devices_loaded.is_set():
            self.state.transition(S.POSTCOPY_ACTIVE)

    def _multifd_checkpoint(self) -> None:
        """:meth:`_checkpoint`, and while the main stream is not complete, the
        destination closing the main channel: a destination that rejected
        the stream (QEMU exits, or keeps its multifd sockets without reading
        them) would otherwise leave the workers blocked until the pool's
        acknowledgement timeout.  Called by the pool every poll interval
        while it waits, never per batch."""
        self._checkpoint()
        if self.mfd.carries_pages and not self._eof_sent \
                and _peer_closed(self.channel):
            assert self.channel is not None     # _peer_closed(None) is False
            raise ChannelClosedError(
                f"{self.channel.name}: the destination closed the migration channel "
                "while multifd pages were in flight")

    def _wait_until(self, done: Callable[[], bool]) -> None:
        """Block until ``done()``, at :meth:`_checkpoint` every poll interval
        and at every wake (which raises what ends the wait otherwise)."""
        while True:
            self._wake.clear()
            self._checkpoint()
            if done():
                return
            self._wake.wait(POLL_SECONDS)

    def _with_destination_reason(self, exc: BaseException) -> BaseException:
        """A channel that broke under us usually broke because the destination
        gave up; its SHUT, if it sent one, says so and is the better reason.
        It may still be in flight on the return path, so wait for it briefly."""
        if not isinstance(exc, ChannelError) or self._cancel.is_set():
            return exc
        if self._yanked:
            # Our own shutdown: the destination did not give up.
            err: EngineError = type(exc)(f"{exc} (the migration's channels were yanked)")
            err.__cause__ = exc
            return err
        rpath = self.return_path
        if rpath is not None:
            rpath.shut.wait(RP_GRACE_SECONDS)
            if rpath.status:
                err = MigrationError(f"{rpath.shut_error()}; the source then saw: {exc}")
                err.__cause__ = exc
                return err
        if self.state.status in POSTCOPY_STATES or not _peer_closed(self.channel):
            return exc      # the destination is still there: a channel broke alone
        return destination_gave_up(exc, early_modern_multifd=(
            self.multifd and not self.mfd.flush_each_section
            and self.stats.dirty_sync_count <= 1))

    def _setup(self) -> None:
        if self.preempt and self.uri is None:
            raise MigrationError("postcopy-preempt needs the destination's URI to open "
                                 "its preempt channel")
        if self.multifd:
            if self.uri is None:
                raise MigrationError("multifd needs the destination's URI to open its channels")
            self.mfd.connect(self.uri, self.uuid or bytes(16))
        config = {}
        if self.uuid is not None and self.options.cap("validate-uuid"):
            config["configuration/uuid"] = enc.config_uuid(self.uuid)
        self.out.send_counted(enc.file_header(),
                              enc.configuration(self.machine.type_name, config))
        if self._return_path_wanted():
            assert self.channel is not None     # run() set it
            if not self.channel.bidirectional:
                raise MigrationError(
                    f"a return path needs a bidirectional channel; {self.channel.name} is not")
            self.out.send_counted(enc.open_return_path() + enc.ping(1))
            self._start_return_path()
        if self.postcopy_enabled:
            self.out.send_counted(enc.postcopy_advise(self.ram.page_size_summary(),
                                                      self.page_size))
        body = (enc.section_start(RAM_SECTION_ID, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION)
                + self.ram.block_list())
        # block_list() started the dirty log afresh: QEMU's first bitmap sync
        # (ram_init_bitmaps), which counts as pass 1 and starts the period
        # the dirty-page rate is measured over.
        self._count_sync(0, self.ram.pending_pages())
        self.out.send_counted(body)
        self.mfd.setup_done()
        self._end_ram_section()

    def _count_sync(self, new: int, pending_pages: int) -> None:
        """A dirty-bitmap sync: the stats' count (MIGRATION_PASS) and the hook."""
        with self._lock:
            count = self.stats.dirty_sync(new, pending_pages)
        trace("migration_bitmap_sync_end", new_dirty=new, pending=pending_pages, sync=count)
        if self.autoconverge is not None:
            self.autoconverge.on_sync(new, self.stats.transferred, self.page_size,
                                      guest_running=self.state.status is S.ACTIVE)
        self.dirty_limit.on_sync(new, self.stats.transferred)
        if self.on_pass:
            self.on_pass(count)

    def _end_ram_section(self) -> None:
        """EOS and footer; in QEMU 7.2's dialect first a sync of every channel.

        Two dialects order multifd pages against the main channel (the
        migration property ``multifd-flush-after-each-section``):

        * on (QEMU before 8.1, the ``none-7.2`` machine): every RAM section's
          EOS is a sync point; the destination syncs its channels when it
          reads the EOS, so no page of the next section can overtake one of
          this section on another channel;
        * off (QEMU 8.1 and later, the default): only a MULTIFD_FLUSH record
          is, written once in the setup section and once per dirty-bitmap
          round (:meth:`MultifdSource.flush`); a round's pages then cannot be
          overtaken by the next round's, and within a round each page goes
          out once.
        """
        self.mfd.section_end()
        self.out.send_counted(enc.ram_eos() + enc.section_footer(RAM_SECTION_ID))

    def _return_path_wanted(self) -> bool:
        return self.options.cap("return-path") or self.options.cap("postcopy-ram")

    def _iterate(self) -> bool:
        """Precopy iterations; True when they end to switch to postcopy.

        A requested postcopy starts at the next iteration whatever is still
        pending: RAM is all postcopiable, so QEMU's must-precopy part is 0.
        """
        self.out.limiter = RateLimiter(int(self.options.param("max-bandwidth")))
        passes = 0
        if self.postcopy_after == 0:
            self._postcopy_requested.set()
        while True:
            self._checkpoint()
            if self._postcopy_requested.is_set():
                return True
            if self._switchover_now.is_set():
                return False
            downtime_limit = int(self.options.param("downtime-limit"))
            avail = int(self.options.param("avail-switchover-bandwidth"))
            with self._lock:
                self.stats.update_window()
                threshold = self.stats.threshold(downtime_limit, avail)
                pending = self.ram.pending_pages() * self.page_size
                self.stats.set_remaining(pending // self.page_size)
            if pending == 0 or pending < threshold:
                new = self.ram.sync()
                passes += 1
                pending = self.ram.pending_pages() * self.page_size
                self._count_sync(new, pending // self.page_size)
                if self.postcopy_after is not None and passes >= self.postcopy_after:
                    self._postcopy_requested.set()
                    continue
                if pending <= threshold and self._switchover_allowed():
                    return False
            self._send_section(enc.section_part(RAM_SECTION_ID),
                               deadline=time.monotonic() + ITERATION_SECONDS)

    def _switchover_allowed(self) -> bool:
        """QEMU: with switchover-ack, a running guest waits for the destination's ACK."""
        return (not self.options.cap("switchover-ack") or not self.guest.running
                or self._switchover_acked.is_set())

    def _send_section(self, header: bytes, deadline: float | None) -> None:
        """One RAM section: until the round ends, or the time slice (``deadline``)
        or the phase's rate limit does."""
        out = self.out
        limiter = out.limiter
        out.send_counted(header)
        while True:
            self._checkpoint()
            if limiter is not None and limiter.exceeded():
                limiter.wait(self._cancel)
                if deadline is not None:
                    break
            if self.mfd.carries_pages:
                if not self.mfd.submit():
                    self.mfd.round_done(self.ram.round)
                    break
            else:
                batch = self.ram.next_batch(
                    PRECOPY_BATCH_PAGES if limiter is None
                    else limiter.batch_pages(self.page_size + 8, PRECOPY_BATCH_PAGES))
                if batch is None:
                    break
                out.send_batch(batch)
            if deadline is not None and time.monotonic() >= deadline:
                break
        self._end_ram_section()


    def _device_sections(self, described: list | None = None) -> list[bytes]:
        """The FULL section of every device (vCPUs stopped)."""
        records = []
        for dev in self.machine.devices(self.vcpus):
            values = dev.save(self.guest_state)
            body = dev.vmsd.encode(values)
            records.append(enc.section_full(dev.section_id, dev.idstr, dev.instance_id,
                                            dev.vmsd.version_id, body))
            if described is not None:
                described.append((dev.idstr, dev.instance_id, dev.vmsd, values))
        return records

    def _complete(self) -> None:
        """Switchover: everything left, then the devices (vCPUs are stopped)."""
        self._count_sync(self.ram.sync(), self.ram.pending_pages())
        self.ram.last_stage()
        if self.options.prop("send-switchover-start"):
            self.out.send_counted(enc.switchover_start())
        self._send_section(enc.section_end(RAM_SECTION_ID), None)
        described: list = []
        records = self._device_sections(described)
        records.append(enc.eof())
        records.append(enc.vmdescription(build_vmdesc(self.page_size, described)))
        self.out.send_counted(*records)
        self._eof_sent = True
        self.mfd.complete()
        with self._lock:
            self.stats.set_remaining(0)

    # -- return path -------------------------------------------------------
    def _start_return_path(self) -> None:
        """A reader for the current channel (a new one after each recovery)."""
        handlers = {
            rp.Pong: (self._on_pong, None),
            rp.SwitchoverAck: (self._on_switchover_ack, None),
            **self.postcopy.handlers(),
        }
        assert self.channel is not None     # run() set it
        self.return_path = ReturnPathReader(self.channel, self.state, handlers,
                                            on_end=self._wake.set)
        self.return_path.start()

    def _on_pong(self, ev: rp.Pong) -> None:
        trace("source_return_path_thread_pong", value=ev.value)
        self.pongs.append(ev.value)
        if ev.value == QEMU_VM_PING_PACKAGED_LOADED:
            self.postcopy.devices_loaded.set()
        self._wake.set()

    def _on_switchover_ack(self, ev: rp.SwitchoverAck) -> None:
        trace("source_return_path_thread_switchover_acked")
        self._switchover_acked.set()

    def _await_return_path(self) -> None:
        """QEMU waits for the destination's SHUT before calling it completed."""
        rpath = self.return_path
        if rpath is None:
            return
        self._wait_until(rpath.shut.is_set)
        rpath.check()

    def _stop_return_path(self) -> None:
        rpath, self.return_path = self.return_path, None
        if rpath is not None:
            # With postcopy-preempt it may be sending an urgent page.
            self.postcopy.shutdown_preempt()
            rpath.stop()
