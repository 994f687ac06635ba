"""The source's postcopy (QEMU's postcopy parts of migration.c and ram.c).

:class:`PostcopySource` is what the migration thread does once it switches
to postcopy, and what the return-path thread does for it meanwhile:

* :meth:`prepare` (guest running): the preempt channel, then the "postcopy
  prepare" PART section whose multifd sync puts every page multifd carried
  in place before the destination can run the guest;
* :meth:`switch` (guest stopped, in ``device``; QEMU's postcopy_start): the
  DISCARD ranges, then the PACKAGED blob (LISTEN, devices, PINGs, RUN);
* :meth:`run`: the rest of RAM in the background under
  ``max-postcopy-bandwidth``, requested pages first, until the destination's
  SHUT; a broken channel pauses (``postcopy-paused``) until a resume, and a
  recovery (the received bitmaps, POSTCOPY_RESUME) goes on where it left off;
* page-request service (return-path thread): :meth:`on_page_request` queues
  the pages for the migration thread or, with ``postcopy-preempt``, sends
  them at once on the preempt channel.

It is given what it works through, not the migration itself: the main
channel's :class:`~engine.migration.outbound.Outbound`, the RAM saver, the
state, the multifd side, and the migration thread's services as
:class:`PostcopyHooks` (the checkpoint and its waits, the device sections,
the sync count, the return path's reader).

Who writes what (the rest is the migration thread's alone):

* ``requests``: appended by the return-path thread, popped by the migration
  thread (a deque: both ends are atomic);
* ``preempt_channel``, ``_preempt_encoder``: set by the migration thread,
  used by the return-path thread, both under ``_preempt_lock``;
* ``_received``, ``devices_loaded``, ``_resume_acked``: written by the
  return-path thread, read by the migration thread after ``hooks.wake``;
* ``pause_requested``, ``_resume_uri``/``_abandoned`` (under ``_control_lock``),
  ``_resume_event``: set by control calls from any thread.
"""
from __future__ import annotations

import collections
import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from engine.errors import (ChannelBrokenError, ChannelError, EngineError, PostcopyError,
                           PostcopyPaused, RemoteProtocolError)
from engine.machine import RAM_SECTION_ID
from engine.migration.ramsave import BATCH_PAGES
from engine.migration.ratelimit import RateLimiter
from engine.state import MigrationStatus as S
from engine.stream import encoder as enc
from engine.stream import returnpath as rp
from engine.stream.constants import QEMU_VM_PING_PACKAGED_LOADED
from engine.stream.encoder import RamRecordEncoder
from engine.trace import trace
from engine.transport import connect
from engine.transport.seams import ByteChannel

if TYPE_CHECKING:
    from engine.migration.multifd_source import MultifdSource
    from engine.migration.outbound import Outbound
    from engine.migration.ramsave import RamSaver
    from engine.migration.returnpath import ReturnPathReader
    from engine.options import MigrationOptions
    from engine.state import MigrationState

__all__ = ["PostcopySource", "PostcopyHooks", "POSTCOPY_SWITCH_INTERVAL", "RESUME_ACK_VALUE",
           "PAGE_REQUEST_STATES"]

#: the interpreter's thread switch interval while postcopy runs, seconds.  The
#: return-path thread answers page requests (a destination vCPU waits on each);
#: with CPython's default 5 ms it can wait that long for the GIL each time the
#: migration thread holds it between two system calls.  The interval is
#: process-wide: set when the package goes out, restored when ``run`` returns.
POSTCOPY_SWITCH_INTERVAL = 1e-4
#: how often waits in postcopy look at the return path and control requests
POLL_SECONDS = 0.05
#: RESUME_ACK's only value (QEMU's MIGRATION_RESUME_ACK_VALUE)
RESUME_ACK_VALUE = 1
#: ram_save_iterate's time slice (the background's sections)
ITERATION_SECONDS = 0.05
#: where a page request is legal: once the package is on its way (the
#: destination may fault while it loads the devices) and in a recovery
#: (the destination asks again after POSTCOPY_RESUME, before our ACK wait ends)
PAGE_REQUEST_STATES = frozenset({S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER})


