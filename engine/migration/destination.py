"""The incoming migration: QEMU's process_incoming_migration and loadvm.

:class:`DestinationMigration` reads one main channel with the sans-I/O
:class:`~engine.stream.decoder.StreamDecoder` and applies what it yields:
RAM pages into the guest's shared memory, device sections into the devices,
commands (return path, PING) answered on the same socket.  When the stream
ends with EOF it answers SHUT(0) on an open return path, optionally proves
what it received (digests and the `ab` check, before any vCPU runs), and
resumes the guest if the source's global state says it was running.

Block lists: given a guest, the announced RAM blocks must match it (name and
length, as QEMU checks); given only a guest factory, the guest is built from
the announced list.
"""
from __future__ import annotations

import socket
import threading
from typing import Callable

import numpy as np

from engine.errors import (BlockMismatchError, ChannelClosedError, ChannelError, EngineError,
                           MigrationError, RemoteProtocolError)
from engine.machine import GuestState, MachineProfile
from engine.migration import check_implemented
from engine.migration.verify import memory_digests
from engine.options import MigrationOptions
from engine.state import MigrationState, MigrationStatus as S
from engine.stats import MigrationInfo, StatsAccumulator
from engine.stream import events as ev
from engine.stream import returnpath as rp
from engine.stream.constants import TARGET_PAGE_SIZE
from engine.stream.decoder import StreamDecoder

#: how much one recv may bring in; large reads keep the per-call cost low
RECV_CHUNK = 4 << 20
#: after EOF the source sends its vmdesc at once; do not wait longer than this
VMDESC_WAIT_SECONDS = 2.0


def check_block_list(announced: ev.RamBlockList, blocks) -> None:
    """QEMU's ram_load_setup checks: every announced block exists, same length."""
    local = {b.idstr: b for b in blocks}
    for info in announced.blocks:
        block = local.get(info.idstr)
        if block is None:
            raise BlockMismatchError(
                f'Unknown ramblock "{info.idstr}", cannot accept migration '
                f"(this guest has: {', '.join(sorted(local)) or 'no blocks'})")
        if block.used_length != info.used_length:
            raise BlockMismatchError(
                f"Length mismatch: {info.idstr}: 0x{info.used_length:x} in the stream "
                f"!= 0x{block.used_length:x} here")


