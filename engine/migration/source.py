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

The loop runs in the caller's thread.  ``cancel()`` and ``info()`` are safe
from any other thread (a progress display, a QMP monitor, a signal handler).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from engine.errors import (EngineError, MigrationCancelled,
                           MigrationError, RemoteProtocolError)
from engine.machine import RAM_SECTION_ID, GuestState, MachineProfile
from engine.migration import check_implemented
from engine.compress.zeropage import zero_page_mask_from_buffer
from engine.migration.ramsave import RamSaver
from engine.migration.verify import memory_digests
from engine.options import MigrationOptions
from engine.state import MigrationState, MigrationStatus as S
from engine.stats import MigrationInfo, StatsAccumulator
from engine.stream import encoder as enc
from engine.stream import returnpath as rp
from engine.stream.constants import RAM_SECTION_IDSTR, RAM_SECTION_VERSION, TARGET_PAGE_SIZE
from engine.stream.vmdesc import build_vmdesc

#: QEMU's BUFFER_DELAY: the rate limiter's and the bandwidth meter's window.
WINDOW_SECONDS = 0.1
#: ram_save_iterate's time slice.
ITERATION_SECONDS = 0.05
#: pages taken from the bitmap per hand-out to the multifd workers (8 packets)
BATCH_PAGES_MULTIFD = 1024


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

    def disable(self) -> None:
        self.limit = 0