@dataclass(frozen=True)
class PostcopyHooks:
    """What the postcopy source asks of the migration thread."""
    #: raise what must end or pause the migration now (cancel, migrate-pause,
    #: the return path's error); postcopy-device -> postcopy-active on PONG 0x42
    checkpoint: Callable[[], None]
    #: block until the predicate holds, at a checkpoint every poll and wake
    wait_until: Callable[[Callable[[], bool]], None]
    #: news for the migration thread: set from the return-path thread
    wake: threading.Event
    #: the migration's options as of now (migrate-set-parameters replaces them)
    options: Callable[[], MigrationOptions]
    #: a dirty-bitmap sync: (new dirty pages, pages pending)
    count_sync: Callable[[int, int], None]
    #: every device's FULL section (vCPUs stopped)
    device_sections: Callable[[], list[bytes]]
    #: the RAM section's end (EOS and footer, with QEMU 7.2's multifd sync)
    end_ram_section: Callable[[], None]
    #: a return-path reader for the current main channel, its end, the current one
    start_return_path: Callable[[], None]
    stop_return_path: Callable[[], None]
    return_path: Callable[[], ReturnPathReader | None]


class PostcopySource:
    def __init__(self, out: Outbound, ram: RamSaver, state: MigrationState,
                 mfd: MultifdSource, hooks: PostcopyHooks, *, preempt: bool):
        self.out = out
        self.ram = ram
        self.state = state
        self.mfd = mfd
        self.hooks = hooks
        self.page_size = ram.page_size
        self.preempt = preempt
        #: (block index, first page, pages) asked for, served on the main channel
        self.requests: collections.deque[tuple[int, int, int]] = collections.deque()
        self.preempt_channel: ByteChannel | None = None
        self._preempt_lock = threading.Lock()
        self._preempt_encoder = RamRecordEncoder(self.page_size)
        #: PONG 0x42: the destination loaded the devices (postcopy-device ends)
        self.devices_loaded = threading.Event()
        self.pause_requested = threading.Event()
        self._resume_event = threading.Event()
        self._control_lock = threading.Lock()
        self._resume_uri: str | None = None
        self._abandoned: str | None = None
        self._received: dict[int, np.ndarray] = {}
        self._resume_acked = threading.Event()
        #: the reason of the latest pause, or of the latest failed recovery
        self.pause_error: EngineError | None = None
        self._saved_switch_interval: float | None = None

    # -- return-path handlers (the table's entries) -------------------------
    def handlers(self) -> dict:
        recover = frozenset({S.POSTCOPY_RECOVER})
        return {
            rp.ReqPages: (self.on_page_request, PAGE_REQUEST_STATES),
            rp.RecvBitmapMsg: (lambda ev: None, recover),    # its bitmap is the next event
            rp.ReceivedBitmap: (self.on_received_bitmap, recover),
            rp.ResumeAck: (self.on_resume_ack, recover),
        }

    # -- control from other threads ------------------------------------------
    def request_pause(self, channels) -> None:
        self.pause_requested.set()
        for ch in (*channels, self.preempt_channel):
            if ch is not None:
                with contextlib.suppress(Exception):
                    ch.shutdown()

    def request_resume(self, uri: str) -> None:
        with self._control_lock:
            self._resume_uri = uri
        self._resume_event.set()

    def abandon(self, reason: str) -> None:
        with self._control_lock:
            self._abandoned = reason
        self._resume_event.set()

    # -- the switch ------------------------------------------------------------
    def prepare(self, uri: str | None, answered: Callable[[], bool]) -> None:
        """Guest still running: the preempt channel to ``uri``, then the
        "postcopy prepare" PART section (multifd's last sync: multifd carries
        precopy pages only).  ``answered()`` says the destination took the
        main channel (a PONG came back)."""
        if self.preempt:
            # The preempt channel must reach the destination after the main
            # (and multifd) ones.
            assert uri is not None      # _setup refuses postcopy-preempt without one
            self.hooks.wait_until(answered)
            self._connect_preempt(uri)
        self.out.send_counted(enc.section_part(RAM_SECTION_ID))
        self.mfd.postcopy_prepare(self.hooks.end_ram_section)

    def switch(self) -> None:
        """Guest stopped, in ``device``: discards, then the package."""
        out, ram, hooks = self.out, self.ram, self.hooks
        hooks.count_sync(ram.sync(), ram.pending_pages())
        discards = ram.discard_commands()
        # QEMU forgets the last block after the discard, so the first
        # postcopy record names its block.
        ram.encoder.reset()
        ram.rewind()
        out.send_counted(discards + enc.ping(2))
        with_return_path = hooks.return_path() is not None
        package = [enc.postcopy_listen(), *hooks.device_sections(), enc.ping(3)]
        if with_return_path:
            package.append(enc.ping(QEMU_VM_PING_PACKAGED_LOADED))
        package.append(enc.postcopy_run())
        hooks.checkpoint()          # the last moment a cancel can win
        with out.lock:
            out.stats.postcopy_started()
        out.limiter = RateLimiter(int(hooks.options().param("max-postcopy-bandwidth")))
        self._saved_switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(POSTCOPY_SWITCH_INTERVAL)
        # As QEMU's postcopy_start, the status changes before the package goes
        # out: from here the destination may run the guest, and may fault
        # (page requests are legal) while it loads the devices.
        trace("postcopy_start", pending=ram.pending_pages())
        self.state.transition(S.POSTCOPY_DEVICE if with_return_path else S.POSTCOPY_ACTIVE)
        out.send_counted(enc.packaged(b"".join(package)) + enc.ping(4))
        trace("postcopy_start_set_run")

    def restore_switch_interval(self) -> None:
        if self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None

    # -- background, requests, pause and recovery -------------------------------
    def run(self) -> None:
        """Until the destination's SHUT(0); a broken channel in
        ``postcopy-active`` pauses, and the loop goes on after a recovery."""
        while True:
            try:
                self._send_all()
                return
            except (ChannelError, OSError, PostcopyPaused) as exc:
                if self.state.status is not S.POSTCOPY_ACTIVE:
                    raise           # postcopy-device: a precopy failure
                self._paused(exc)

    def _pending(self) -> int:
        ram = self.ram
        with ram.lock:
            return ram.pending_pages()

    def _send_all(self) -> None:
        """RAM PART sections until nothing is left, then END, EOF and SHUT."""
        out, ram, hooks = self.out, self.ram, self.hooks
        limiter = out.limiter
        assert limiter is not None      # switch() set postcopy's
        while True:
            hooks.checkpoint()
            if not self.requests and not self._pending():
                break
            out.send_counted(enc.section_part(RAM_SECTION_ID))
            deadline = time.monotonic() + ITERATION_SECONDS
            while True:
                # Cleared before looking: a request arriving from here on
                # sets it again and cuts the next sleep short.
                hooks.wake.clear()
                hooks.checkpoint()
                self._serve_requests()
                if limiter.exceeded():
                    limiter.wait_or(hooks.wake)
                    if time.monotonic() >= deadline:
                        break
                    continue
                batch = ram.next_batch(limiter.batch_pages(self.page_size + 8))
                if batch is None:
                    if not self._pending():
                        break
                    ram.rewind()       # pages skipped after a request
                    continue
                out.send_batch(batch)
                if time.monotonic() >= deadline:
                    break
            self.mfd.postcopy_sync()
            out.send_counted(enc.ram_eos() + enc.section_footer(RAM_SECTION_ID))
        # QEMU completes only after PONG 0x42 (postcopy-device -> active).
        hooks.wait_until(lambda: self.state.status is not S.POSTCOPY_DEVICE)
        self._end_preempt()
        out.send_counted(enc.section_end(RAM_SECTION_ID))
        self.mfd.postcopy_sync()
        out.send_counted(enc.ram_eos() + enc.section_footer(RAM_SECTION_ID) + enc.eof())
        with out.lock:
            out.stats.set_remaining(0)
        rpath = hooks.return_path()
        if rpath is not None:
            hooks.wait_until(rpath.shut.is_set)
            hooks.checkpoint()
        self.mfd.postcopy_finish()

    def _serve_requests(self) -> None:
        """Pages the destination asked for, ahead of the background scan
        (without postcopy-preempt: on the main channel, inside the section)."""
        ram = self.ram
        while self.requests:
            index, first, count = self.requests.popleft()
            idx = ram.take_range(index, first, count)
            for start in range(0, len(idx), BATCH_PAGES):
                self.out.send_batch(ram.encode(index, idx[start:start + BATCH_PAGES]))

    def on_page_request(self, ev: rp.ReqPages) -> None:
        """Return-path thread: one REQ_PAGES(_ID) message."""
        ram = self.ram
        block, start, length = ev.block, ev.start, ev.length
        with self.out.lock:
            self.out.stats.add_postcopy_requests(1)
        index = ram.block_index(block) if block is not None else None
        if index is None:
            raise RemoteProtocolError(f"page request for unknown RAM block {block!r}",
                                      channel="return path")
        used = ram.bitmaps[index].block.used_length
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
            self.requests.append((index, first, count))
            self.hooks.wake.set()

    def _send_urgent(self, index: int, first: int, count: int) -> None:
        """Return-path thread, postcopy-preempt: the pages at once, on the preempt
        channel, unless another sender took them first."""
        ram = self.ram
        with self._preempt_lock:
            channel = self.preempt_channel
            if channel is None:         # ended: nothing is left to send anyway
                return
            # Taken under the preempt lock: the EOS that ends the channel
            # cannot come between taking a page and sending it.
            if count == 1:
                self._send_urgent_page(channel, index, first)
                return
            idx = ram.take_range(index, first, count)
            if not len(idx):
                return
            for start in range(0, len(idx), BATCH_PAGES):
                batch = ram.encode(index, idx[start:start + BATCH_PAGES], self._preempt_encoder)
                channel.send_views(batch.buffers)
                self.out.account_batch(batch)

    def _send_urgent_page(self, channel: ByteChannel, index: int, page: int) -> None:
        """One requested page (the usual request): the fault's latency path.

        The source guest is stopped in postcopy, so the record can point
        straight into guest memory: no staging copy, no batch encoder.
        ``remaining`` is left to the migration thread (counting the bitmap
        here would cost more than sending the page).
        """
        ram, out = self.ram, self.out
        if not ram.take_page(index, page):
            return
        block = ram.bitmaps[index].block
        data = block.pages[page]
        offset = page * self.page_size
        if not ram.detect_zero or data.view(np.uint64).any():
            channel.sendmsg_all([self._preempt_encoder.page_header(block.idstr, offset), data])
            with out.lock:
                out.stats.add_normal(1, 8 + self.page_size)
        else:
            record = self._preempt_encoder.zero_page(block.idstr, offset)
            channel.sendmsg_all([record])
            with out.lock:
                out.stats.add_zero(1, len(record))

    # -- the preempt channel -----------------------------------------------------
    def _connect_preempt(self, uri: str) -> None:
        channel = connect(uri)
        trace("postcopy_preempt_new_channel", channel=channel.name)
        with self._preempt_lock:
            # A new channel: the destination knows no previous block on it.
            self._preempt_encoder = RamRecordEncoder(self.page_size)
            self.preempt_channel = channel

    def _end_preempt(self) -> None:
        """EOS on the preempt channel: no urgent page follows (everything was sent)."""
        with self._preempt_lock:
            channel, self.preempt_channel = self.preempt_channel, None
            if channel is not None:
                self.out.adopt(channel)
                channel.sendmsg_all([enc.ram_eos()])
                trace("postcopy_preempt_channel_end", channel=channel.name)

    def shutdown_preempt(self) -> None:
        """Abort the preempt channel (any thread): a blocked send fails."""
        channel = self.preempt_channel
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.shutdown()

    def close_preempt(self) -> None:
        with self._preempt_lock:
            channel, self.preempt_channel = self.preempt_channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.shutdown()
            channel.close()
            trace("postcopy_preempt_channel_close", channel=channel.name)

    # -- pause and recovery ---------------------------------------------------------
    def _teardown_channels(self) -> None:
        """Stop the return path and drop the broken channels (pause, failed recovery)."""
        self.hooks.stop_return_path()
        self.close_preempt()
        if self.out.channel is not None:
            self.out.release(self.out.channel)

    def _paused(self, cause: BaseException) -> None:
        """``postcopy-paused`` until a resume succeeds (spec 4.6)."""
        trace("postcopy_pause_return_path", error=cause)
        self._teardown_channels()
        self._enter_paused(cause)
        while True:
            while not self._resume_event.wait(POLL_SECONDS):
                pass
            self._resume_event.clear()
            with self._control_lock:
                uri, abandoned = self._resume_uri, self._abandoned
            if abandoned is not None:
                raise PostcopyError(f"postcopy abandoned while paused: {abandoned}")
            assert uri is not None      # request_resume() set it before the event
            self.state.transition(S.POSTCOPY_RECOVER_SETUP)
            try:
                channel = connect(uri)
            except (EngineError, OSError) as exc:
                self._enter_paused(exc)
                continue
            self.out.adopt(channel)
            self.out.channel = channel
            self.state.transition(S.POSTCOPY_RECOVER)
            try:
                self._resume_handshake(uri)
            except (EngineError, OSError) as exc:
                self._teardown_channels()
                self._enter_paused(exc)
                continue
            self.state.transition(S.POSTCOPY_ACTIVE)
            trace("postcopy_pause_continued")
            return

    def _enter_paused(self, cause: BaseException) -> None:
        self.pause_requested.clear()
        self.requests.clear()      # the destination asks again after the resume
        with self.out.lock:
            self.pause_error = cause if isinstance(cause, EngineError) else \
                ChannelBrokenError(f"{type(cause).__name__}: {cause}")
        self.state.transition(S.POSTCOPY_PAUSED)

    def _resume_handshake(self, uri: str) -> None:
        """``postcopy-recover``: the received bitmaps, then POSTCOPY_RESUME."""
        out, ram, hooks = self.out, self.ram, self.hooks
        self._received = {}
        self._resume_acked.clear()
        hooks.start_return_path()
        nblocks = len(ram.bitmaps)
        out.send_counted(b"".join(enc.recv_bitmap(bm.block.idstr) for bm in ram.bitmaps))
        hooks.wait_until(lambda: len(self._received) == nblocks)
        for index, received in self._received.items():
            ram.set_received(index, received)
        ram.encoder.reset()
        if self.preempt:
            self._connect_preempt(uri)
        out.send_counted(enc.postcopy_resume())
        hooks.wait_until(self._resume_acked.is_set)
        with out.lock:
            out.stats.set_remaining(self._pending())

    def on_received_bitmap(self, ev: rp.ReceivedBitmap) -> None:
        """Return-path thread: a block's received bitmap (recovery only)."""
        ram = self.ram
        index = ram.block_index(ev.block)
        if index is None:
            raise RemoteProtocolError(f"received bitmap of unknown RAM block {ev.block!r}",
                                      channel="return path")
        npages = len(ram.bitmaps[index].bits)
        if len(ev.bitmap) != rp.recv_bitmap_size(npages):
            raise RemoteProtocolError(
                f"received bitmap of {ev.block!r} has {len(ev.bitmap)} bytes, expected "
                f"{rp.recv_bitmap_size(npages)}", channel="return path")
        self._received[index] = rp.bitmap_bits(ev.bitmap, npages)
        self.hooks.wake.set()

    def on_resume_ack(self, ev: rp.ResumeAck) -> None:
        if ev.value != RESUME_ACK_VALUE:
            raise RemoteProtocolError(f"RESUME_ACK({ev.value}), expected {RESUME_ACK_VALUE}",
                                      channel="return path")
        self._resume_acked.set()
        self.hooks.wake.set()
