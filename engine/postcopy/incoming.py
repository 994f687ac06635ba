"""The destination's half of postcopy (QEMU's loadvm_postcopy_handle_* and
the incoming side of postcopy-ram.c).

:class:`PostcopyIncoming` is what :class:`~engine.migration.destination.
DestinationMigration` delegates to once the stream says POSTCOPY_ADVISE.  It
owns the incoming postcopy sub-state (a table, like QEMU's
``PostcopyState``), the fault handler process, the vCPUs' registration and
the :class:`~engine.postcopy.placer.Placer` that puts arriving pages in place
atomically.

Fault mode: ``auto`` picks userfaultfd when :func:`~engine.uffd.
probe` says this host can use it, software faults otherwise;
``userfaultfd`` insists (an error where it is missing), ``software`` never
tries.
"""
from __future__ import annotations

import enum
import threading
from types import MappingProxyType
from typing import TYPE_CHECKING

from engine.errors import ConfigError, PostcopyError, RemoteProtocolError
from engine.trace import trace

if TYPE_CHECKING:
    from engine.postcopy.handler import FaultHandler
    from engine.postcopy.placer import Placer
    from engine.ram.seams import DestinationGuest

__all__ = ["PostcopyIncoming", "PostcopyState", "FAULT_MODES", "resolve_fault_mode"]

#: ``--postcopy-faults`` values
FAULT_MODES = ("auto", "userfaultfd", "software")

#: how long the vCPUs may take to register with the fault handler (seconds)
REGISTER_TIMEOUT = 30.0


class PostcopyState(enum.Enum):
    """QEMU's incoming PostcopyState."""
    NONE = "none"
    ADVISE = "advise"
    DISCARD = "discard"
    LISTENING = "listening"
    RUNNING = "running"
    END = "end"


_P = PostcopyState
TRANSITIONS = MappingProxyType({
    _P.NONE:      frozenset({_P.ADVISE}),
    _P.ADVISE:    frozenset({_P.DISCARD, _P.LISTENING}),
    _P.DISCARD:   frozenset({_P.DISCARD, _P.LISTENING}),
    _P.LISTENING: frozenset({_P.RUNNING}),
    _P.RUNNING:   frozenset({_P.END}),
    _P.END:       frozenset(),
})

#: the stream element that moves the sub-state to each value (for errors)
_COMMAND = {_P.ADVISE: "POSTCOPY_ADVISE", _P.DISCARD: "POSTCOPY_RAM_DISCARD",
            _P.LISTENING: "POSTCOPY_LISTEN", _P.RUNNING: "POSTCOPY_RUN", _P.END: "EOF"}


def resolve_fault_mode(requested: str) -> str:
    """``auto`` -> what this host supports; check an explicit choice."""
    from engine import uffd
    if requested not in FAULT_MODES:
        raise ConfigError(f"postcopy faults '{requested}': choose one of {', '.join(FAULT_MODES)}")
    if requested == "software":
        return "software"
    ok, reason = uffd.probe()
    if ok:
        return "userfaultfd"
    if requested == "userfaultfd":
        raise PostcopyError(f"userfaultfd is not available on this host: {reason}")
    return "software"


#: how long a failed postcopy waits for its vCPUs to drop their registration
#: once the handler is gone (they are stopped and discarded anyway)
FAILED_DETACH_SECONDS = 2.0