class DestinationMigration:
    """One incoming migration.  Create, then ``run(channel)`` once."""

    def __init__(self, machine: MachineProfile, options: MigrationOptions, *,
                 guest=None, guest_factory: Callable[[ev.RamBlockList], object] | None = None,
                 vcpus: int = 0, verify: bool = False, ab_check: bool = False,
                 on_status: Callable[[S, S], None] | None = None,
                 resume: bool = True):
        if guest is None and guest_factory is None:
            raise ValueError("need a guest or a guest factory")
        self.machine = machine
        self.options = options
        self.guest = guest
        self.guest_factory = guest_factory
        self.vcpus = vcpus
        self.verify = verify
        self.ab_check = ab_check
        self.resume = resume
        check_implemented(options)
        self.state = MigrationState("destination", on_change=on_status)
        self.state.transition(S.SETUP)
        self.guest_state = GuestState(guest)
        self.page_size = TARGET_PAGE_SIZE
        self.error: EngineError | None = None
        self.devices_loaded: dict[str, dict] = {}
        self.configuration: ev.Configuration | None = None
        self.vmdesc: dict | None = None
        self.digests: dict[str, str] | None = None
        self.ab_result = None
        self.pages = self.zero_pages = 0
        self._lock = threading.Lock()
        self._rp_open = False
        self._stats = None
        #: multifd: accepted channels by id, the worker pool, received bitmaps
        self.multifd = options.cap("multifd")
        self.multifd_channels: dict[int, object] = {}
        self.pool = None
        self._received_logs: list = []

    def prepare(self) -> None:
        """Start the multifd workers ahead of the migration (needs the guest)."""
        if not self.multifd or self.pool is not None or self.guest is None:
            return
        from engine.multifd.pool import RecvPool
        from engine.ram.dirty import DirtyLog
        for b in self.guest.blocks:
            self._received_logs.append(DirtyLog.create(b.npages))
        self.pool = RecvPool(int(self.options.param("multifd-channels")), self.guest.blocks,
                             self._received_logs,
                             codec=self.options.param("multifd-compression"),
                             page_size=self.page_size)

    def close(self) -> None:
        """Kill the multifd workers and free the received bitmaps (idempotent).

        :meth:`run` does this itself; a caller that called :meth:`prepare` and
        then never got to :meth:`run` (no connection, a bad channel, Ctrl-C)
        must call it.
        """
        self._release_multifd(failed=True)

    def _release_multifd(self, failed: bool) -> None:
        for ch in self.multifd_channels.values():
            ch.close()
        self.multifd_channels = {}
        if self.pool is not None:
            if failed:
                self.pool.kill()
            else:
                try:
                    self.pool.finish(timeout=10)
                except EngineError:
                    pass    # every page arrived at the last sync; a slow close is harmless
                self.pool.close()
        for log in self._received_logs:
            log.close()
            log.unlink()
        self._received_logs = []

    def info(self) -> MigrationInfo:
        with self._lock:
            if self._stats is None:
                return MigrationInfo(status=self.state.status.value,
                                     error_desc=str(self.error) if self.error else None)
            return self._stats.snapshot(self.state.status.value,
                                        error_desc=str(self.error) if self.error else None)

    # ------------------------------------------------------------------
    def run(self, channel, multifd_channels: dict | None = None) -> MigrationInfo:
        """Load from the main ``channel`` (and the accepted multifd channels)."""
        self.channel = channel
        self.multifd_channels = dict(multifd_channels or {})
        self.state.transition(S.ACTIVE)
        try:
            self._load()
            if self._rp_open:
                channel.sendall(rp.rp_shut(0))
            self._release_multifd(failed=False)
            self._finish()
            self.state.transition(S.COMPLETED)
        except BaseException as exc:
            self._release_multifd(failed=True)
            with self._lock:
                self.error = exc if isinstance(exc, EngineError) else \
                    MigrationError(f"{type(exc).__name__}: {exc}")
            if self._rp_open:
                try:
                    channel.sendall(rp.rp_shut(1))
                except Exception:
                    pass
            if self.state.status not in (S.FAILED, S.COMPLETED):
                self.state.transition(S.FAILED)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        return self.info()

    def _load(self) -> None:
        lookup = self.machine.lookup(self.vcpus)
        dec = StreamDecoder(lookup, page_size=self.page_size, channel="main")
        buf = bytearray(RECV_CHUNK)
        mv = memoryview(buf)
        seen_eof = False
        while True:
            if self.pool is not None and not seen_eof:
                # A multifd worker can fail while the main channel is quiet (its
                # pages are on the multifd channels): watch both.
                fd = self.channel.fileno()
                while not self.pool.wait_readable(fd, 0.1):
                    pass
            try:
                n = self.channel.recv_into(mv)
            except socket.timeout:
                if seen_eof:
                    return  # no vmdesc followed the EOF: fine, it is optional
                raise
            except ChannelError:
                if seen_eof:
                    return
                raise
            if n == 0:
                if seen_eof:
                    return
                dec.feed_eof()
            else:
                dec.feed(mv[:n])
            while True:
                event = dec.next_event()
                if event is ev.NEED_DATA:
                    break
                if isinstance(event, ev.Eof):
                    seen_eof = True
                    self.channel.settimeout(VMDESC_WAIT_SECONDS)
                elif isinstance(event, ev.VMDescription):
                    self.vmdesc = event.data
                    return
                else:
                    self._handle(event)
            if n == 0 and not seen_eof:
                raise ChannelClosedError(
                    f"{self.channel.name}: source closed the stream before its EOF section")

    def _handle(self, event) -> None:
        if isinstance(event, ev.RamPage):
            dst = self._bufs[event.block]
            dst[event.offset:event.offset + self.page_size] = event.data
            self.pages += 1
            self._received[event.block][event.offset // self.page_size] = True
        elif isinstance(event, ev.RamZero):
            self.zero_pages += 1
            page = event.offset // self.page_size
            received = self._received[event.block]
            # A page nobody wrote is already zero: leaving it alone means the
            # destination never faults in memory for a zero page.
            if received[page] or not self._fresh[event.block]:
                view = self._u64[event.block][page]
                if view.any():
                    view[:] = 0
            received[page] = True
        elif isinstance(event, (ev.RamEOS, ev.RamFlush)):
            # QEMU 7.2 syncs the multifd channels at every RAM section's EOS;
            # later QEMUs at MULTIFD_FLUSH.  Either way: wait for all, release.
            if self.pool is not None:
                self.pool.sync()
        elif isinstance(event, (ev.SectionStart, ev.SectionPart, ev.SectionEnd,
                                ev.SectionFooter, ev.FileHeader)):
            pass
        elif isinstance(event, ev.RamBlockList):
            self._setup_blocks(event)
        elif isinstance(event, ev.DeviceState):
            self._load_device(event)
        elif isinstance(event, ev.Configuration):
            self.configuration = event
            if event.machine != self.machine.type_name:
                raise RemoteProtocolError(
                    f"Machine type received is '{event.machine}' and local is "
                    f"'{self.machine.type_name}'", channel="main")
        elif isinstance(event, ev.OpenReturnPath):
            if not self.channel.bidirectional:
                raise RemoteProtocolError(
                    f"source asked for a return path but {self.channel.name} is one-way",
                    channel="main")
            self._rp_open = True
            if self.options.cap("switchover-ack"):
                # No device here needs to approve the switchover, so the ACK
                # goes at once, as QEMU's does in that case.
                self.channel.sendall(rp.rp_switchover_ack())
        elif isinstance(event, ev.Ping):
            if not self._rp_open:
                raise RemoteProtocolError("PING received without a return path", channel="main")
            self.channel.sendall(rp.rp_pong(event.value))
        elif isinstance(event, ev.SwitchoverStart):
            pass
        else:
            raise RemoteProtocolError(
                f"{type(event).__name__} is not supported by this destination", channel="main")

    def _setup_blocks(self, announced: ev.RamBlockList) -> None:
        if self.guest is None:
            self.guest = self.guest_factory(announced)
            self.guest_state.guest = self.guest
        check_block_list(announced, self.guest.blocks)
        total = sum(b.used_length for b in self.guest.blocks)
        with self._lock:
            self._stats = StatsAccumulator(total, self.page_size)
            self._stats.start()
        self._bufs = {b.idstr: b.buf for b in self.guest.blocks}
        self._u64 = {b.idstr: b.pages.view(np.uint64) for b in self.guest.blocks}
        if self.multifd:
            if len(self.multifd_channels) != int(self.options.param("multifd-channels")):
                raise MigrationError("multifd is on but the multifd channels were not accepted")
            self.prepare()
            for channel_id, ch in sorted(self.multifd_channels.items()):
                self.pool.attach(channel_id, ch.sock)
                # The worker has its own descriptor now.  Ours would keep the
                # connection open should the worker die, and the source would
                # write on into a socket nobody reads instead of failing.
                ch.close()
            # Shared with the workers, who receive pages too.
            self._received = {b.idstr: log.log for b, log in
                              zip(self.guest.blocks, self._received_logs)}
        else:
            self._received = {b.idstr: np.zeros(b.npages, dtype=bool)
                              for b in self.guest.blocks}
        self._fresh = {b.idstr: b.fresh for b in self.guest.blocks}

    def _load_device(self, event: ev.DeviceState) -> None:
        for dev in self.machine.devices(self.vcpus):
            if dev.idstr == event.idstr and dev.instance_id == event.instance_id:
                if dev.idstr in ("cpu", "counter") and self.guest is None:
                    raise RemoteProtocolError(f"device {dev.idstr} before RAM setup")
                dev.load(self.guest_state, event.values)
                key = dev.idstr if dev.instance_id == 0 and dev.idstr != "cpu" \
                    else f"{dev.idstr}/{dev.instance_id}"
                self.devices_loaded[key] = dict(event.values)
                return
        raise RemoteProtocolError(
            f"Unknown savevm section or instance '{event.idstr}' {event.instance_id}",
            channel="main")

    def _finish(self) -> None:
        with self._lock:
            if self._stats is not None:
                self._stats.set_remaining(0)
                self._stats.completed()
        if self.guest is None:
            raise RemoteProtocolError("stream ended without a RAM section", channel="main")
        if self.verify:
            self.digests = memory_digests(self.guest.blocks)
            if self.ab_check:
                self.ab_result = self.guest.check_ab(slices=max(1, self.vcpus))
        if self.resume and self.guest_state.runstate == "running" and self.vcpus:
            self.guest.start()
