"""Multifd batching: how batch size and batches in flight change throughput.

Moves a mixed image between two shared-memory blocks through real worker
pools (send and receive processes, a unix socket per channel), without the
main channel or a coordinator's bitmap, so only the hand-out parameters vary:

* ``BATCH_PAGES``: pages per BATCH message from the coordinator (each becomes
  ``BATCH_PAGES / 128`` QEMU packets of 512 KiB);
* ``MAX_OUTSTANDING``: batches a worker may have in flight.

Every transfer lands in a new destination block, as a migration's does (its
pages have never been written, so landing them costs what it costs there).
Cells run in matrix order within a repeat; figures are medians over
``--repeat``.

Usage: ``.venv/bin/python bench/batching.py [--size 1G] [--channels 2]
[--codec none] [--repeat 3]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine.multifd.pool as pool  # noqa: E402
from engine.multifd.packet import MULTIFD_INIT_SIZE, MultiFDInit  # noqa: E402
from engine.options import parse_size  # noqa: E402
from engine.ram.block import RamBlock  # noqa: E402
from engine.ram.dirty import DirtyLog  # noqa: E402
from engine.ram.image import fill_mixed  # noqa: E402
from engine.transport import listen  # noqa: E402

PS = 4096


def _accept(listener, rpool, n):
    for _ in range(n):
        ch = listener.accept(timeout=60)
        init = MultiFDInit.unpack(ch.read_exactly(MULTIFD_INIT_SIZE))
        rpool.attach(init.channel_id, ch.sock)
        ch.close()


def transfer_ms(src, channels: int, sock: str, codec: str) -> float:
    """One full pass of every page through fresh pools into a new block; milliseconds."""
    with RamBlock.create("m0", src.used_length) as dst, \
            DirtyLog.create(src.npages) as received, \
            listen(f"unix:{sock}") as listener, \
            pool.RecvPool(channels, [dst], [received], codec=codec) as rpool, \
            pool.SendPool(channels, [src], codec=codec) as spool:
        t = threading.Thread(target=_accept, args=(listener, rpool, channels))
        t.start()
        spool.connect(listener.uri)
        t.join()
        start = time.perf_counter()
        syncer = threading.Thread(target=rpool.sync)
        syncer.start()
        spool.submit(0, np.arange(src.npages, dtype=np.uint64))
        spool.sync()
        syncer.join()
        elapsed = time.perf_counter() - start
        spool.finish()
        rpool.finish()
        if not np.array_equal(src.pages, dst.pages):
            raise SystemExit("bench: destination differs from source")
    return elapsed * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--codec", default="none", choices=("none", "zlib", "zstd"))
    ap.add_argument("--batch-pages", default="256,1024,4096")
    ap.add_argument("--outstanding", default="1,2,4")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    cells = [(bp, mo) for bp in map(int, args.batch_pages.split(","))
             for mo in map(int, args.outstanding.split(","))]
    workdir = tempfile.mkdtemp(prefix="engine-bench-")
    sock = os.path.join(workdir, "mf.sock")
    try:
        with RamBlock.create("m0", size) as src:
            fill_mixed(src.pages, seed=1)
            print(f"{args.size} mixed image, {args.channels} channels, codec {args.codec}, "
                  f"unix sockets, {os.cpu_count()} CPUs, median of {args.repeat}")
            times: dict = {cell: [] for cell in cells}
            for _ in range(args.repeat):
                for cell in cells:
                    pool.BATCH_PAGES, pool.MAX_OUTSTANDING = cell
                    times[cell].append(transfer_ms(src, args.channels, sock, args.codec))
            print(f"{'BATCH_PAGES':>12} {'MAX_OUTSTANDING':>16} {'ms':>8} {'GB/s':>7}")
            for (bp, mo), ms in times.items():
                med = statistics.median(ms)
                print(f"{bp:>12} {mo:>16} {med:>8.0f} {size / med / 1e6:>7.2f}")
    finally:
        if os.path.exists(sock):
            os.unlink(sock)
        os.rmdir(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
