"""Dirty log: marking, harvesting, and no lost write under a concurrent writer."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from engine.errors import GuestError
from engine.ram.block import RamBlock
from engine.ram.dirty import DirtyLog
from engine.ram.shm import SHM_DIR, create_segment, unlink_segment


def test_mark_and_harvest():
    with DirtyLog.create(100) as log:
        assert log.handle.shm_name.startswith("engine-")
        assert log.count() == 0
        assert log.harvest().size == 0
        log.mark(10, 3)
        log.mark(50)
        log.mark_pages(np.array([99, 0, 11]))
        assert log.count() == 6
        dirty = log.harvest()
        assert dirty.dtype == np.int64
        assert dirty.tolist() == [0, 10, 11, 12, 50, 99]
        assert log.count() == 0 and log.harvest().size == 0
        log.mark_all()
        assert log.harvest().tolist() == list(range(100))
        name = log.handle.shm_name
    assert not os.path.exists(os.path.join(SHM_DIR, name))


def test_attached_log_shares_entries():
    with DirtyLog.create(16) as log:
        other = DirtyLog.attach(log.handle)
        other.mark(4)
        assert log.harvest().tolist() == [4]
        assert other.count() == 0
        with pytest.raises(GuestError):
            other.unlink()
        other.close()


def test_empty_log():
    with DirtyLog.create(0) as log:
        log.mark_all()
        assert log.harvest().size == 0 and log.count() == 0


# The writer follows the protocol: store (an ever-increasing value into a
# random word of each chosen page), then mark.  The harvester copies every
# harvested page into a mirror; a lost write leaves a stale page in the mirror
# if it was that page's last write.  Small pages, many of them and a writer
# that naps make most pages' last writes happen at scattered times while the
# harvester is running, which is where a lost write would show.
PAGE = 64
NPAGES = 1 << 16
WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from engine.ram.block import RamBlock, RamBlockHandle
    from engine.ram.dirty import DirtyLog, DirtyLogHandle
    from engine.ram.shm import attach_segment
    npages, page = int(sys.argv[2]), int(sys.argv[3])
    block = RamBlock.attach(RamBlockHandle("ram", npages * page, page, sys.argv[1], None))
    log = DirtyLog.attach(DirtyLogHandle(sys.argv[4], npages))
    flag = attach_segment(sys.argv[5])
    words = block.array.view(np.uint64).reshape(npages, -1)
    rng = np.random.default_rng(1)
    value = 0
    while flag.buf[0] == 0:
        value += 1
        pages = rng.integers(0, npages, 8)
        words[pages, rng.integers(0, words.shape[1], 8)] = value
        log.mark_pages(pages)
        time.sleep(0.00002)
    print(value)
    del words
    log.close(); block.close(); flag.close()
""")


def test_no_write_is_lost_under_a_concurrent_writer():
    with RamBlock.create("ram", NPAGES * PAGE, page_size=PAGE) as block, \
            DirtyLog.create(NPAGES) as log:
        flag = create_segment(1)
        try:
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, block.handle.shm_name, str(NPAGES),
                 str(PAGE), log.handle.shm_name, flag.name],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            mirror = np.zeros_like(block.pages)
            nonempty = 0
            start = time.monotonic()
            try:
                # Until the writer has clearly been running alongside us.
                while nonempty < 2000 and time.monotonic() - start < 30:
                    dirty = log.harvest()
                    mirror[dirty] = block.pages[dirty]
                    nonempty += bool(dirty.size)
                    time.sleep(0.0001)              # a sender has other work too
            finally:
                flag.buf[0] = 1
                out, err = writer.communicate(timeout=30)
            assert writer.returncode == 0, err
            assert nonempty >= 2000
            assert int(out) > 2000                      # the writer really wrote
            dirty = log.harvest()
            mirror[dirty] = block.pages[dirty]
            stale = np.flatnonzero((mirror != block.pages).any(axis=1))
            assert stale.size == 0, f"{stale.size} lost writes, pages {stale[:10]}"
            assert log.harvest().size == 0
        finally:
            flag.close()
            unlink_segment(flag)