class SourceMigration:
    """One outgoing migration.  Create, then ``run(channel)`` once."""

    def __init__(self, guest, machine: MachineProfile, options: MigrationOptions,
                 *, on_status: Callable[[S, S], None] | None = None,
                 on_pass: Callable[[int], None] | None = None,
                 vcpus: int | None = None, runstate: str | None = None):
        self.guest = guest
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
        self.uri: str | None = None
        self.limiter: RateLimiter | None = None

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

    def _on_multifd_ack(self, ack) -> None:
        with self._lock:
            self.stats.add_normal(ack.normal, 0)
            self.stats.add_zero(ack.zero, 0)
            self.stats.add_multifd_bytes(ack.wire_bytes)
        if self.limiter is not None:
            self.limiter.account(ack.wire_bytes)

    # -- control from other threads ------------------------------------
    def cancel(self) -> None:
        """migrate_cancel: stop at the next batch boundary."""
        self._cancel.set()

    def set_parameters(self, params: dict) -> None:
        """migrate-set-parameters while migrating: validated, applied at once.

        Like QEMU, max-bandwidth and downtime-limit take effect on the running
        migration (the next iteration reads them); the others on the next one.
        """
        self.options = self.options.with_parameters(params)
        if self.limiter is not None and "max-bandwidth" in params:
            self.limiter.limit = int(self.options.param("max-bandwidth"))

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
        """Migrate over ``channel`` (connected); multifd channels connect to ``uri``."""
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
        try:
            self._setup()
            # A migrate_cancel issued during setup ends it in setup, as in QEMU,
            # instead of after a first pass of active.
            self._check_cancel()
            self.stats.setup_done()
            self.state.transition(S.ACTIVE)
            self._iterate()
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
            if self.options.cap("pause-before-switchover"):
                self.state.transition(S.PRE_SWITCHOVER)
                while not self._continue.wait(0.05):
                    self._check_cancel()
            self.state.transition(S.DEVICE)
            self._complete()
            self._await_return_path()
            with self._lock:
                self.stats.completed()
            self.state.transition(S.COMPLETED)
            if self.compute_digests:
                # The guest stays stopped after completion (QEMU's postmigrate)
                # and nothing else writes its memory, so hashing it now gives
                # the switchover contents without adding to the downtime.
                self.switchover_digests = memory_digests(self.guest.blocks)
        except BaseException as exc:  # includes KeyboardInterrupt: cancel path
            if self.pool is not None:
                self.pool.kill()
            self._abort(exc, stopped_by_us)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            self._stop_return_path()
            if self.pool is not None:
                self.pool.close()
        return self.info()

    def _abort(self, exc: BaseException, stopped_by_us: bool) -> None:
        """Leave the source as it was: guest running, memory untouched."""
        if stopped_by_us:
            self.guest.start()
            self.guest_state.note_started()
        try:
            self.channel.shutdown()
        except Exception:
            pass
        cancelled = self._cancel.is_set() or isinstance(exc, (KeyboardInterrupt, MigrationCancelled))
        with self._lock:
            if cancelled:
                self.error = MigrationCancelled("migration cancelled")
            elif isinstance(exc, EngineError):
                self.error = exc
            else:
                self.error = MigrationError(f"{type(exc).__name__}: {exc}")
        if cancelled and self.state.status not in (S.CANCELLED, S.COMPLETED):
            if self.state.status != S.CANCELLING:
                self.state.transition(S.CANCELLING)
            self.state.transition(S.CANCELLED)
        elif self.state.status not in (S.FAILED, S.CANCELLED, S.COMPLETED):
            self.state.transition(S.FAILED)

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled("migration cancelled")
        if self._rp_error is not None:
            raise self._rp_error
        if self._rp_status:
            # The destination gave up loading: sending on (or, worse, stopping
            # the guest for a switchover) cannot succeed any more.
            raise self._shut_error()

    def _shut_error(self) -> MigrationError:
        return MigrationError(
            f"destination reported an error loading the stream (SHUT {self._rp_status})")

    def _send(self, buffers) -> None:
        self.channel.sendmsg_all(buffers)

    def _setup(self) -> None:
        if self.multifd:
            if self.uri is None:
                raise MigrationError("multifd needs the destination's URI to open its channels")
            self.prepare()
            # QEMU opens every multifd channel before the header goes out.
            self.pool.connect(self.uri)
        head = [enc.file_header(), enc.configuration(self.machine.type_name)]
        self._send(head)
        self.stats.add_bytes(sum(len(b) for b in head))
        if self._return_path_wanted():
            if not self.channel.bidirectional:
                raise MigrationError(
                    f"a return path needs a bidirectional channel; {self.channel.name} is not")
            cmds = enc.open_return_path() + enc.ping(1)
            self._send([cmds])
            self.stats.add_bytes(len(cmds))
            self._start_return_path()
        body = (enc.section_start(RAM_SECTION_ID, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION)
                + self.ram.block_list())
        self._send([body])
        self.stats.add_bytes(len(body))
        self._end_ram_section()

    def _end_ram_section(self) -> None:
        """EOS and footer; with multifd first a sync of every channel.

        This is QEMU 7.2's per-section multifd sync (what later QEMUs call
        multifd-flush-after-each-section): the destination syncs its channels
        when it reads the EOS, so no page of the next section can overtake
        one of this section on another channel.
        """
        if self.pool is not None:
            self.pool.sync()
        tail = enc.ram_eos() + enc.section_footer(RAM_SECTION_ID)
        self._send([tail])
        self.stats.add_bytes(len(tail))

    def _return_path_wanted(self) -> bool:
        return self.options.cap("return-path") or self.options.cap("postcopy-ram")

    def _iterate(self) -> None:
        limiter = RateLimiter(int(self.options.param("max-bandwidth")))
        self.limiter = limiter
        passes = 0
        while True:
            self._check_cancel()
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
                with self._lock:
                    self.stats.dirty_sync(new, pending // self.page_size)
                if self.on_pass:
                    self.on_pass(passes)
                if pending <= threshold and self._switchover_allowed():
                    return
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
            if self.pool is not None:
                if not self._submit_multifd():
                    break
            else:
                batch = self.ram.next_batch()
                if batch is None:
                    break
                self._send(batch.buffers)
                with self._lock:
                    self.stats.add_normal(batch.normal, batch.normal * (8 + self.page_size))
                    self.stats.add_zero(batch.zero,
                                        batch.wire_bytes - batch.normal * (8 + self.page_size))
                    self.stats.set_remaining(self.ram.pending_pages())
                if limiter is not None:
                    limiter.account(batch.wire_bytes)
            if deadline is not None and time.monotonic() >= deadline:
                break
        self._end_ram_section()

    def _submit_multifd(self) -> bool:
        """Hand the next dirty pages to the workers; False when the round is done.

        With zero-page-detection=legacy the zero pages are found here and go
        on the main channel as ZERO records (what QEMU 7.2 always does);
        otherwise the workers find them (multifd) or nobody does (none).
        """
        item = self.ram.next_pages(BATCH_PAGES_MULTIFD)
        if item is None:
            return False
        index, idx = item
        if self.options.param("zero-page-detection") == "legacy":
            block = self.ram.bitmaps[index].block
            offsets = idx.astype(np.uint64) * np.uint64(self.page_size)
            zero = zero_page_mask_from_buffer(block.buf, offsets, self.page_size)
            if zero.any():
                records = [self.ram.encoder.zero_pages(block.idstr, offsets[zero])]
                self._send(records)
                with self._lock:
                    self.stats.add_zero(int(zero.sum()), sum(len(r) for r in records))
                idx = idx[~zero]
        if len(idx):
            self.pool.submit(index, idx.astype(np.uint64))
        self.pool.poll_acks()
        with self._lock:
            self.stats.set_remaining(self.ram.pending_pages())
        return True

    def _complete(self) -> None:
        """Switchover: everything left, then the devices (vCPUs are stopped)."""
        new = self.ram.sync()
        with self._lock:
            self.stats.dirty_sync(new, self.ram.pending_pages())
        self._send_section(enc.section_end(RAM_SECTION_ID), None, None)
        records, described = [], []
        for dev in self.machine.devices(self.vcpus):
            values = dev.save(self.guest_state)
            body = dev.vmsd.encode(values)
            records.append(enc.section_full(dev.section_id, dev.idstr, dev.instance_id,
                                            dev.vmsd.version_id, body))
            described.append((dev.idstr, dev.instance_id, dev.vmsd, values))
        records.append(enc.eof())
        records.append(enc.vmdescription(build_vmdesc(self.page_size, described)))
        self._send(records)
        self.stats.add_bytes(sum(len(r) for r in records))
        if self.pool is not None:
            self.pool.finish()      # BYE: every channel closed cleanly
        with self._lock:
            self.stats.set_remaining(0)

    # -- return path -------------------------------------------------------
    def _start_return_path(self) -> None:
        self._rp_thread = threading.Thread(target=self._rp_loop, name="return-path",
                                           daemon=True)
        self._rp_thread.start()

    def _rp_loop(self) -> None:
        decoder = rp.ReturnPathDecoder()
        buf = bytearray(4096)
        try:
            while not self._rp_shut.is_set():
                n = self.channel.recv_into(buf)
                if n == 0:
                    if not self._rp_shut.is_set() and self.state.status != S.COMPLETED:
                        raise RemoteProtocolError("destination closed the return path",
                                                  channel="return path")
                    return
                decoder.feed(bytes(buf[:n]))
                while True:
                    ev = decoder.next_event()
                    if ev is rp.NEED_DATA:
                        break
                    if isinstance(ev, rp.Pong):
                        self.pongs.append(ev.value)
                    elif isinstance(ev, rp.SwitchoverAck):
                        self._switchover_acked.set()
                    elif isinstance(ev, rp.Shut):
                        self._rp_status = ev.status
                        self._rp_shut.set()
                        return
                    else:
                        raise RemoteProtocolError(
                            f"unexpected return-path message {type(ev).__name__} in precopy",
                            channel="return path")
        except (EngineError, OSError) as exc:
            if not self._rp_shut.is_set():
                self._rp_error = exc if isinstance(exc, EngineError) else \
                    MigrationError(f"return path: {exc}")
                self._rp_shut.set()

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
            self._rp_thread.join(5)