class PostcopyIncoming:
    """Postcopy on the destination for one guest.

    Lifecycle, driven by the stream: :meth:`advise` (checks; starts the fault
    handler), :meth:`discard` per POSTCOPY_RAM_DISCARD, :meth:`listen` (vCPUs
    register, pages from now on are placed atomically through :attr:`placer`
    by the destination's :class:`~engine.migration.ramload.RamLoader`),
    :meth:`run`, then :meth:`end`.
    :meth:`close` releases everything whatever happened.
    """

    def __init__(self, guest: DestinationGuest, fault_mode: str = "auto", page_size: int = 4096):
        self.guest = guest
        self.page_size = page_size
        self.requested_mode = fault_mode
        self.mode: str | None = None
        self.state = PostcopyState.NONE
        self.handler: FaultHandler | None = None
        self.placer: Placer | None = None
        self._index = {b.idstr: i for i, b in enumerate(guest.blocks)}
        self._requested: list | None = None
        self._attached = False
        self._final_stats: dict | None = None
        self._lock = threading.Lock()

    # -- sub-state ----------------------------------------------------------------
    def _move(self, new: PostcopyState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RemoteProtocolError(
                f"{_COMMAND[new]} in incoming postcopy state '{self.state.value}'",
                channel="main")
        trace("postcopy_state_set", old=self.state.value, new=new.value)
        self.state = new

    # -- the stream's commands ------------------------------------------------------
    def start_handler(self) -> None:
        """Start the fault handler process (idempotent); before ADVISE is fine.

        Its "received" bitmaps are the destination's for the whole
        migration: the multifd workers and the main channel mark them in
        precopy, so postcopy knows what already arrived.
        """
        if self.handler is not None:
            return
        from engine.postcopy.handler import FaultHandler
        self.mode = resolve_fault_mode(self.requested_mode)
        self.handler = FaultHandler(self.guest.blocks, self.mode, page_size=self.page_size,
                                    nvcpus=self.guest.nvcpus)
        self._requested = [log.log for log in self.handler.requested_logs]

    @property
    def received(self) -> list:
        """Per block, the shared received bitmap (one byte per page)."""
        assert self.handler is not None     # start_handler() came first
        return [log.log for log in self.handler.received_logs]

    def advise(self, page_size_summary: int | None, target_page_size: int | None) -> None:
        """POSTCOPY_ADVISE: the source's page sizes must be ours."""
        self._move(PostcopyState.ADVISE)
        if page_size_summary is None:
            raise RemoteProtocolError(
                "RAM postcopy is enabled but have 0 byte advise", channel="main")
        ours = 0
        for b in self.guest.blocks:
            ours |= b.page_size
        if page_size_summary != ours:
            raise RemoteProtocolError(
                f"Postcopy needs matching RAM page sizes (s={page_size_summary:#x} "
                f"d={ours:#x})", channel="main")
        if target_page_size != self.page_size:
            raise RemoteProtocolError(
                f"Postcopy needs matching target page sizes (s={target_page_size} "
                f"d={self.page_size})", channel="main")
        self.start_handler()
        from engine.postcopy.placer import Placer
        # Until LISTEN nobody runs: discards need no lock and no userfaultfd.
        self.placer = Placer(self.guest.blocks, self.received)

    def discard(self, block: str, ranges) -> None:
        """POSTCOPY_RAM_DISCARD: these pages changed on the source since sent."""
        self._move(PostcopyState.DISCARD)
        index = self._block_index(block)
        used = self.guest.blocks[index].used_length
        for start, length in ranges:
            if start % self.page_size or length % self.page_size or start + length > used:
                raise RemoteProtocolError(
                    f"discard range {start:#x}+{length:#x} of '{block}' is not page "
                    f"aligned or outside the block ({used:#x})", channel="main")
            assert self.placer is not None  # advise() made it (DISCARD follows ADVISE)
            self.placer.discard(index, start, length)

    def listen(self, return_path_sock, preempt_sock=None) -> None:
        """POSTCOPY_LISTEN: the vCPUs register their faults; placement turns atomic."""
        self._move(PostcopyState.LISTENING)
        from engine.postcopy.placer import Placer
        handler = self.handler
        assert handler is not None and self.mode is not None    # advise() started it
        if self.mode == "userfaultfd":
            self._punch_missing()
        if self.guest.nvcpus:
            self.guest.attach_faults(handler.socket_path, self.mode, timeout=REGISTER_TIMEOUT)
            self._attached = True
        uffd, bases = handler.wait_registered(REGISTER_TIMEOUT)
        if uffd is not None:
            self.placer = Placer(self.guest.blocks, self.received, uffd=uffd, bases=bases)
        elif self.guest.nvcpus:
            self.placer = Placer(self.guest.blocks, self.received, lock=handler.lock)
        if return_path_sock is not None:
            handler.set_return_path(return_path_sock)
        if preempt_sock is not None:
            handler.set_preempt(preempt_sock)

    def _punch_missing(self) -> None:
        """Make every page not received a hole, so that touching it faults.

        Our blocks are preallocated (posix_fallocate), and tmpfs counts a
        preallocated page as present: userfaultfd's MISSING mode would never
        fire for it and the vCPU would read zeros.  The source's discards
        cover what it still has to send, but this does not rely on them.
        """
        import numpy as np
        from engine.uffd import punch_hole
        for block, received in zip(self.guest.blocks, self.received):
            missing = np.concatenate(([0], (received == 0).view(np.int8), [0]))
            edges = np.flatnonzero(np.diff(missing))
            ps = block.page_size
            for start, end in zip(edges[0::2], edges[1::2]):
                punch_hole(block.fd, int(start) * ps, int(end - start) * ps)

    def run(self) -> None:
        """POSTCOPY_RUN."""
        self._move(PostcopyState.RUNNING)

    def end(self) -> None:
        """The main channel's EOF: every page has been sent."""
        self._move(PostcopyState.END)

    # -- pages ------------------------------------------------------------------------
    def _block_index(self, block: str) -> int:
        try:
            return self._index[block]
        except KeyError:
            raise RemoteProtocolError(f"unknown RAM block '{block}'", channel="main") from None

    @property
    def requested(self) -> list | None:
        """Per block, the bitmap of pages some vCPU asked for (shared with the
        handler): a page placed there must be reported with :meth:`placed`."""
        return self._requested

    def placed(self, block: int, page: int) -> None:
        """A requested page is in place: the handler wakes its waiters."""
        assert self.handler is not None     # placing started at LISTEN
        self.handler.placed(block, page)

    # -- return path, pause, recovery ------------------------------------------------
    @property
    def rp_lock(self):
        """Held for every return-path write while the handler may write too."""
        return self.handler.lock if self.handler is not None else None

    def pause(self) -> None:
        if self.handler is not None:
            self.handler.pause()

    def resumed(self, return_path_sock, preempt_sock=None) -> None:
        """POSTCOPY_RESUME on a new channel: pending requests go out again."""
        assert self.handler is not None     # a paused postcopy has its handler
        self.handler.set_return_path(return_path_sock)
        if preempt_sock is not None:
            self.handler.set_preempt(preempt_sock)
        self.handler.resend_requests()

    def received_bitmap(self, block: str):
        """The received bits of ``block`` for RECV_BITMAP (bool ndarray)."""
        return self.received[self._block_index(block)] != 0

    def check(self) -> None:
        if self.handler is not None:
            self.handler.check()

    def stats(self) -> dict:
        """The handler's figures (kept after :meth:`close`)."""
        if self._final_stats is not None:
            return self._final_stats
        if self.handler is None:
            return {}
        try:
            return self.handler.stats()
        except Exception:
            return {}

    def close(self, failed: bool = False) -> None:
        """Detach the vCPUs' faults and stop the handler (idempotent).

        After a failure (*failed*) some vCPUs may be blocked on pages that
        will never come, and a blocked vCPU cannot answer a detach: the
        handler goes first then (closing its userfaultfd and sockets lets
        every waiting vCPU go on), and the detach gets a short grace.
        """
        with self._lock:
            if self.handler is None:
                return
            if self._final_stats is None:
                self._final_stats = self.stats()
            handler, self.handler = self.handler, None
            self.placer = None
            errors = []
            if failed:
                handler.close()
            if self._attached:
                self._attached = False
                try:
                    if failed:
                        self.guest.detach_faults(timeout=FAILED_DETACH_SECONDS)
                    else:
                        self.guest.detach_faults()
                except Exception as exc:
                    if not failed:
                        errors.append(exc)
            if not failed:
                handler.close()
            if errors:
                raise errors[0]
