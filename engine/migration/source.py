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
"""
from __future__ import annotations

import collections
import contextlib
import select
import socket
import sys
import threading
import time
from typing import Callable

import numpy as np

from engine.errors import (ChannelBrokenError, ChannelClosedError, ChannelError, ConfigError,
                           EngineError, InvalidCapabilityError, MigrationCancelled,
                           MigrationError, PostcopyError, PostcopyPaused, RemoteProtocolError,
                           StateError)
from engine.machine import RAM_SECTION_ID, GuestState, MachineProfile
from engine.migration import check_implemented
from engine.compress.zeropage import block_zero_page_mask
from engine.multifd.packet import packet_size
from engine.migration.ramsave import BATCH_PAGES, PRECOPY_BATCH_PAGES, RamSaver
from engine.migration.verify import memory_digests
from engine.options import MigrationOptions
from engine.procs import CpuMeter, no_cycle_collection
from engine.state import POSTCOPY_STATES, MigrationState, MigrationStatus as S
from engine.stats import MigrationInfo, StatsAccumulator
from engine.stream import encoder as enc
from engine.stream import returnpath as rp
from engine.stream.constants import (QEMU_VM_PING_PACKAGED_LOADED, RAM_SECTION_IDSTR,
                                     RAM_SECTION_VERSION, TARGET_PAGE_SIZE)
from engine.stream.encoder import RamRecordEncoder
from engine.stream.vmdesc import build_vmdesc
from engine.transport import connect, parse_uri
from engine.trace import trace

#: QEMU's BUFFER_DELAY: the rate limiter's and the bandwidth meter's window.
WINDOW_SECONDS = 0.1
#: ram_save_iterate's time slice.
ITERATION_SECONDS = 0.05
#: pages taken from the bitmap per hand-out to the multifd workers (8 packets)
BATCH_PAGES_MULTIFD = 1024
#: the smallest wire/reservation ratio a multifd charge assumes: a guest whose
#: pages were all zero so far may hand a full batch of data next
_MIN_WIRE_RATIO = 0.05
#: the interpreter's thread switch interval while postcopy runs, seconds.  The
#: return-path thread answers page requests (a destination vCPU waits on each);
#: with CPython's default 5 ms it can wait that long for the GIL each time the
#: migration thread holds it between two system calls.  The interval is
#: process-wide: set when the package goes out, restored when ``run`` returns.
POSTCOPY_SWITCH_INTERVAL = 1e-4
#: how often waits in postcopy look at the return path and control requests
POLL_SECONDS = 0.05
#: how long a source whose channel broke waits for the destination's SHUT.
RP_GRACE_SECONDS = 1.0
#: RESUME_ACK's only value (QEMU's MIGRATION_RESUME_ACK_VALUE)
RESUME_ACK_VALUE = 1


def _peer_closed(channel) -> bool:
    """Whether the other end of ``channel`` has closed or reset it (never blocks)."""
    try:
        fd = channel.fileno()
    except Exception:       # noqa: BLE001 - a channel with no descriptor: cannot tell
        return False
    if fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLRDHUP)
    events = dict(poller.poll(0)).get(fd, 0)
    if events & (select.POLLHUP | select.POLLERR | select.POLLRDHUP):
        return True
    if not events & select.POLLIN:
        return False
    sock = socket.socket(fileno=fd)     # borrowed: detached below, never closed
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True         # reset
    finally:
        sock.detach()


class RateLimiter:
    """``max-bandwidth`` as a byte budget per 100 ms window (0 = unlimited)."""

    def __init__(self, bytes_per_second: int, clock=time.monotonic, sleep=time.sleep):
        self.limit = bytes_per_second
        self.clock, self.sleep = clock, sleep
        self.window_start = clock()
        self.used = 0

    def account(self, nbytes: int) -> None:
        self.used += nbytes

    def exceeded(self) -> bool:
        if not self.limit:
            return False
        now = self.clock()
        if now - self.window_start >= WINDOW_SECONDS:
            self.window_start, self.used = now, 0
            return False
        return self.used >= self.limit * WINDOW_SECONDS

    def wait(self, cancelled: threading.Event) -> None:
        """Sleep until the current window ends (or cancel)."""
        remaining = self.window_start + WINDOW_SECONDS - self.clock()
        if remaining > 0:
            cancelled.wait(remaining)
        self.window_start, self.used = self.clock(), 0

    def wait_or(self, event: threading.Event) -> None:
        """Sleep until the current window ends, or less if ``event`` is set (a
        postcopy page request must not wait for the background's budget)."""
        remaining = self.window_start + WINDOW_SECONDS - self.clock()
        if remaining > 0 and event.wait(remaining):
            return
        self.window_start, self.used = self.clock(), 0

    def room(self) -> int | None:
        """Bytes the current window still allows; None when unlimited."""
        if not self.limit:
            return None
        return max(0, int(self.limit * WINDOW_SECONDS) - self.used)

    def batch_pages(self, bytes_per_page: int, most: int = BATCH_PAGES) -> int:
        """Pages for the next batch: at most ``most``, and no more than what is
        left of the window's budget at ``bytes_per_page``.

        What is left, not the whole budget: a batch sized by the budget and
        sent just under it would let a window carry nearly twice its bytes.
        At least one page, so a migration always moves.
        """
        room = self.room()
        if room is None:
            return most
        return max(1, min(most, room // bytes_per_page))

    def disable(self) -> None:
        self.limit = 0


class SourceMigration:
    """One outgoing migration.  Create, then ``run(channel)`` once.

    ``postcopy_after`` (needs ``postcopy-ram``): switch to postcopy by itself
    once that many dirty-bitmap passes have completed (0: before the first
    page is sent), as if ``start_postcopy()`` had been called then.
    """

    def __init__(self, guest, machine: MachineProfile, options: MigrationOptions,
                 *, on_status: Callable[[S, S], None] | None = None,
                 on_pass: Callable[[int], None] | None = None,
                 vcpus: int | None = None, runstate: str | None = None,
                 postcopy_after: int | None = None, uuid: bytes | None = None):
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
        self.ram = RamSaver(guest, self.page_size, detect_zero=detect)
        self.stats = StatsAccumulator(self.ram.total_bytes, self.page_size)
        self.error: EngineError | None = None
        self._cancel = threading.Event()
        self._continue = threading.Event()
        self._switchover_acked = threading.Event()
        check_implemented(options)
        self._lock = threading.Lock()
        self._rp_thread: threading.Thread | None = None
        self._rp_shut: threading.Event = threading.Event()
        self._rp_status: int | None = None
        self._rp_error: EngineError | None = None
        self.pongs: list[int] = []
        self.guest_state = GuestState(guest)
        #: globalstate's runstate; by default 'running' or 'prelaunch'
        self.runstate = runstate
        self.switchover_digests: dict[str, str] | None = None
        self.compute_digests = False
        self.multifd = options.cap("multifd")
        self.pool = None
        #: QEMU 7.2's multifd dialect (a sync at every RAM section) or later
        #: QEMUs' (a MULTIFD_FLUSH per round, noted in _flushed_round)
        self._flush_each_section = options.prop("multifd-flush-after-each-section")
        self._flushed_round = -1
        #: multifd rate accounting: what each batch in flight was charged (by
        #: seq), and the wire/reservation ratio of recent acknowledgements
        self._multifd_charged: dict[int, int] = {}
        self._wire_ratio = 1.0
        self._multifd_live = False      # the pool carries pages (precopy only)
        #: postcopy: the pool carries no pages but its channels stay open and
        #: sync at every RAM EOS, as QEMU 7.2's do (its destination waits for
        #: those syncs); ours accepts that or channels that ended
        self._multifd_sync_only = False
        self.uri: str | None = None
        self.limiter: RateLimiter | None = None

        # -- postcopy ----------------------------------------------------------
        self.postcopy = options.cap("postcopy-ram")
        self.preempt = options.cap("postcopy-preempt")
        if postcopy_after is not None:
            if not self.postcopy:
                raise InvalidCapabilityError(
                    "postcopy-ram", "switching to postcopy needs it enabled")
            if postcopy_after < 0:
                raise ConfigError(f"postcopy_after must be >= 0, not {postcopy_after}")
        self.postcopy_after = postcopy_after
        self._postcopy_requested = threading.Event()
        #: set once the package is on its way: page requests are valid from then on
        self._in_postcopy = False
        self._pong_packaged = threading.Event()
        #: wakes the migration thread: a page request, PONG 0x42, the return
        #: path ending, migrate-pause, a new bandwidth
        self._wake = threading.Event()
        #: (block index, first page, pages) asked for, served on the main channel
        self._requests: collections.deque[tuple[int, int, int]] = collections.deque()
        self.preempt_channel = None
        self._preempt_lock = threading.Lock()
        self._preempt_encoder = RamRecordEncoder(self.page_size)
        self._pause_requested = threading.Event()
        self._resume_event = threading.Event()
        self._resume_uri: str | None = None
        self._abandoned: str | None = None
        self._received: dict[int, np.ndarray] = {}
        self._resume_acked = threading.Event()
        #: the reason of the latest pause, or of the latest failed recovery
        self.pause_error: EngineError | None = None
        self._owned_channels: list = []
        #: set by yank(): the channel errors that follow are of our own making
        self._yanked = False
        self._saved_switch_interval: float | None = None
        #: CPU of this process and its multifd workers during the migration
        self.cpu = CpuMeter(lambda: [p.pid for p in self.pool.procs] if self.pool else [])

    def prepare(self) -> None:
        """Start the multifd workers now, before the migration's clock runs.

        QEMU's channels are threads and cost nothing to start; ours are
        processes, so a caller that knows a migration is coming (the command
        line, a monitor) starts them ahead, like a thread pool.  ``run`` calls
        this itself if nobody did.
        """
        if not self.multifd or self.pool is not None:
            return
        from engine.multifd.pool import SendPool
        opts = self.options
        codec = opts.param("multifd-compression")
        level = {"zlib": opts.param("multifd-zlib-level"),
                 "zstd": opts.param("multifd-zstd-level")}.get(codec)
        self.pool = SendPool(int(opts.param("multifd-channels")), self.guest.blocks,
                             codec=codec, level=level,
                             zero_detect=opts.param("zero-page-detection") == "multifd",
                             page_size=self.page_size)
        self.pool.on_ack = self._on_multifd_ack
        # A cancel, or the destination's SHUT, must not wait for workers stuck
        # on a destination that stopped reading (QEMU shuts the channels down).
        self.pool.check_abort = self._check_cancel

    def _multifd_reservation(self, npages: int) -> int:
        """Bytes a batch of ``npages`` may take on the wire at most: every page
        in full plus each packet's header (QEMU 7.2 charges exactly this at
        hand-off)."""
        packets = -(-npages // self.pool.page_count)
        return npages * self.page_size + packets * packet_size(self.pool.page_count)

    def _multifd_charge(self, npages: int) -> int:
        """What a batch is charged when handed to a worker: its reservation
        scaled by the wire/reservation ratio of the batches acknowledged so
        far.  Charging the full reservation held a zero-page-heavy guest to
        max-bandwidth in guest pages rather than wire bytes until the give-back
        at each acknowledgement caught up (a 1 GiB idle guest took 0.5-0.8 s
        on 4 channels against 0.15 s on one); QEMU since 8.x charges what was
        written, after the fact."""
        return max(1, int(self._multifd_reservation(npages) * self._wire_ratio))

    def _on_multifd_ack(self, ack) -> None:
        with self._lock:
            self.stats.add_normal(ack.normal, 0)
            self.stats.add_zero(ack.zero, 0)
            self.stats.add_multifd_bytes(ack.wire_bytes)
        reserved = self._multifd_reservation(ack.normal + ack.zero)
        charged = self._multifd_charged.pop(ack.seq, reserved)
        if reserved:
            ratio = 0.5 * self._wire_ratio + 0.5 * ack.wire_bytes / reserved
            self._wire_ratio = min(1.0, max(_MIN_WIRE_RATIO, ratio))
        if self.limiter is not None:
            # Now that the batch's real size is known, settle the difference
            # with its charge, so max-bandwidth limits bytes on the wire.
            self.limiter.account(ack.wire_bytes - charged)

    # -- control from other threads ------------------------------------
    def cancel(self) -> None:
        """migrate_cancel: stop at the next batch boundary.

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

    def start_postcopy(self) -> None:
        """QMP migrate-start-postcopy: switch to postcopy at the next iteration.

        Raises :class:`~engine.errors.InvalidCapabilityError` without
        ``postcopy-ram`` and :class:`StateError` unless the migration is in
        ``setup`` or ``active``.
        """
        if not self.postcopy:
            raise InvalidCapabilityError(
                "postcopy-ram", "enable it before the migration starts to use "
                "migrate-start-postcopy")
        self.state.expect(S.SETUP, S.WAIT_UNPLUG, S.ACTIVE)
        self._postcopy_requested.set()

    def pause(self) -> None:
        """QMP migrate-pause: break the channels; the migration waits in
        ``postcopy-paused`` for :meth:`resume` (only in ``postcopy-active`` or
        ``postcopy-recover``; :class:`StateError` otherwise)."""
        self.state.expect(S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER)
        self._pause_requested.set()
        for ch in (self.channel, self.preempt_channel):
            if ch is not None:
                with contextlib.suppress(Exception):
                    ch.shutdown()
        self._wake.set()

    def yank(self) -> None:
        """QEMU's yank of the migration: shut down (not close) the main channel
        (the return path rides on it) and the preempt channel, from any thread.

        Nothing is told to the migration: it fails, or in postcopy pauses,
        on the errors that follow, as it would on a dead network.  The multifd
        channels are the workers' sockets; the caller reaches those.
        """
        self._yanked = True
        for ch in (getattr(self, "channel", None), self.preempt_channel):
            if ch is not None:
                with contextlib.suppress(Exception):
                    ch.shutdown()
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
        with self._lock:
            self._resume_uri = uri
        self._resume_event.set()

    def abandon(self, reason: str) -> None:
        """Give up a paused postcopy that nobody can recover (the destination
        is gone, or there is no monitor to send migrate-recover there): the
        migration fails; the guest now exists only where it ran last."""
        with self._lock:
            self._abandoned = reason
        self._resume_event.set()

    def set_parameters(self, params: dict) -> None:
        """migrate-set-parameters while migrating: validated, applied at once.

        Like QEMU, max-bandwidth, max-postcopy-bandwidth and downtime-limit
        take effect on the running migration (the next iteration reads them);
        the others on the next one.
        """
        self.options = self.options.with_parameters(params)
        limiter = self.limiter
        if limiter is not None:
            name = "max-postcopy-bandwidth" if self._in_postcopy else "max-bandwidth"
            if name in params:
                limiter.limit = int(self.options.param(name))
                self._wake.set()

    def migrate_continue(self, expected: str = "pre-switchover") -> None:
        """QMP migrate-continue: leave pre-switchover (guarded by the state)."""
        self.state.expect(S(expected))
        self._continue.set()

    def info(self) -> MigrationInfo:
        """query-migrate; ``error-desc`` only with status failed, as QEMU shows it
        (a cancel is not an error; :attr:`error` still says what ended it)."""
        with self._lock:
            status = self.state.status
            failed = status is S.FAILED and self.error is not None
            return self.stats.snapshot(status.value,
                                       error_desc=str(self.error) if failed else None)

    # -- the migration thread ------------------------------------------
    def run(self, channel, uri: str | None = None) -> MigrationInfo:
        """Migrate over ``channel`` (connected); multifd and the postcopy preempt
        channel connect to ``uri``.  The caller keeps owning ``channel``."""
        with no_cycle_collection():
            return self._run(channel, uri)

    def _run(self, channel, uri: str | None) -> MigrationInfo:
        self.channel = channel
        self.uri = uri
        self.limiter = None
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
        try:
            self._setup()
            # A migrate_cancel issued during setup ends it in setup, as in QEMU,
            # instead of after a first pass of active.
            self._check_cancel()
            self.stats.setup_done()
            self.state.transition(S.ACTIVE)
            postcopy = self._iterate()
            if postcopy:
                self._postcopy_prepare()
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
            # The guest is stopped: whatever is left goes out as fast as the
            # channels carry it (QEMU checks max-bandwidth only while iterating;
            # a cap here would stretch the downtime, and with multifd it shrank
            # every hand-out to a page or two).
            self.limiter = None
            if self.options.cap("pause-before-switchover"):
                self.state.transition(S.PRE_SWITCHOVER)
                while not self._continue.wait(0.05):
                    self._check_cancel()
            self.state.transition(S.DEVICE)
            if postcopy:
                self._postcopy_switch()
                self._postcopy_run()
            else:
                self._complete()
                self._await_return_path()
            with self._lock:
                self.stats.completed()
                self.stats.set_cpu_seconds(self.cpu.stop())
            self.state.transition(S.COMPLETED)
            if self.compute_digests:
                # The guest stays stopped after completion (QEMU's postmigrate)
                # and nothing else writes its memory, so hashing it now gives
                # the switchover contents without adding to the downtime.
                self.switchover_digests = memory_digests(self.guest.blocks)
        except BaseException as exc:  # includes KeyboardInterrupt: cancel path
            if self.pool is not None:
                self.pool.kill()
            self._abort(self._with_destination_reason(exc), stopped_by_us)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            self._restore_switch_interval()
            self._stop_return_path()
            self._close_preempt()
            for ch in self._owned_channels:
                with contextlib.suppress(Exception):
                    ch.close()
            self._owned_channels.clear()
            if self.pool is not None:
                self.pool.close()
        return self.info()

    def _abort(self, exc: BaseException, stopped_by_us: bool) -> None:
        """Leave the source as it was: guest running, memory untouched.

        Except once the destination may run the guest (postcopy after
        ``postcopy-device``): then restarting it here would run it twice.
        """
        status = self.state.status
        split = status in POSTCOPY_STATES and status is not S.POSTCOPY_DEVICE
        for ch in (self.channel, self.preempt_channel):
            if ch is not None:
                with contextlib.suppress(Exception):
                    ch.shutdown()
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
        if stopped_by_us and not split:
            self.guest.start()
            self.guest_state.note_started()
        if self.state.status is S.CANCELLING:
            self.state.transition(S.CANCELLED)

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled("migration cancelled")
        if self._rp_error is not None:
            raise self._rp_error
        if self._rp_status:
            # The destination gave up loading: sending on (or, worse, stopping
            # the guest for a switchover) cannot succeed any more.
            raise self._shut_error()

    def _with_destination_reason(self, exc: BaseException) -> BaseException:
        """A channel that broke under us usually broke because the destination
        gave up; its SHUT, if it sent one, says so and is the better reason.
        It may still be in flight on the return path, so wait for it briefly."""
        if not isinstance(exc, ChannelError) or self._cancel.is_set():
            return exc
        if self._yanked:
            # Our own shutdown: the destination did not give up.
            err = type(exc)(f"{exc} (the migration's channels were yanked)")
            err.__cause__ = exc
            return err
        if self._rp_thread is not None:
            deadline = time.monotonic() + RP_GRACE_SECONDS
            while not self._rp_shut.wait(0.02) and time.monotonic() < deadline:
                pass
            if self._rp_status:
                err = MigrationError(f"{self._shut_error()}; the source then saw: {exc}")
                err.__cause__ = exc
                return err
        if self.state.status in POSTCOPY_STATES or not _peer_closed(self.channel):
            return exc      # the destination is still there: a channel broke alone
        why = f"{exc} (the destination gave up: it rejected the stream or failed; its " \
              "log says why"
        if (self.multifd and not self._flush_each_section
                and self.stats.dirty_sync_count <= 1):
            # The likeliest rejection this early: QEMU before 8.1 refuses the
            # MULTIFD_FLUSH record (0x200) of the setup section.
            why += "; a QEMU older than 8.1 refuses today's multifd stream: use " \
                   "--machine none-7.2 (or --global migration.multifd-flush-after-each-" \
                   "section=on with zero-page-detection=legacy)"
        err = type(exc)(why + ")")
        err.__cause__ = exc
        return err

    def _shut_error(self) -> MigrationError:
        return MigrationError(
            f"destination reported an error loading the stream (SHUT {self._rp_status})")

    def _send(self, buffers) -> None:
        self.channel.sendmsg_all(buffers)

    def _send_counted(self, data: bytes) -> None:
        self._send([data])
        self.stats.add_bytes(len(data))

    def _setup(self) -> None:
        if self.preempt and self.uri is None:
            raise MigrationError("postcopy-preempt needs the destination's URI to open "
                                 "its preempt channel")
        if self.multifd:
            if self.uri is None:
                raise MigrationError("multifd needs the destination's URI to open its channels")
            self.prepare()
            # QEMU opens every multifd channel before the header goes out.
            self.pool.connect(self.uri, self.uuid or bytes(16))
            self._multifd_live = True
        config = {}
        if self.uuid is not None and self.options.cap("validate-uuid"):
            config["configuration/uuid"] = enc.config_uuid(self.uuid)
        head = [enc.file_header(), enc.configuration(self.machine.type_name, config)]
        self._send(head)
        self.stats.add_bytes(sum(len(b) for b in head))
        if self._return_path_wanted():
            if not self.channel.bidirectional:
                raise MigrationError(
                    f"a return path needs a bidirectional channel; {self.channel.name} is not")
            self._send_counted(enc.open_return_path() + enc.ping(1))
            self._start_return_path()
        if self.postcopy:
            self._send_counted(enc.postcopy_advise(self.ram.page_size_summary(),
                                                   self.page_size))
        body = (enc.section_start(RAM_SECTION_ID, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION)
                + self.ram.block_list())
        # block_list() started the dirty log afresh: QEMU's first bitmap sync
        # (ram_init_bitmaps), which counts as pass 1 and starts the period
        # the dirty-page rate is measured over.
        self._count_sync(0, self.ram.pending_pages())
        self._send([body])
        self.stats.add_bytes(len(body))
        if self._multifd_live and not self._flush_each_section:
            # QEMU >= 8.1: the setup section's flush, after the block list;
            # it also tells the destination which dialect this stream speaks.
            self._multifd_flush()
        self._end_ram_section()

    def _count_sync(self, new: int, pending_pages: int) -> None:
        """A dirty-bitmap sync: the stats' count (MIGRATION_PASS) and the hook."""
        with self._lock:
            count = self.stats.dirty_sync(new, pending_pages)
        trace("migration_bitmap_sync_end", new_dirty=new, pending=pending_pages, sync=count)
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
          round (:meth:`_multifd_flush`); a round's pages then cannot be
          overtaken by the next round's, and within a round each page goes
          out once.
        """
        if self._multifd_live and self._flush_each_section:
            self.pool.sync()
        tail = enc.ram_eos() + enc.section_footer(RAM_SECTION_ID)
        self._send([tail])
        self.stats.add_bytes(len(tail))

    def _multifd_flush(self) -> None:
        """QEMU's multifd_ram_flush_and_sync: a SYNC on every channel, then the
        MULTIFD_FLUSH record that tells the destination to wait for them."""
        self.pool.sync()
        self._send_counted(enc.ram_flush())

    def _round_done(self) -> None:
        """The scan reached the end of RAM (QEMU: the page search wrapped)."""
        if self._multifd_live and not self._flush_each_section \
                and self._flushed_round != self.ram.round:
            self._flushed_round = self.ram.round
            self._multifd_flush()

    def _return_path_wanted(self) -> bool:
        return self.options.cap("return-path") or self.options.cap("postcopy-ram")

    def _iterate(self) -> bool:
        """Precopy iterations; True when they end to switch to postcopy.

        A requested postcopy starts at the next iteration whatever is still
        pending: RAM is all postcopiable, so QEMU's must-precopy part is 0.
        """
        limiter = RateLimiter(int(self.options.param("max-bandwidth")))
        self.limiter = limiter
        passes = 0
        if self.postcopy_after == 0:
            self._postcopy_requested.set()
        while True:
            self._check_cancel()
            if self._postcopy_requested.is_set():
                return True
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
            self._send_section(enc.section_part(RAM_SECTION_ID), limiter,
                               deadline=time.monotonic() + ITERATION_SECONDS)

    def _switchover_allowed(self) -> bool:
        """QEMU: with switchover-ack, a running guest waits for the destination's ACK."""
        return (not self.options.cap("switchover-ack") or not self.guest.running
                or self._switchover_acked.is_set())

    def _send_section(self, header: bytes, limiter: RateLimiter | None,
                      deadline: float | None) -> None:
        self._send([header])
        self.stats.add_bytes(len(header))
        while True:
            self._check_cancel()
            if limiter is not None and limiter.exceeded():
                limiter.wait(self._cancel)
                if deadline is not None:
                    break
            if self._multifd_live:
                if not self._submit_multifd():
                    self._round_done()
                    break
            else:
                batch = self.ram.next_batch(
                    PRECOPY_BATCH_PAGES if limiter is None
                    else limiter.batch_pages(self.page_size + 8, PRECOPY_BATCH_PAGES))
                if batch is None:
                    break
                self.channel.send_views(batch.buffers)
                self._account_batch(batch)
                if limiter is not None:
                    limiter.account(batch.wire_bytes)
            if deadline is not None and time.monotonic() >= deadline:
                break
        self._end_ram_section()

    def _account_batch(self, batch) -> None:
        with self._lock:
            self.stats.add_normal(batch.normal, batch.normal * (8 + self.page_size))
            self.stats.add_zero(batch.zero,
                                batch.wire_bytes - batch.normal * (8 + self.page_size))
            self.stats.set_remaining(self.ram.pending_pages())

    def _submit_multifd(self) -> bool:
        """Hand the next dirty pages to the workers; False when the round is done.

        With zero-page-detection=legacy the zero pages are found here and go
        on the main channel as ZERO records (what QEMU 7.2 always does);
        otherwise the workers find them (multifd) or nobody does (none).
        """
        limiter = self.limiter
        most = BATCH_PAGES_MULTIFD
        if limiter is not None:
            # A page and its share of a packet header, as the charge counts.
            full = self.pool.page_count
            most = limiter.batch_pages(-(-self._multifd_charge(full) // full), most)
        item = self.ram.next_pages(most)
        if item is None:
            return False
        index, idx = item
        if self.options.param("zero-page-detection") == "legacy":
            bm = self.ram.bitmaps[index]
            block = bm.block
            zero = block_zero_page_mask(block, idx, self.page_size, bm.holes)
            if zero.any():
                offsets = idx.astype(np.uint64) * np.uint64(self.page_size)
                records = [self.ram.encoder.zero_pages(block.idstr, offsets[zero])]
                self._send(records)
                nbytes = sum(len(r) for r in records)
                with self._lock:
                    self.stats.add_zero(int(zero.sum()), nbytes)
                if limiter is not None:
                    limiter.account(nbytes)
                idx = idx[~zero]
        if len(idx):
            if limiter is not None:
                # One hand-out is one BATCH (most <= the pool's batch size).
                charge = self._multifd_charge(len(idx))
                self._multifd_charged[self.pool.next_seq] = charge
                limiter.account(charge)
            self.pool.submit(index, idx.astype(np.uint64))
        self.pool.poll_acks()
        with self._lock:
            self.stats.set_remaining(self.ram.pending_pages())
        return True

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
        if self.options.prop("send-switchover-start"):
            self._send_counted(enc.switchover_start())
        self._send_section(enc.section_end(RAM_SECTION_ID), None, None)
        described: list = []
        records = self._device_sections(described)
        records.append(enc.eof())
        records.append(enc.vmdescription(build_vmdesc(self.page_size, described)))
        self._send(records)
        self.stats.add_bytes(sum(len(r) for r in records))
        if self._multifd_live:
            self.pool.finish()      # BYE: every channel closed cleanly
            self._multifd_live = False
        with self._lock:
            self.stats.set_remaining(0)

    # -- postcopy: the switch ----------------------------------------------
    def _postcopy_prepare(self) -> None:
        """Spec 4.5 steps 3-4, guest still running: the preempt channel, then
        the "postcopy prepare" PART section whose multifd sync puts every page
        multifd carried in place before the destination can run the guest."""
        if self.preempt:
            # A PONG says the destination took the main channel: the preempt
            # channel must reach it after the main (and multifd) ones.
            self._wait_until(lambda: bool(self.pongs), self._check_cancel)
            self._connect_preempt(self.uri)
        self._send_counted(enc.section_part(RAM_SECTION_ID))
        if self._multifd_live and not self._flush_each_section:
            self._multifd_flush()
        self._end_ram_section()
        if self._multifd_live:
            # Postcopy pages are placed one by one as they arrive (multifd
            # cannot do that): no more pages for the pool.  QEMU 7.2 keeps
            # the channels and syncs them at every EOS (its destination waits
            # for that); QEMU 10.1 closes them.
            self._multifd_live = False
            if self._flush_each_section:
                self._multifd_sync_only = True
            else:
                self.pool.finish()

    def _postcopy_switch(self) -> None:
        """Spec 4.5 steps 7-9, guest stopped, in ``device``: discards, package."""
        new = self.ram.sync()
        pending = self.ram.pending_pages()
        self._count_sync(new, pending)
        discards = self.ram.discard_commands()
        # QEMU forgets the last block after the discard, so the first
        # postcopy record names its block.
        self.ram.encoder.reset()
        self.ram.rewind()
        self._send_counted(discards + enc.ping(2))
        package = [enc.postcopy_listen(), *self._device_sections(), enc.ping(3)]
        if self._rp_thread is not None:
            package.append(enc.ping(QEMU_VM_PING_PACKAGED_LOADED))
        package.append(enc.postcopy_run())
        self._check_cancel()        # the last moment a cancel can win
        self._in_postcopy = True    # the destination may fault while loading devices
        self._saved_switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(POSTCOPY_SWITCH_INTERVAL)
        self._send_counted(enc.packaged(b"".join(package)) + enc.ping(4))
        with self._lock:
            self.stats.postcopy_started()
        self.limiter = RateLimiter(int(self.options.param("max-postcopy-bandwidth")))
        self.state.transition(S.POSTCOPY_DEVICE if self._rp_thread is not None
                              else S.POSTCOPY_ACTIVE)

    def _restore_switch_interval(self) -> None:
        if self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None

    # -- postcopy: background, requests, pause and recovery ---------------------
    def _postcopy_run(self) -> None:
        """Until the destination's SHUT(0); a broken channel in
        ``postcopy-active`` pauses, and the loop goes on after a recovery."""
        while True:
            try:
                self._postcopy_send_all()
                return
            except (ChannelError, OSError, PostcopyPaused) as exc:
                if self.state.status is not S.POSTCOPY_ACTIVE:
                    raise           # postcopy-device: a precopy failure
                self._postcopy_paused(exc)

    def _postcopy_check(self) -> None:
        """Raise what ends or pauses the postcopy; note PONG 0x42."""
        if self._pause_requested.is_set():
            raise PostcopyPaused("paused by migrate-pause")
        if self._rp_error is not None:
            raise self._rp_error
        if self._rp_status:
            raise self._shut_error()
        if self.state.status is S.POSTCOPY_DEVICE and self._pong_packaged.is_set():
            self.state.transition(S.POSTCOPY_ACTIVE)

    def _postcopy_send_all(self) -> None:
        """RAM PART sections until nothing is left, then END, EOF and SHUT."""
        limiter = self.limiter
        while True:
            self._postcopy_check()
            if not self._requests and not self._pending():
                break
            self._send_counted(enc.section_part(RAM_SECTION_ID))
            deadline = time.monotonic() + ITERATION_SECONDS
            while True:
                # Cleared before looking: a request arriving from here on
                # sets it again and cuts the next sleep short.
                self._wake.clear()
                self._postcopy_check()
                self._serve_requests()
                if limiter.exceeded():
                    limiter.wait_or(self._wake)
                    if time.monotonic() >= deadline:
                        break
                    continue
                batch = self.ram.next_batch(limiter.batch_pages(self.page_size + 8))
                if batch is None:
                    if not self._pending():
                        break
                    self.ram.rewind()       # pages skipped after a request
                    continue
                self.channel.send_views(batch.buffers)
                self._account_batch(batch)
                limiter.account(batch.wire_bytes)
                if time.monotonic() >= deadline:
                    break
            self._postcopy_multifd_sync()
            self._send_counted(enc.ram_eos() + enc.section_footer(RAM_SECTION_ID))
        # QEMU completes only after PONG 0x42 (postcopy-device -> active).
        self._wait_until(lambda: self.state.status is not S.POSTCOPY_DEVICE,
                         self._postcopy_check)
        self._end_preempt()
        self._send_counted(enc.section_end(RAM_SECTION_ID))
        self._postcopy_multifd_sync()
        self._send_counted(enc.ram_eos() + enc.section_footer(RAM_SECTION_ID) + enc.eof())
        with self._lock:
            self.stats.set_remaining(0)
        if self._rp_thread is not None:
            self._wait_until(lambda: self._rp_shut.is_set(), self._postcopy_check)
            self._postcopy_check()
        if self._multifd_sync_only:
            self._multifd_sync_only = False
            self.pool.finish()      # BYE, after the destination's SHUT as in QEMU 7.2

    def _postcopy_multifd_sync(self) -> None:
        """QEMU 7.2's per-section sync, in postcopy too (no pages move).

        If a channel broke, multifd is over for this migration: the pool
        goes and the destination sees the channels end (ours accepts that);
        postcopy itself goes on over the main and preempt channels.
        """
        if not self._multifd_sync_only:
            return
        try:
            self.pool.sync()
        except EngineError:
            self._multifd_sync_only = False
            self.pool.kill()

    def _pending(self) -> int:
        with self.ram.lock:
            return self.ram.pending_pages()

    def _wait_until(self, done: Callable[[], bool], check: Callable[[], None]) -> None:
        """Block until ``done()``, calling ``check()`` (which raises) meanwhile."""
        while True:
            self._wake.clear()
            check()
            if done():
                return
            self._wake.wait(POLL_SECONDS)

    def _serve_requests(self) -> None:
        """Pages the destination asked for, ahead of the background scan
        (without postcopy-preempt: on the main channel, inside the section)."""
        while self._requests:
            index, first, count = self._requests.popleft()
            idx = self.ram.take_range(index, first, count)
            for start in range(0, len(idx), BATCH_PAGES):
                batch = self.ram.encode(index, idx[start:start + BATCH_PAGES])
                self.channel.send_views(batch.buffers)
                self._account_batch(batch)
                if self.limiter is not None:
                    self.limiter.account(batch.wire_bytes)

    def _on_page_request(self, block: str | None, start: int, length: int) -> None:
        """Return-path thread: one REQ_PAGES(_ID) message."""
        with self._lock:
            self.stats.add_postcopy_requests(1)
        if not self._in_postcopy:
            raise RemoteProtocolError("page request before postcopy started",
                                      channel="return path")
        index = self.ram.block_index(block) if block is not None else None
        if index is None:
            raise RemoteProtocolError(f"page request for unknown RAM block {block!r}",
                                      channel="return path")
        used = self.ram.bitmaps[index].block.used_length
        ps = self.page_size
        if start % ps or length % ps or length <= 0 or start + length > used:
            raise RemoteProtocolError(
                f"page request of {length:#x} bytes at {start:#x} of block {block!r} "
                f"({used:#x} bytes) is not a range of whole {ps}-byte pages in it",
                channel="return path")
        first, count = start // ps, length // ps
        if self.preempt_channel is not None:
            self._send_urgent(index, first, count)
        else:
            self._requests.append((index, first, count))
            self._wake.set()

    def _send_urgent(self, index: int, first: int, count: int) -> None:
        """Return-path thread, postcopy-preempt: the pages at once, on the preempt
        channel, unless another sender took them first."""
        with self._preempt_lock:
            channel = self.preempt_channel
            if channel is None:         # ended: nothing is left to send anyway
                return
            # Taken under the preempt lock: the EOS that ends the channel
            # cannot come between taking a page and sending it.
            if count == 1:
                self._send_urgent_page(channel, index, first)
                return
            idx = self.ram.take_range(index, first, count)
            if not len(idx):
                return
            for start in range(0, len(idx), BATCH_PAGES):
                batch = self.ram.encode(index, idx[start:start + BATCH_PAGES],
                                        self._preempt_encoder)
                channel.send_views(batch.buffers)
                self._account_batch(batch)

    def _send_urgent_page(self, channel, index: int, page: int) -> None:
        """One requested page (the usual request): the fault's latency path.

        The source guest is stopped in postcopy, so the record can point
        straight into guest memory: no staging copy, no batch encoder.
        ``remaining`` is left to the migration thread (counting the bitmap
        here would cost more than sending the page).
        """
        if not self.ram.take_page(index, page):
            return
        block = self.ram.bitmaps[index].block
        data = block.pages[page]
        offset = page * self.page_size
        if not self.ram.detect_zero or data.view(np.uint64).any():
            channel.sendmsg_all([self._preempt_encoder.page_header(block.idstr, offset), data])
            wire = 8 + self.page_size
            with self._lock:
                self.stats.add_normal(1, wire)
        else:
            record = self._preempt_encoder.zero_page(block.idstr, offset)
            channel.sendmsg_all([record])
            with self._lock:
                self.stats.add_zero(1, len(record))

    def _connect_preempt(self, uri: str) -> None:
        channel = connect(uri)
        with self._preempt_lock:
            # A new channel: the destination knows no previous block on it.
            self._preempt_encoder = RamRecordEncoder(self.page_size)
            self.preempt_channel = channel

    def _end_preempt(self) -> None:
        """EOS on the preempt channel: no urgent page follows (everything was sent)."""
        with self._preempt_lock:
            channel, self.preempt_channel = self.preempt_channel, None
            if channel is not None:
                self._owned_channels.append(channel)
                channel.sendmsg_all([enc.ram_eos()])

    def _close_preempt(self) -> None:
        with self._preempt_lock:
            channel, self.preempt_channel = self.preempt_channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.shutdown()
            channel.close()

    def _teardown_channels(self) -> None:
        """Stop the return path and drop the broken channels (pause, failed recovery)."""
        self._stop_return_path()
        self._close_preempt()
        if self.channel in self._owned_channels:
            self._owned_channels.remove(self.channel)
            self.channel.close()

    def _postcopy_paused(self, cause: BaseException) -> None:
        """``postcopy-paused`` until a :meth:`resume` succeeds (spec 4.6)."""
        self._teardown_channels()
        self._enter_paused(cause)
        while True:
            while not self._resume_event.wait(POLL_SECONDS):
                pass
            self._resume_event.clear()
            with self._lock:
                uri, abandoned = self._resume_uri, self._abandoned
            if abandoned is not None:
                raise PostcopyError(f"postcopy abandoned while paused: {abandoned}")
            self.state.transition(S.POSTCOPY_RECOVER_SETUP)
            try:
                channel = connect(uri)
            except (EngineError, OSError) as exc:
                self._enter_paused(exc)
                continue
            self._owned_channels.append(channel)
            self.channel = channel
            self.state.transition(S.POSTCOPY_RECOVER)
            try:
                self._resume_handshake(uri)
            except (EngineError, OSError) as exc:
                self._teardown_channels()
                self._enter_paused(exc)
                continue
            self.state.transition(S.POSTCOPY_ACTIVE)
            return

    def _enter_paused(self, cause: BaseException) -> None:
        self._pause_requested.clear()
        self._requests.clear()      # the destination asks again after the resume
        with self._lock:
            self.pause_error = cause if isinstance(cause, EngineError) else \
                ChannelBrokenError(f"{type(cause).__name__}: {cause}")
        self.state.transition(S.POSTCOPY_PAUSED)

    def _resume_handshake(self, uri: str) -> None:
        """``postcopy-recover``: the received bitmaps, then POSTCOPY_RESUME."""
        self._received = {}
        self._resume_acked.clear()
        self._start_return_path()
        nblocks = len(self.ram.bitmaps)
        self._send_counted(b"".join(enc.recv_bitmap(bm.block.idstr)
                                    for bm in self.ram.bitmaps))
        self._wait_until(lambda: len(self._received) == nblocks, self._recover_check)
        for index, received in self._received.items():
            self.ram.set_received(index, received)
        self.ram.encoder.reset()
        if self.preempt:
            self._connect_preempt(uri)
        self._send_counted(enc.postcopy_resume())
        self._wait_until(self._resume_acked.is_set, self._recover_check)
        with self._lock:
            self.stats.set_remaining(self._pending())

    def _recover_check(self) -> None:
        if self._pause_requested.is_set():
            raise PostcopyPaused("paused by migrate-pause")
        if self._rp_error is not None:
            raise self._rp_error
        if self._rp_shut.is_set():
            raise ChannelClosedError(
                f"{self.channel.name}: the return path ended during recovery"
                + (f" (SHUT {self._rp_status})" if self._rp_status is not None else ""))

    def _on_received_bitmap(self, ev: rp.ReceivedBitmap) -> None:
        """Return-path thread: a block's received bitmap (recovery only)."""
        if self.state.status is not S.POSTCOPY_RECOVER:
            raise RemoteProtocolError("received bitmap outside postcopy recovery",
                                      channel="return path")
        index = self.ram.block_index(ev.block)
        if index is None:
            raise RemoteProtocolError(f"received bitmap of unknown RAM block {ev.block!r}",
                                      channel="return path")
        npages = len(self.ram.bitmaps[index].bits)
        if len(ev.bitmap) != rp.recv_bitmap_size(npages):
            raise RemoteProtocolError(
                f"received bitmap of {ev.block!r} has {len(ev.bitmap)} bytes, expected "
                f"{rp.recv_bitmap_size(npages)}", channel="return path")
        self._received[index] = rp.bitmap_bits(ev.bitmap, npages)
        self._wake.set()

    # -- return path -------------------------------------------------------
    def _start_return_path(self) -> None:
        # Fresh per channel: a finished thread's flags must not leak into the next.
        self._rp_shut = shut = threading.Event()
        self._rp_error = None
        self._rp_status = None
        self._rp_thread = threading.Thread(target=self._rp_loop, args=(self.channel, shut),
                                           name="return-path", daemon=True)
        self._rp_thread.start()

    def _rp_loop(self, channel, shut: threading.Event) -> None:
        decoder = rp.ReturnPathDecoder()
        buf = bytearray(1 << 16)
        last_block: str | None = None       # REQ_PAGES names no block
        try:
            while not shut.is_set():
                n = channel.recv_into(buf)
                if n == 0:
                    if not shut.is_set() and self.state.status != S.COMPLETED:
                        raise ChannelClosedError(
                            f"{channel.name}: the destination closed the return path")
                    return
                decoder.feed(memoryview(buf)[:n])
                while True:
                    ev = decoder.next_event()
                    if ev is rp.NEED_DATA:
                        break
                    if isinstance(ev, rp.ReqPages):
                        if ev.block is not None:
                            last_block = ev.block
                        self._on_page_request(last_block, ev.start, ev.length)
                    elif isinstance(ev, rp.Pong):
                        self.pongs.append(ev.value)
                        if ev.value == QEMU_VM_PING_PACKAGED_LOADED:
                            self._pong_packaged.set()
                            self._wake.set()
                    elif isinstance(ev, rp.SwitchoverAck):
                        self._switchover_acked.set()
                    elif isinstance(ev, rp.RecvBitmapMsg):
                        pass        # its bitmap is the next event
                    elif isinstance(ev, rp.ReceivedBitmap):
                        self._on_received_bitmap(ev)
                    elif isinstance(ev, rp.ResumeAck):
                        if self.state.status is not S.POSTCOPY_RECOVER \
                                or ev.value != RESUME_ACK_VALUE:
                            raise RemoteProtocolError(
                                f"RESUME_ACK({ev.value}) in {self.state.status.value}",
                                channel="return path")
                        self._resume_acked.set()
                        self._wake.set()
                    elif isinstance(ev, rp.Shut):
                        if shut is self._rp_shut:
                            self._rp_status = ev.status
                        shut.set()
                        self._wake.set()
                        return
                    else:
                        raise RemoteProtocolError(
                            f"unexpected return-path message {type(ev).__name__}",
                            channel="return path")
        except (EngineError, OSError) as exc:
            if not shut.is_set() and shut is self._rp_shut:
                self._rp_error = exc if isinstance(exc, EngineError) else \
                    ChannelBrokenError(f"return path: {exc}")
                shut.set()
            self._wake.set()

    def _await_return_path(self) -> None:
        """QEMU waits for the destination's SHUT before calling it completed."""
        if self._rp_thread is None:
            return
        while not self._rp_shut.wait(0.05):
            if self._cancel.is_set():
                raise MigrationCancelled("migration cancelled")
        if self._rp_error is not None:
            raise self._rp_error
        if self._rp_status:
            raise self._shut_error()

    def _stop_return_path(self) -> None:
        if self._rp_thread is not None:
            self._rp_shut.set()
            try:
                self.channel.shutdown()
            except Exception:
                pass
            # With postcopy-preempt it may be sending an urgent page.
            preempt = self.preempt_channel
            if preempt is not None:
                with contextlib.suppress(Exception):
                    preempt.shutdown()
            self._rp_thread.join(5)
            self._rp_thread = None
