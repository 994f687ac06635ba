"""Multifd worker pools on their own: real worker processes, sockets, shared memory."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from engine.errors import MigrationError
from engine.multifd.packet import MULTIFD_INIT_SIZE, MultiFDInit
from engine.multifd.pool import RecvPool, SendPool
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog
from engine.ram.image import fill_mixed
from engine.transport import listen

PS = 4096


def accept_multifd(listener, pool, n):
    """What the destination coordinator does: read MultiFDInit, hand the socket on."""
    for _ in range(n):
        ch = listener.accept(timeout=30)
        init = MultiFDInit.unpack(ch.read_exactly(MULTIFD_INIT_SIZE), channel="multifd")
        pool.attach(init.channel_id, ch.sock)
        ch.close()


@pytest.mark.parametrize("codec", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("zero_detect", [True, False])
def test_pools_move_pages_between_shared_memories(codec, zero_detect):
    npages = 4096
    with RamBlock.create("pc.ram", npages * PS) as src, \
            RamBlock.create("pc.ram", npages * PS) as dst, \
            DirtyLog.create(npages) as received:
        fill_mixed(src.pages, seed=5)
        with listen("unix:/tmp/engine-test-multifd.sock") as listener, \
                RecvPool(3, [dst], [received], codec=codec) as rpool, \
                SendPool(3, [src], codec=codec, zero_detect=zero_detect) as spool:
            t = threading.Thread(target=accept_multifd, args=(listener, rpool, 3))
            t.start()
            spool.connect(listener.uri)
            t.join(30)
            assert rpool.attached == {0, 1, 2}
            # two rounds: everything, then a re-dirtied subset with new content
            spool.submit(0, np.arange(npages, dtype=np.uint64))
            syncer = threading.Thread(target=rpool.sync)
            syncer.start()
            spool.sync()
            syncer.join(30)
            again = np.arange(0, npages, 7, dtype=np.uint64)
            src.pages[again.astype(np.int64), :8] = 0xAB
            src.pages[again[::2].astype(np.int64)] = 0         # some become zero
            spool.submit(0, again)
            syncer = threading.Thread(target=rpool.sync)
            syncer.start()
            spool.sync()
            syncer.join(30)
            spool.finish()
            rpool.finish(timeout=30)
            assert np.array_equal(src.pages, dst.pages)
            assert received.log.all()
            assert spool.wire_bytes > 0


def test_send_worker_that_dies_names_its_channel():
    with RamBlock.create("m0", 64 * PS) as src:
        with listen("tcp:127.0.0.1:0") as listener:
            pool = SendPool(2, [src])
            try:
                pool.procs[1].kill()
                pool.procs[1].join()
                with pytest.raises(MigrationError, match="multifd channel 1"):
                    pool.connect(listener.uri)
            finally:
                pool.kill()


def test_sync_keeps_rounds_in_order_across_channels():
    """Every page is sent once per round, each round on a different channel.

    Without the SYNC barrier a channel that runs ahead applies round k+1's
    copy of a page before a slower channel applies its round-k copy, and the
    stale copy wins.  After the last round every page must hold its value.
    """
    npages, rounds = 8192, 12
    with RamBlock.create("m0", npages * PS) as src, RamBlock.create("m0", npages * PS) as dst, \
            DirtyLog.create(npages) as received:
        with listen("tcp:127.0.0.1:0") as listener, \
                RecvPool(4, [dst], [received]) as rpool, \
                SendPool(4, [src], zero_detect=False) as spool:
            t = threading.Thread(target=accept_multifd, args=(listener, rpool, 4))
            t.start()
            spool.connect(listener.uri)
            t.join(30)
            # The destination syncs on its own, as its main channel would make
            # it (at each EOS); the source runs ahead as soon as its SYNC
            # packets are written, exactly as in a migration.
            syncer = threading.Thread(target=lambda: [rpool.sync() for _ in range(rounds)])
            syncer.start()
            pages = np.arange(npages, dtype=np.uint64)
            for r in range(1, rounds + 1):
                src.pages[:] = r
                # shift the page order so each page lands on another channel
                spool.submit(0, np.roll(pages, r * 300))
                spool.sync()
            syncer.join(60)
            spool.finish()
            rpool.finish(timeout=30)
            stale = np.flatnonzero(dst.pages[:, 0] != rounds)
            assert len(stale) == 0, f"{len(stale)} stale pages, e.g. {stale[:5]}"


def test_batches_take_turns_among_idle_workers():
    """QEMU's multifd_send_pages walks its channels from the one after the
    last used: with quickly acknowledged batches every channel gets work,
    not always the first."""
    pool = object.__new__(SendPool)          # the choice only, no processes
    pool.n, pool._outstanding, pool._last = 3, [0, 0, 0], 2
    assert [pool._next_worker() for _ in range(4)] == [0, 1, 2, 0]
    pool._outstanding = [1, 0, 1]            # the least busy wins over the turn
    assert pool._next_worker() == 1
    pool._outstanding = [1, 1, 1]
    assert pool._next_worker() == 2          # all equal again: next after 1


_DROPPED_POOLS = """
import gc, json, os
from engine.multifd.pool import RecvPool, SendPool
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog

with RamBlock.create("m0", 64 * 4096) as block, DirtyLog.create(64) as log:
    out = []
    for pool in (SendPool(2, [block]), RecvPool(2, [block], [log]), SendPool(1, [block])):
        out.append({"dir": pool._dir, "pids": [p.pid for p in pool.procs]})
        pool.itself = pool      # a cycle: only the collector can free it
    del pool
    gc.collect()
    print(json.dumps(out))
"""


def test_a_pool_dropped_without_close_is_released(tmp_path):
    """A pool its user lost (a failure half-way) is released when collected:
    workers gone, directory removed, and no hang (in a garbage cycle zmq's
    context used to be finalized before its socket, and wait for it forever)."""
    import json
    import subprocess
    import sys

    import psutil

    proc = subprocess.run([sys.executable, "-c", _DROPPED_POOLS], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    pools = json.loads(proc.stdout)
    for pool in pools:
        assert pool["pids"] and not os.path.exists(pool["dir"])
        for pid in pool["pids"]:
            assert not psutil.pid_exists(pid) or \
                psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not list(tmp_path.iterdir())
