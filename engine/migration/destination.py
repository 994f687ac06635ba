"""The incoming migration: QEMU's process_incoming_migration and loadvm.

:class:`DestinationMigration` reads one main channel with the sans-I/O
:class:`~engine.stream.decoder.StreamDecoder` and applies what it yields:
RAM pages into the guest's shared memory, device sections into the devices,
commands (return path, PING) answered on the same socket.  When the stream
ends with EOF it answers SHUT(0) on an open return path, optionally proves
what it received (digests and the `ab` check, before any vCPU runs), and
resumes the guest if the source's global state says it was running.

Events are dispatched through one table (:meth:`DestinationMigration.
_event_table`): each event type has its handler and the migration statuses
in which it is legal; any other event, or one out of its statuses, is a
:class:`RemoteProtocolError` naming the event, the status, the channel and
the offset.  That is also the receive boundary: whatever a handler raises
about remote data leaves :meth:`DestinationMigration._load` as a
RemoteProtocolError with channel and offset.  Pages go to the
:class:`~engine.migration.ramload.RamLoader`, which places them atomically
once postcopy listens.

Block lists: given a guest, the announced RAM blocks must match it (name and
length, as QEMU checks); given only a guest factory, the guest is built from
the announced list.
"""
from __future__ import annotations

import socket
import struct
import select
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

from engine.errors import (ChannelClosedError, ChannelError, EngineError,
                           MigrationError, RemoteProtocolError)
from engine.machine import GuestState, MachineProfile
from engine.migration import check_implemented
from engine.migration.checks import check_uuid
from engine.migration.ramload import RamLoader, check_block_list, received_maps
from engine.migration.recovery import RecoveryWait
from engine.migration.verify import memory_digests
from engine.options import MigrationOptions
from engine.procs import CpuMeter, no_cycle_collection
from engine.ram import ABResult, DestinationGuest
from engine.state import MigrationState, MigrationStatus as S
from engine.stats import MigrationInfo, StatsAccumulator, postcopy_fields
from engine.stream import events as ev
from engine.stream import returnpath as rp
from engine.stream.constants import TARGET_PAGE_SIZE
from engine.stream.decoder import StreamDecoder
from engine.trace import trace
from engine.transport import ByteChannel, Listener, socket_of

if TYPE_CHECKING:
    from engine.multifd.pool import RecvPool
    from engine.postcopy.incoming import PostcopyIncoming

#: how much one recv may bring in; large reads keep the per-call cost low
RECV_CHUNK = 4 << 20
#: after EOF the source sends its vmdesc at once; do not wait longer than this
VMDESC_WAIT_SECONDS = 2.0
#: how long the multifd channels may take to end after the main stream did
CHANNELS_END_SECONDS = 60.0


#: what a PACKAGED blob may not hold (QEMU's package is devices and commands)
_NOT_IN_PACKAGE = (ev.RamPage, ev.RamZero, ev.RamPages, ev.RamZeros, ev.RamXbzrle,
                   ev.RamBlockList, ev.Packaged, ev.Eof, ev.VMDescription)


def _located(exc: EngineError, offset: int, channel: str = "main") -> EngineError:
    """``exc`` with the channel and offset where its remote data began, if
    it is a protocol error that does not say (the handlers raise without)."""
    if not isinstance(exc, RemoteProtocolError) or (
            exc.offset is not None and exc.channel is not None):
        return exc
    located = RemoteProtocolError(exc.message, exc.offset if exc.offset is not None else offset,
                                  exc.channel or channel)
    located.__traceback__ = exc.__traceback__
    return located


def _ignore(event) -> None:
    """Framing the decoder has checked already: nothing to do."""


