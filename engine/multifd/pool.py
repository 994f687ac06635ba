"""The coordinator's side of multifd: starting workers, handing out work, syncing.

:class:`SendPool` (source) and :class:`RecvPool` (destination) each own N
worker processes, a zmq ROUTER on an ipc endpoint in a private directory,
and the bookkeeping QEMU keeps in ``multifd_send_state`` /
``multifd_recv_state``.  They are created (and their workers started) before
a migration begins; :meth:`SendPool.connect` opens the channels when it does.

A worker that dies, reports an error or stops answering turns into a
:class:`~engine.errors.MigrationError` naming its channel; :meth:`close`
always stops and reaps every worker and removes the endpoint directory.
While a pool waits for its workers it calls the ``check_abort`` it was given
every poll interval, so a cancel (or a failure the coordinator learns of some
other way) is not held up by workers stuck on a peer that stopped reading.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import weakref
from collections import deque
from typing import Callable, Sequence

import numpy as np
import zmq

from engine.errors import MigrationError
from engine.multifd import control as ctl
from engine.multifd.receiver import RecvWorkerConfig, recv_worker_main
from engine.multifd.sender import SendWorkerConfig, packets_needed, send_worker_main
from engine.procs import spawn
from engine.ram.seams import MappedBlock
from engine.trace import trace

#: pages per BATCH message: 8 packets, so the coordinator's cost per page is tiny
BATCH_PAGES = 1024
#: batches a worker may have in flight; two keep its socket busy while the
#: coordinator prepares the next
MAX_OUTSTANDING = 2
#: how long a worker may take to start, connect or answer a sync
STARTUP_SECONDS = 60
REPLY_SECONDS = 120


class _Pool:
    role = ""

    def __init__(self, n: int, check_abort: Callable[[], None] | None = None):
        self.n = n
        self.procs: list = []
        self._dir = tempfile.mkdtemp(prefix="engine-multifd-")
        self.endpoint = f"ipc://{os.path.join(self._dir, 'control')}"
        self._zctx = zmq.Context()
        self._router = self._zctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(self.endpoint)
        # A pool dropped without close() (a failure half-way through its
        # user) must neither hang nor leak.  In a garbage cycle the context may
        # be finalized before its socket, and its term() then waits for that
        # socket forever; the finalizer holds both and releases them in order.
        self._finalizer = weakref.finalize(self, _release, self.procs, self._router,
                                           self._zctx, self._dir)
        #: no more waiting on the workers (set first thing by close)
        self._closed = False
        self._backlog: deque = deque()
        #: workers that said DONE: their exit is expected
        self._ended: set[int] = set()
        self.wire_bytes = 0
        #: called while waiting for workers; raises to give up (a cancel)
        self._check_abort = check_abort

    # -- messaging ---------------------------------------------------------
    def _send(self, index: int, message) -> None:
        trace("multifd_ctl_send", role=self.role, channel=index, msg=type(message).__name__)
        try:
            self._router.send_multipart([ctl.worker_identity(index), *message.frames()])
        except zmq.ZMQError as exc:
            self._check_alive()
            raise MigrationError(f"multifd channel {index}: worker unreachable ({exc})") from exc

    def _read(self):
        """One waiting message as (worker index, message); a worker's ERROR raises."""
        frames = self._router.recv_multipart(copy=False)
        index = ctl.worker_index(frames[0].bytes)
        msg = ctl.decode(frames[1:])
        trace("multifd_ctl_recv", role=self.role, channel=index, msg=type(msg).__name__)
        if isinstance(msg, ctl.Error):
            # A worker killed outside our control is the cause; the other
            # channels' errors (the peer gave up on them) are its consequence.
            self._check_killed()
            raise msg.exception(f"multifd channel {index}")
        if isinstance(msg, ctl.Done):
            self._ended.add(index)
        return index, msg

    def _recv(self, timeout: float, what: str):
        """Next (worker index, message); fails on worker death, error or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self._router.poll(100):
                return self._read()
            self._check_alive()
            if self._check_abort is not None:
                self._check_abort()
            if time.monotonic() > deadline:
                raise MigrationError(f"multifd: timed out waiting for {what}")

    def _check_killed(self) -> None:
        for i, p in enumerate(self.procs):
            if p.exitcode is not None and p.exitcode < 0 and not self._closed:
                raise MigrationError(f"multifd channel {i}: {self.role} worker process "
                                     f"killed by signal {-p.exitcode}")

    def _check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if p.exitcode is None or self._closed or i in self._ended:
                continue
            # Its last words (ERROR, or DONE before a clean exit) may still be
            # in flight: they say more than an exit code.
            while self._router.poll(200):
                self._backlog.append(self._read())
            self._check_killed()
            if i not in self._ended:
                raise MigrationError(
                    f"multifd channel {i}: {self.role} worker process died "
                    f"(exit code {p.exitcode})")

    def check(self) -> None:
        """Raise the failure of any worker that reported an error or died (never blocks
        for long).  Messages already waiting are kept for whoever awaits them."""
        if self._closed:
            return
        while self._router.poll(0):
            self._backlog.append(self._read())
        self._check_alive()

    def wait_readable(self, fd: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``fd`` to become readable, watching the
        workers meanwhile (:meth:`check`); whether ``fd`` is readable."""
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(fd, zmq.POLLIN)
        ready = dict(poller.poll(int(timeout * 1000)))
        self.check()
        return fd in ready

    def _take(self, kind, what: str, timeout: float, index: int | None = None,
              pending=None):
        """The next message of ``kind`` (from ``index``); others wait their turn.

        Workers run ahead of the coordinator (a receive worker may reach a
        SYNC while another channel is still being attached), so a message
        that is not the awaited one is kept for later, not treated as an error.
        A worker that said DONE sends nothing more, so waiting on it for
        anything else fails at once; ``pending`` names the workers still
        awaited (default: ``index``, or every worker).
        """
        if pending is None:
            pending = range(self.n) if index is None else (index,)
        pending = set(pending)
        while True:
            # The backlog is looked at on every turn: waiting itself may move
            # messages there (a dying worker's last words are collected first).
            for item in self._backlog:
                i, msg = item
                if isinstance(msg, kind) and i in pending:
                    self._backlog.remove(item)
                    return item
            ended = sorted(self._ended.intersection(pending))
            if ended and kind is not ctl.Done:
                raise MigrationError(f"multifd channel {ended[0]}: the channel ended "
                                     f"while waiting for {what}")
            self._backlog.append(self._recv(timeout, what))

    def _wait_all(self, kind, what: str, timeout: float = REPLY_SECONDS) -> list:
        got: dict[int, object] = {}
        while len(got) < self.n:
            index, msg = self._take(kind, what, timeout,
                                    pending=set(range(self.n)).difference(got))
            got[index] = msg
        return [got[i] for i in range(self.n)]

    # -- lifetime ----------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Stop and reap every worker; idempotent, and a close cut short (a
        second Ctrl-C) is finished by the next call instead of being skipped."""
        if not self._finalizer.alive:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                p.terminate()
                p.join(2)
            if p.exitcode is None:
                p.kill()
                p.join()
        self._finalizer()
        trace("multifd_pool_closed", role=self.role)

    def kill(self) -> None:
        """Abort: workers are killed at once (migration failed or cancelled)."""
        if self._finalizer.alive:
            trace("multifd_terminate_threads", role=self.role, channels=self.n)
        for p in self.procs:
            if p.exitcode is None:
                p.kill()
        self.close(timeout=2.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.kill()


def _release(procs: list, router: zmq.Socket, zctx: zmq.Context, directory: str) -> None:
    """Everything a pool holds: workers killed if still alive (close() reaps
    them first), the socket closed before its context ends, the directory gone."""
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join(2)
    router.close(linger=0)
    zctx.term()
    shutil.rmtree(directory, ignore_errors=True)


class SendPool(_Pool):
    """Source side: N send workers, each owning one channel once connected."""
    role = "send"

    def __init__(self, n: int, blocks: Sequence[MappedBlock], *, codec: str = "none",
                 level: int | None = None,
                 zero_detect: bool = True, page_size: int = 4096, page_count: int = 128,
                 on_ack: Callable[[ctl.Ack], None] | None = None,
                 check_abort: Callable[[], None] | None = None):
        super().__init__(n, check_abort)
        #: told of every batch acknowledgement (the migration's statistics)
        self._on_ack = on_ack
        self.page_count = page_count
        self.normal = self.zero = 0
        self._seq = 0
        self.packet_num = 0
        self._outstanding = [0] * n
        #: the worker given the latest batch (round-robin starts after it)
        self._last = n - 1
        self._round = 0
        try:
            for i in range(n):
                cfg = SendWorkerConfig(i, self.endpoint, tuple(b.handle for b in blocks),
                                       codec, level, zero_detect, page_size, page_count,
                                       os.getpid())
                self.procs.append(spawn(send_worker_main, (cfg,), f"engine-multifd-send-{i}"))
            self._wait_all(ctl.Hello, "multifd send workers to start", STARTUP_SECONDS)
        except BaseException:
            self.kill()
            raise

    def connect(self, uri: str, uuid: bytes = bytes(16)) -> None:
        """Open every channel (QEMU does this before the main stream's header)."""
        for i in range(self.n):
            self._send(i, ctl.Connect(uuid, i, uri))
        self._wait_all(ctl.Ready, "multifd channels to connect", STARTUP_SECONDS)

    @property
    def next_seq(self) -> int:
        """The seq the next BATCH (and its ACK) will carry."""
        return self._seq

    def submit(self, block_index: int, pages: np.ndarray) -> None:
        """Queue pages of a block; blocks while every worker is busy."""
        # A batch routed to a dead worker vanishes without an error (a ROUTER
        # drops it); without this, a slow (rate-limited) migration found out
        # only once every live worker had a full queue, seconds later.
        self._check_alive()
        for start in range(0, len(pages), BATCH_PAGES):
            chunk = pages[start:start + BATCH_PAGES]
            while min(self._outstanding) >= MAX_OUTSTANDING:
                self._collect_one()
            worker = self._next_worker()
            batch = ctl.Batch(self._seq, self.packet_num, block_index, chunk)
            self._send(worker, batch)
            self._seq += 1
            self.packet_num += packets_needed(len(chunk), self.page_count)
            self._outstanding[worker] += 1

    def _next_worker(self) -> int:
        """The least busy worker, taking turns among equals after the last one
        used, as QEMU's multifd_send_pages walks its channels.  Always the
        lowest index would leave the other channels idle whenever batches are
        small and acknowledged quickly (a low max-bandwidth)."""
        least = min(self._outstanding)
        for step in range(1, self.n + 1):
            i = (self._last + step) % self.n
            if self._outstanding[i] == least:
                self._last = i
                return i
        raise AssertionError("unreachable: some worker has the least outstanding")

    def poll_acks(self) -> None:
        """Account for acknowledgements already waiting (never blocks)."""
        while any(self._outstanding) and self._router.poll(0):
            self._collect_one()

    def _collect_one(self) -> None:
        index, msg = self._take(ctl.Ack, "a batch acknowledgement", REPLY_SECONDS)
        self._outstanding[index] -= 1
        self.normal += msg.normal
        self.zero += msg.zero
        self.wire_bytes += msg.wire_bytes
        if self._on_ack is not None:
            self._on_ack(msg)

    def sync(self) -> None:
        """QEMU's multifd_send_sync_main: drain, then a SYNC packet on every channel."""
        while any(self._outstanding):
            self._collect_one()
        self._round += 1
        trace("multifd_send_sync_main", round=self._round, packet_num=self.packet_num)
        for i in range(self.n):
            self._send(i, ctl.Sync(self._round, self.packet_num))
            self.packet_num += 1
        self._wait_all(ctl.Synced, "multifd channels to sync")

    def finish(self) -> int:
        """BYE: close every channel cleanly; returns multifd bytes written."""
        while any(self._outstanding):
            self._collect_one()
        for i in range(self.n):
            self._send(i, ctl.Bye())
        done = self._wait_all(ctl.Done, "multifd channels to close")
        self.wire_bytes = sum(d.wire_bytes for d in done)
        return self.wire_bytes


class RecvPool(_Pool):
    """Destination side: N receive workers; channels are handed over as they arrive."""
    role = "receive"

    def __init__(self, n: int, blocks: Sequence[MappedBlock], received_logs, *,
                 codec: str = "none",
                 page_size: int = 4096, page_count: int = 128, prealloc: bool = False):
        super().__init__(n)
        self._fd_socks: list[socket.socket] = []
        self.attached: set[int] = set()
        self.normal = self.zero = 0
        self._round = 0
        self._done: dict[int, int] = {}
        try:
            fresh = tuple(bool(getattr(b, "fresh", False)) for b in blocks)
            for i in range(n):
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                self._fd_socks.append(ours)
                cfg = RecvWorkerConfig(i, self.endpoint, tuple(b.handle for b in blocks),
                                       tuple(r.handle for r in received_logs), fresh,
                                       codec, prealloc, page_size, page_count, os.getpid())
                try:
                    self.procs.append(spawn(recv_worker_main, (cfg, theirs),
                                            f"engine-multifd-recv-{i}"))
                finally:
                    theirs.close()
            self._wait_all(ctl.Hello, "multifd receive workers to start", STARTUP_SECONDS)
        except BaseException:
            self.kill()
            raise

    def attach(self, channel_id: int, sock: socket.socket) -> None:
        """Hand an accepted channel (MultiFDInit already read) to its worker."""
        if not 0 <= channel_id < self.n:
            raise MigrationError(f"multifd: channel id {channel_id} out of range "
                                 f"(multifd-channels is {self.n})")
        if channel_id in self.attached:
            raise MigrationError(f"multifd: channel {channel_id} connected twice")
        socket.send_fds(self._fd_socks[channel_id], [str(channel_id).encode()],
                        [sock.fileno()])
        self.attached.add(channel_id)
        self._take(ctl.Ready, f"multifd channel {channel_id} to start", STARTUP_SECONDS,
                   index=channel_id)

    def sync(self) -> None:
        """QEMU's multifd_recv_sync_main: every channel reached its SYNC; release all."""
        synced = self._wait_all(ctl.Synced, "multifd channels to sync")
        self._round += 1
        trace("multifd_recv_sync_main", round=self._round)
        for i, s in enumerate(synced):
            if s.round != self._round:
                # A channel past the barrier (or behind it) would break the
                # ordering guarantee: refuse rather than apply out of order.
                raise MigrationError(f"multifd channel {i}: reached SYNC {s.round} "
                                     f"while the migration is at SYNC {self._round}")
        self.normal = sum(s.normal for s in synced)
        self.zero = sum(s.zero for s in synced)
        self.wire_bytes = sum(s.wire_bytes for s in synced)
        for i in range(self.n):
            self._send(i, ctl.Release(self._round))

    def sync_open(self, timeout: float = REPLY_SECONDS) -> None:
        """:meth:`sync` for postcopy: only the channels the source kept open.

        QEMU 7.2 keeps its multifd channels through postcopy (they carry no
        pages any more) and still puts a SYNC on each before every RAM EOS;
        its destination syncs at each EOS in ram_load_postcopy.  A source
        that closed its channels when postcopy started (the engine's, QEMU
        10.1 and later) sends none.  So each channel's next word is either
        its SYNC or its end; the ended ones are left out (their DONE stays
        queued for :meth:`finish`).
        """
        deadline = time.monotonic() + timeout
        synced: dict[int, ctl.Synced] = {}
        while True:
            for item in list(self._backlog):
                i, msg = item
                if isinstance(msg, ctl.Synced) and i not in synced:
                    self._backlog.remove(item)
                    synced[i] = msg
            if not set(range(self.n)).difference(synced, self._ended):
                break
            self._backlog.append(self._recv(max(0.0, deadline - time.monotonic()),
                                            "multifd channels to sync"))
        if not synced:
            return
        self._round += 1
        for i, s in synced.items():
            if s.round != self._round:
                raise MigrationError(f"multifd channel {i}: reached SYNC {s.round} "
                                     f"while the migration is at SYNC {self._round}")
        if len(synced) == self.n:
            self.normal = sum(s.normal for s in synced.values())
            self.zero = sum(s.zero for s in synced.values())
            self.wire_bytes = sum(s.wire_bytes for s in synced.values())
        for i in synced:
            self._send(i, ctl.Release(self._round))

    def finish(self, timeout: float = REPLY_SECONDS) -> None:
        """Wait for every channel's clean end (the source closes them after EOF)."""
        done = self._wait_all(ctl.Done, "multifd channels to end", timeout)
        self.wire_bytes = sum(d.wire_bytes for d in done)
        self.normal = sum(d.normal for d in done)
        self.zero = sum(d.zero for d in done)

    def close(self, timeout: float = 5.0) -> None:
        if self._finalizer.alive:
            for s in self._fd_socks:
                s.close()      # a worker still waiting for its channel sees EOF
        super().close(timeout)