class DestinationMigration:
    """One incoming migration.  Create, then ``run(channel)`` once."""

    def __init__(self, machine: MachineProfile, options: MigrationOptions, *,
                 guest: DestinationGuest | None = None,
                 guest_factory: Callable[[ev.RamBlockList], DestinationGuest] | None = None,
                 vcpus: int = 0, verify: bool = False, ab_check: bool = False,
                 on_status: Callable[[S, S], None] | None = None,
                 resume: bool = True, postcopy_faults: str = "auto",
                 uuid: bytes | None = None, pause_timeout: float | None = None):
        if guest is None and guest_factory is None:
            raise ValueError("need a guest or a guest factory")
        #: the VM's UUID (QEMU's -uuid), None when not set; the multifd
        #: channels' must equal it (zeros when not set), and a source with
        #: validate-uuid sends its own for comparison
        self.uuid = uuid
        #: what QEMU would warn_report (loading went on)
        self.warnings: list[str] = []
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
        self.ab_result: ABResult | None = None
        #: lands precopy pages, once the block list has come
        self.ram: RamLoader | None = None
        self._lock = threading.Lock()
        self._rp_open = False
        self._stats: StatsAccumulator | None = None
        #: multifd: accepted channels by id, the worker pool, received bitmaps
        self.multifd = options.cap("multifd")
        self.multifd_channels: dict[int, ByteChannel] = {}
        self.pool: RecvPool | None = None
        self._multifd_totals: tuple[int, int] = (0, 0)
        #: the source's multifd dialect: syncs at MULTIFD_FLUSH records (True,
        #: QEMU >= 8.1) or at every EOS (False, QEMU 7.2); None until the setup
        #: section has said (see _multifd_sync_point)
        self._flush_dialect: bool | None = None
        self._received_logs: list = []
        #: postcopy: the destination half (engine.postcopy.incoming), the
        #: listener kept for the preempt channel, the preempt channel itself
        self.postcopy_cap = options.cap("postcopy-ram")
        self.postcopy_faults = postcopy_faults
        self.postcopy: PostcopyIncoming | None = None
        self.listener: Listener | None = None
        self.preempt: ByteChannel | None = None
        #: postcopy-paused: the wait for migrate-recover and the new channel,
        #: bounded by ``pause_timeout`` seconds (None: until :meth:`close`, as
        #: QEMU; a destination nobody can send migrate-recover to gives up)
        self.recovery = RecoveryWait(pause_timeout)
        self._pending_advise: ev.PostcopyAdvise | None = None
        #: CPU of this process, its multifd workers and fault handler while loading
        self.cpu = CpuMeter(self._helper_pids)
        #: bytes received on the main channel (and on its recovery channels)
        self._main_bytes = 0
        self._events = self._event_table()

    def _helper_pids(self) -> list[int]:
        pids = [p.pid for p in self.pool.procs] if self.pool is not None else []
        proc = getattr(getattr(self.postcopy, "handler", None), "_proc", None)
        if proc is not None and proc.pid is not None:
            pids.append(proc.pid)
        return pids

    def prepare(self) -> None:
        """Start the multifd workers ahead of the migration (needs the guest)."""
        if self.guest is None:
            return
        if self.postcopy_cap and self.postcopy is None:
            from engine.postcopy.incoming import PostcopyIncoming
            self.postcopy = PostcopyIncoming(self.guest, self.postcopy_faults, self.page_size)
            self.postcopy.start_handler()
        if not self.multifd or self.pool is not None:
            return
        from engine.multifd.pool import RecvPool
        from engine.ram.dirty import DirtyLog
        if self.postcopy is not None:
            assert self.postcopy.handler is not None    # start_handler() made it
            logs = self.postcopy.handler.received_logs     # the handler owns them
        else:
            for b in self.guest.blocks:
                self._received_logs.append(DirtyLog.create(b.npages))
            logs = self._received_logs
        self.pool = RecvPool(int(self.options.param("multifd-channels")), self.guest.blocks,
                             logs,
                             codec=self.options.param("multifd-compression"),
                             page_size=self.page_size,
                             prealloc=bool(getattr(self.guest, "prealloc", False)))

    def close(self) -> None:
        """Kill the multifd workers and free the received bitmaps (idempotent).

        :meth:`run` does this itself; a caller that called :meth:`prepare` and
        then never got to :meth:`run` (no connection, a bad channel, Ctrl-C)
        must call it.
        """
        self.recovery.close()
        self._release_multifd(failed=True)
        self._release_postcopy()
        if self.preempt is not None:
            self.preempt.close()
        self.preempt = None

    def _release_postcopy(self, failed: bool = True) -> None:
        if self.postcopy is not None:
            with self._lock:
                self._postcopy_stats = self.postcopy.stats()
            self.postcopy.close(failed=failed)

    def _release_multifd(self, failed: bool) -> None:
        for ch in self.multifd_channels.values():
            ch.close()
        self.multifd_channels = {}
        if self.pool is not None:
            if failed:
                self.pool.kill()
            elif self._flush_dialect:
                # A source that flushes once per round sends the pages its final
                # scan found after the last flush with no sync behind them:
                # they are in place when every channel has ended, not before.
                try:
                    self.pool.finish(timeout=CHANNELS_END_SECONDS)
                finally:
                    self.pool.close()
            else:
                try:
                    self.pool.finish(timeout=10)
                except EngineError:
                    pass    # every page arrived at the last sync; a slow close is harmless
                self.pool.close()
            self._multifd_totals = (self.pool.normal, self.pool.zero)
            self.pool = None
        for log in self._received_logs:
            log.close()
            log.unlink()
        self._received_logs = []

    def info(self) -> MigrationInfo:
        """query-migrate on the destination; postcopy adds the fault figures
        (:func:`engine.stats.postcopy_fields`: QEMU's postcopy-blocktime & co.
        as QEMU shows them, our x-postcopy-latency-p50/-p99 and
        x-postcopy-faults always)."""
        pc = self._postcopy_figures()
        preempt_normal = pc.pop("preempt-pages", 0)     # ram figures, not members
        preempt_zero = pc.pop("preempt-zero-pages", 0)
        with self._lock:
            if self._stats is None:
                info = MigrationInfo(status=self.state.status.value,
                                     error_desc=str(self.error) if self.error else None)
            else:
                info = self._stats.snapshot(self.state.status.value,
                                            error_desc=str(self.error) if self.error else None)
        if info.ram is not None:
            # What arrived on every channel (QEMU's destination leaves these
            # at 0; a summary that says what it loaded is more use).
            mf_normal, mf_zero = self.multifd_pages
            normal = self.pages + preempt_normal + mf_normal
            info = replace(info, ram=replace(
                info.ram, normal=normal, duplicate=self.zero_pages + preempt_zero + mf_zero,
                normal_bytes=normal * self.page_size,
                transferred=max(info.ram.transferred,
                                self._main_bytes + (mf_normal + preempt_normal) * self.page_size)))
        if pc:
            requests = pc.pop("postcopy-requests", 0)
            extra = dict(info.extra or {})
            extra.update(pc)
            info = replace(info, extra=extra)
            if info.ram is not None:
                info = replace(info, ram=replace(info.ram, postcopy_requests=requests))
        return info

    def _postcopy_figures(self) -> dict:
        if self.postcopy is None or self.postcopy.state.value in ("none",):
            return {}
        stats = dict(getattr(self, "_postcopy_stats", None) or self.postcopy.stats())
        stats.pop("faults", None)
        out = postcopy_fields(
            stats, blocktime=self.options.cap("postcopy-blocktime"),
            started=self.postcopy.state.value in ("listening", "running", "end"),
            completed=self.state.status is S.COMPLETED)
        for key in ("postcopy-requests", "preempt-pages", "preempt-zero-pages"):
            out[key] = stats.get(key, 0)
        return out

    # ------------------------------------------------------------------
    def run(self, channel: ByteChannel, multifd_channels: dict | None = None, *,
            listener: Listener | None = None) -> MigrationInfo:
        """Load from the main ``channel`` (and the accepted multifd channels).

        ``listener`` (still listening) is where a postcopy-preempt source
        connects its preempt channel; without it that capability fails.
        """
        with no_cycle_collection():
            return self._run(channel, multifd_channels, listener)

    def _run(self, channel: ByteChannel, multifd_channels: dict | None, listener) -> MigrationInfo:
        self.channel = channel
        self.listener = listener
        self.multifd_channels = dict(multifd_channels or {})
        self.cpu.start()
        trace("loadvm_state_setup", channel=channel.name, multifd=len(self.multifd_channels))
        self.state.transition(S.ACTIVE)
        try:
            dec = StreamDecoder(self.machine.lookup(self.vcpus), page_size=self.page_size,
                                channel="main", page_runs=True)
            while True:
                try:
                    self._load(dec)
                    break
                except (ChannelError, RemoteProtocolError, OSError) as exc:
                    if not self._postcopy_running():
                        raise
                    # QEMU: a stream error while the guest already runs here
                    # pauses postcopy; both sides keep what they have.
                    self._pause_and_recover(dec, exc)
            if self._rp_open:
                self._rp_send(rp.rp_shut(0))
            self._release_multifd(failed=False)
            if self.postcopy is not None:
                self.postcopy.check()
                self._release_postcopy(failed=False)
            self._finish()
            trace("ram_load_complete", pages=self.pages, zero_pages=self.zero_pages)
            self.state.transition(S.COMPLETED)
        except BaseException as exc:
            trace("loadvm_error", state=self.state.status.value, error=type(exc).__name__,
                  reason=str(exc))
            self._release_multifd(failed=True)
            with self._lock:
                self.error = exc if isinstance(exc, EngineError) else \
                    MigrationError(f"{type(exc).__name__}: {exc}")
            if self._rp_open:
                try:
                    self._rp_send(rp.rp_shut(1))
                except Exception:
                    pass
            try:
                self._release_postcopy()
            except Exception:
                pass
            # A destination closed while postcopy is paused stays paused: only a
            # recovery leaves that state (the guest lives on neither side now).
            if self.state.status not in (S.FAILED, S.COMPLETED, S.POSTCOPY_PAUSED):
                self.state.transition(S.FAILED)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        return self.info()

    def _rp_send(self, data: bytes) -> None:
        """A return-path message; once postcopy listens, the fault handler
        writes requests on the same socket, so both take its lock."""
        lock = self.postcopy.rp_lock if self.postcopy and self._postcopy_listening() else None
        if lock is None:
            self.channel.sendall(data)
        else:
            with lock:
                self.channel.sendall(data)

    def _postcopy_listening(self) -> bool:
        return self.postcopy is not None and self.postcopy.state.value in (
            "listening", "running")

    def _postcopy_running(self) -> bool:
        return self.postcopy is not None and self.postcopy.state.value == "running"

    def _load(self, dec: StreamDecoder) -> None:
        seen_eof = False
        while True:
            if not seen_eof and (self.pool is not None or self._postcopy_listening()):
                # A multifd worker or the fault handler can fail while the
                # main channel is quiet: watch them too.
                fd = self.channel.fileno()
                while not self._wait_readable(fd, 0.1):
                    pass
            try:
                # Straight into the decoder's store: no copy of the stream.
                n = self.channel.recv_into(dec.get_buffer(RECV_CHUNK))
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
                dec.buffer_updated(n)
                self._main_bytes += n
            while True:
                at = dec.offset
                event = dec.next_event()
                if event is ev.NEED_DATA:
                    break
                if isinstance(event, ev.Eof):
                    seen_eof = True
                    trace("loadvm_state_eof", offset=at)
                    if self._postcopy_listening():
                        # QEMU's postcopy ends with EOF alone (no vmdesc).
                        assert self.postcopy is not None    # it is listening
                        self.postcopy.end()
                        return
                    self.channel.settimeout(VMDESC_WAIT_SECONDS)
                elif isinstance(event, ev.VMDescription):
                    self.vmdesc = event.data
                    return
                else:
                    try:
                        self._handle(event, at)
                    except EngineError as exc:
                        raise _located(exc, at) from exc.__cause__
                    except (ValueError, KeyError, IndexError, struct.error) as exc:
                        # Remote data a handler could not take (a device's
                        # values, a name): the peer's fault, said once, here.
                        raise RemoteProtocolError(
                            f"{type(event).__name__}: {type(exc).__name__}: {exc}",
                            at, "main") from exc
            if n == 0 and not seen_eof:
                raise ChannelClosedError(
                    f"{self.channel.name}: source closed the stream before its EOF section")

    def _wait_readable(self, fd: int, timeout: float) -> bool:
        if self.postcopy is not None and self._postcopy_listening():
            self.postcopy.check()
        if self.pool is not None:
            return self.pool.wait_readable(fd, timeout)
        r, _, _ = select.select([fd], [], [], timeout)
        return bool(r)

    def yank(self) -> None:
        """QEMU's yank of the migration: shut down (not close) the main channel
        (and the return path on it), the preempt channel and the multifd
        channels not yet handed to a worker, from any thread.

        Loading fails, or in postcopy pauses, on the errors that follow, as
        on a dead network.  The workers' channels are the caller's to reach.
        """
        channels = [getattr(self, "channel", None), self.preempt,
                    *list(self.multifd_channels.values())]
        for ch in channels:
            if ch is not None:
                try:
                    ch.shutdown()
                except Exception:   # noqa: BLE001 - closed meanwhile: nothing to yank
                    pass

    # -- postcopy recovery --------------------------------------------------------------
    def recover(self, uri: str) -> str:
        """QMP migrate-recover: listen on ``uri`` for the source's new channel.

        Only in postcopy-paused.  Returns the address actually listened on
        (a tcp port 0 resolved).
        """
        self.state.expect(S.POSTCOPY_PAUSED)
        return self.recovery.recover(uri)

    def _pause_and_recover(self, dec: StreamDecoder, exc: BaseException) -> None:
        """postcopy-paused until a recovery's new main channel arrives; ``dec``
        then reads on from it."""
        with self._lock:
            self.error = exc if isinstance(exc, EngineError) else MigrationError(str(exc))
        assert self.postcopy is not None    # only a running postcopy pauses
        self.postcopy.pause()
        try:
            self.channel.close()
        except Exception:
            pass
        if self.preempt is not None:
            self.preempt.close()
            self.preempt = None
        self.state.transition(S.POSTCOPY_PAUSED)
        trace("postcopy_pause_incoming", reason=str(exc))
        self.channel = self.recovery.accept(exc, self.postcopy.check)
        trace("postcopy_pause_incoming_continued")
        self.state.transition(S.POSTCOPY_RECOVER)
        with self._lock:
            self.error = None
        # The resumed source sends no header: the new channel goes on where
        # the old one broke, with QEMU's per-channel state reset.
        dec.restart_channel()
        self._rp_open = True

    # -- the stream's events: one handler each, legal in some states ---------------------
    def _event_table(self) -> dict:
        """{event type: (handler, statuses where it is legal)}, QEMU's
        qemu_loadvm_state_main and loadvm_process_command in one table.

        The statuses are the destination's MigrationStatus: precopy elements
        come while ``active``; the postcopy package's devices and the
        background pages in ``postcopy-device``/``-active``; RECV_BITMAP and
        POSTCOPY_RESUME only in ``postcopy-recover``.  EOF and VMDESCRIPTION
        end the loop itself (:meth:`_load`).
        """
        loading = frozenset({S.ACTIVE, S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE})
        precopy = frozenset({S.ACTIVE})
        postcopy = frozenset({S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE})
        recover = frozenset({S.POSTCOPY_RECOVER})
        ignore = _ignore
        return {
            ev.RamPages: (self._on_pages, loading),
            ev.RamZeros: (self._on_pages, loading),
            ev.RamXbzrle: (self._on_pages, precopy),
            ev.RamEOS: (self._multifd_sync_point, loading),
            ev.RamFlush: (self._multifd_sync_point, loading),
            ev.FileHeader: (ignore, precopy),
            ev.SectionStart: (self._on_section, precopy),
            ev.SectionPart: (ignore, loading),
            ev.SectionEnd: (ignore, loading),
            ev.SectionFooter: (ignore, loading),
            ev.RamBlockList: (self._setup_blocks, precopy),
            ev.DeviceState: (self._load_device, loading),
            ev.Configuration: (self._on_configuration, precopy),
            ev.OpenReturnPath: (self._on_open_return_path, precopy),
            ev.Ping: (self._on_ping, loading | recover),
            ev.SwitchoverStart: (ignore, precopy),
            ev.PostcopyAdvise: (self._on_advise, precopy),
            ev.PostcopyRamDiscard: (self._on_discard, precopy),
            ev.Packaged: (self._on_packaged, precopy),
            ev.PostcopyListen: (self._postcopy_listen, precopy),
            ev.PostcopyRun: (self._postcopy_run, postcopy),
            ev.RecvBitmap: (self._on_recv_bitmap, recover),
            ev.PostcopyResume: (self._postcopy_resume, recover),
        }

    def _handle(self, event, offset: int | None = None, channel: str = "main") -> None:
        """Apply one event of ``channel`` that started at byte ``offset``."""
        entry = self._events.get(type(event))
        if entry is None:
            raise RemoteProtocolError(f"{type(event).__name__} is not supported by this "
                                      "destination", offset, channel)
        handler, legal = entry
        if self.state.status_nowait not in legal:
            name = type(event).__name__
            trace("loadvm_event_refused", name=name, state=self.state.status.value,
                  channel=channel, offset=offset)
            raise RemoteProtocolError(
                f"{name} is not expected in migration state '{self.state.status.value}'",
                offset, channel)
        handler(event)

    def _on_pages(self, event) -> None:
        assert self.ram is not None     # the decoder knows no block before the block list
        self.ram.apply(event)

    def _on_section(self, event: ev.SectionStart) -> None:
        trace("qemu_loadvm_state_section_startfull", section_id=event.section_id,
              idstr=event.idstr, instance_id=event.instance_id, version_id=event.version_id)

    def _on_configuration(self, event: ev.Configuration) -> None:
        self.configuration = event
        if event.machine != self.machine.type_name:
            raise RemoteProtocolError(
                f"Machine type received is '{event.machine}' and local is "
                f"'{self.machine.type_name}'", channel="main")
        sent = event.subsections.get("configuration/uuid")
        if sent is not None:
            self._check_uuid(sent)

    def _on_open_return_path(self, event) -> None:
        trace("loadvm_process_command", cmd="OPEN_RETURN_PATH")
        if not self.channel.bidirectional:
            raise RemoteProtocolError(
                f"source asked for a return path but {self.channel.name} is one-way",
                channel="main")
        self._rp_open = True
        if self.options.cap("switchover-ack"):
            # No device here needs to approve the switchover, so the ACK
            # goes at once, as QEMU's does in that case.
            self._rp_send(rp.rp_switchover_ack())

    def _on_ping(self, event: ev.Ping) -> None:
        trace("loadvm_process_command_ping", val=event.value)
        if not self._rp_open:
            raise RemoteProtocolError("PING received without a return path", channel="main")
        self._rp_send(rp.rp_pong(event.value))

    def _on_advise(self, event: ev.PostcopyAdvise) -> None:
        trace("loadvm_postcopy_handle_advise", summary=event.page_size_summary)
        if not self.postcopy_cap:
            raise RemoteProtocolError(
                "RAM postcopy is disabled but have 16 byte advise" if
                event.page_size_summary is not None else
                "dirty-bitmaps postcopy is not supported", channel="main")
        if self.guest is None:
            # QEMU sends ADVISE before the RAM section that names the
            # blocks; a destination that builds its guest from that list
            # takes the advice once the guest exists.
            self._pending_advise = event
            return
        self.prepare()
        assert self.postcopy is not None    # postcopy_cap and a guest: prepare() made it
        self.postcopy.advise(event.page_size_summary, event.target_page_size)

    def _on_discard(self, event: ev.PostcopyRamDiscard) -> None:
        trace("loadvm_postcopy_ram_handle_discard", block=event.block,
              ranges=len(event.ranges))
        self._require_postcopy("POSTCOPY_RAM_DISCARD").discard(event.block, event.ranges)

    def _on_packaged(self, event: ev.Packaged) -> None:
        trace("loadvm_handle_cmd_packaged", length=len(event.data))
        self._require_postcopy("PACKAGED")
        self._load_package(event.data)

    def _on_recv_bitmap(self, event: ev.RecvBitmap) -> None:
        trace("loadvm_handle_recv_bitmap", block=event.block)
        bits = self._require_postcopy("RECV_BITMAP").received_bitmap(event.block)
        self._rp_send(rp.rp_recv_bitmap(event.block) + rp.encode_recv_bitmap(bits))

    def _multifd_sync_point(self, event) -> None:
        """A MULTIFD_FLUSH record or an EOS: sync the channels if the source's
        dialect makes it a sync point.

        The stream says which dialect it speaks: a source of QEMU 8.1 or later
        (``multifd-flush-after-each-section=off``, the engine's default)
        writes a MULTIFD_FLUSH in the setup section, before its EOS, and
        syncs only at flushes; QEMU 7.2 (or a later one with the property
        on) never writes one and syncs at every EOS.  So the setup section's
        EOS decides, and nobody has to be told.
        """
        if isinstance(event, ev.RamFlush):
            self._flush_dialect = True
        elif self._flush_dialect is None:
            self._flush_dialect = False
            if self.pool is not None:
                trace("multifd_recv_dialect", flush_each_section=True)
        elif self._flush_dialect:
            return      # an EOS is no sync point for a source that flushes
        if self.pool is None:
            return
        if self._postcopy_listening():
            # QEMU 7.2 still syncs the channels it kept open.
            self.pool.sync_open()
        else:
            self.pool.sync()

    def _check_uuid(self, sent: bytes) -> None:
        warning = check_uuid(sent, self.uuid)
        if warning:
            self.warnings.append(warning)

    @property
    def pages(self) -> int:
        """Pages received with their contents on the main channel (precopy and
        postcopy); :meth:`info` adds the fault handler's preempt channel's."""
        return self.ram.pages if self.ram is not None else 0

    @property
    def zero_pages(self) -> int:
        """Zero pages received on the main channel (as :attr:`pages`)."""
        return self.ram.zero_pages if self.ram is not None else 0

    @property
    def multifd_pages(self) -> tuple[int, int]:
        """(normal, zero) pages the multifd channels received: as of their last
        sync while the migration runs, all of them once it completed."""
        if self.pool is not None:
            return self.pool.normal, self.pool.zero
        return self._multifd_totals

    # -- postcopy -------------------------------------------------------------------
    def _require_postcopy(self, what: str) -> PostcopyIncoming:
        if self.postcopy is None or self.postcopy.state.value == "none":
            raise RemoteProtocolError(f"{what} without POSTCOPY_ADVISE", channel="main")
        return self.postcopy

    def _load_package(self, blob: bytes) -> None:
        """PACKAGED: LISTEN, the devices, PINGs and RUN, parsed from memory."""
        if self.options.cap("postcopy-preempt") and self.preempt is None:
            # QEMU waits for the preempt channel first: once LISTEN is
            # processed, a fault must be able to get its page there.
            if self.listener is None:
                raise MigrationError("postcopy-preempt needs the listener to accept "
                                     "the preempt channel")
            self.preempt = self.listener.accept(timeout=30)
        nested = StreamDecoder(self.machine.lookup(self.vcpus), page_size=self.page_size,
                               channel="main (package)", expect_header=False)
        nested.feed(blob)
        nested.feed_eof()
        while True:
            at = nested.offset
            event = nested.next_event()
            if event is ev.NEED_DATA:
                break
            if isinstance(event, _NOT_IN_PACKAGE):
                raise RemoteProtocolError(f"{type(event).__name__} inside a PACKAGED blob",
                                          at, "main (package)")
            self._handle(event, at, "main (package)")

    def _postcopy_listen(self, event=None) -> None:
        postcopy = self._require_postcopy("POSTCOPY_LISTEN")
        trace("loadvm_postcopy_handle_listen", ps=postcopy.state.value)
        # Every page multifd carried is in place (the last RAM EOS synced the
        # channels).  The workers stay: QEMU 7.2 keeps its channels open and
        # syncs them at every EOS in postcopy too, and closes them only after
        # SHUT; a source that closed them already has its DONEs queued.
        sock = socket_of(self.channel) if self._rp_open else None
        postcopy.listen(sock, socket_of(self.preempt) if self.preempt is not None else None)
        # the block list came before LISTEN, advise() made the placer
        assert self.ram is not None and postcopy.placer is not None
        self.ram.place_through(postcopy.placer, postcopy.requested, postcopy.placed)
        # QEMU 10.2: with a return path the destination stays in
        # postcopy-device while it loads the package's device state.
        self.state.transition(S.POSTCOPY_DEVICE if self._rp_open else S.POSTCOPY_ACTIVE)

    def _postcopy_run(self, event=None) -> None:
        self._require_postcopy("POSTCOPY_RUN")
        assert self.postcopy is not None and self.guest is not None     # checked; RAM set up
        trace("loadvm_postcopy_handle_run", ps=self.postcopy.state.value)
        self.postcopy.run()
        if self.state.status is S.POSTCOPY_DEVICE:
            self.state.transition(S.POSTCOPY_ACTIVE)
        with self._lock:
            if self._stats is not None:
                self._stats.postcopy_started()
        if self.resume and self.guest_state.runstate == "running" and self.vcpus:
            self.guest.start()

    def _postcopy_resume(self, event=None) -> None:
        trace("loadvm_postcopy_handle_resume")
        if self.options.cap("postcopy-preempt"):
            assert self.recovery.listener is not None   # it accepted this channel
            self.preempt = self.recovery.listener.accept(timeout=30)
        self.state.transition(S.POSTCOPY_ACTIVE)
        self._rp_send(rp.rp_resume_ack(1))
        assert self.postcopy is not None    # only a paused postcopy resumes
        self.postcopy.resumed(socket_of(self.channel),
                              socket_of(self.preempt) if self.preempt is not None else None)

    def _setup_blocks(self, announced: ev.RamBlockList) -> None:
        if self.guest is None:
            assert self.guest_factory is not None   # __init__ wants a guest or a factory
            self.guest = self.guest_factory(announced)
            self.guest_state.guest = self.guest
        check_block_list(announced, self.guest.blocks)
        total = sum(b.used_length for b in self.guest.blocks)
        with self._lock:
            self._stats = StatsAccumulator(total, self.page_size)
            self._stats.start()
        self.prepare()      # postcopy's fault handler (and multifd's workers) need the guest
        advise, self._pending_advise = self._pending_advise, None
        if advise is not None:
            assert self.postcopy is not None    # _on_advise checked postcopy_cap: prepare() made it
            self.postcopy.advise(advise.page_size_summary, advise.target_page_size)
        if self.multifd:
            if len(self.multifd_channels) != int(self.options.param("multifd-channels")):
                raise MigrationError("multifd is on but the multifd channels were not accepted")
            assert self.pool is not None    # multifd and a guest: prepare() made it
            for channel_id, ch in sorted(self.multifd_channels.items()):
                self.pool.attach(channel_id, socket_of(ch))   # check_multifd_transport
                # The worker has its own descriptor now.  Ours would keep the
                # connection open should the worker die, and the source would
                # write on into a socket nobody reads instead of failing.
                ch.close()
        self._received = received_maps(
            self.guest.blocks, self.postcopy.received if self.postcopy is not None
            else [log.log for log in self._received_logs] if self.multifd else None)
        self.ram = RamLoader(self.guest.blocks, self._received, self.page_size)

    def _load_device(self, event: ev.DeviceState) -> None:
        trace("qemu_loadvm_state_section_startfull", section_id=event.section_id,
              idstr=event.idstr, instance_id=event.instance_id, version_id=event.version_id)
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
                self._stats.set_cpu_seconds(self.cpu.stop() or 0.0)    # started in _run
        if self.guest is None:
            raise RemoteProtocolError("stream ended without a RAM section", channel="main")
        # In postcopy the guest has been running here since POSTCOPY_RUN;
        # checking its memory means pausing it for the check.
        running = bool(self.vcpus) and self.guest.running
        if self.verify:
            if running:
                self.guest.stop()
            self.digests = memory_digests(self.guest.blocks)
            if self.ab_check:
                self.ab_result = self.guest.check_ab(slices=max(1, self.vcpus))
            if running:
                self.guest.start()
        if (not running and self.resume and self.guest_state.runstate == "running"
                and self.vcpus):
            self.guest.start()
