"""The two multifd dialects, engine to engine, with the main channel recorded.

Today's QEMU (the engine's default) flushes the channels at a MULTIFD_FLUSH
record in setup and once per pass, finds zero pages in the channels and sends
SWITCHOVER_START before the final RAM section; QEMU 7.2's dialect (the
``none-7.2`` profile, or QEMU's ``-global`` properties one by one) syncs at
every RAM EOS, sends zero pages on the main channel and knows no
SWITCHOVER_START.  A relay between the two sides records the main channel,
which the engine's decoder then reads back; the destination must have
recognised the dialect without being told, and the memory must arrive intact
for a running guest (``ab``, several passes) and an idle pre-filled one.
"""
from __future__ import annotations

import socket
import threading

import pytest

from engine.options import MigrationOptions, parse_global_arg
from engine.stream import NEED_DATA, StreamDecoder
from engine.stream import events as ev
from tests.e2e.sources import PROFILE, TIMEOUT, run_bounded, source  # noqa: F401
from tests.e2e.test_multifd_failures import CHANNELS, Destination

#: QEMU 7.2 on the wire, as QEMU 10's ``-global`` settings would make it
OLD_DIALECT = ("migration.multifd-flush-after-each-section=on",
               "migration.send-switchover-start=off")


class RecordingRelay:
    """Forwards every connection to the unix socket ``upstream``; keeps what
    the first one (the main channel: the source opens it first) carried."""

    def __init__(self, path: str, upstream: str):
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(path)
        self._listener.listen(8)
        self._listener.settimeout(0.2)
        self.uri = f"unix:{path}"
        self.upstream = upstream
        self.main = bytearray()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                down, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            down.settimeout(None)
            up = socket.socket(socket.AF_UNIX)
            up.connect(self.upstream)
            self._socks += [down, up]
            for src, dst, record in ((down, up, first), (up, down, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, record), daemon=True)
                t.start()
                self._threads.append(t)
            first = False

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(1 << 20):
                if record:
                    self.main += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._accepting.join(TIMEOUT)
        self._listener.close()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(TIMEOUT)
        for s in self._socks:
            s.close()


def main_channel_events(stream: bytes, vcpus: int) -> list:
    decoder = StreamDecoder(PROFILE.lookup(vcpus), channel="main")
    decoder.feed(stream)
    out = []
    while (e := decoder.next_event()) is not NEED_DATA:
        out.append(e)
    return out


def dialect_options(old: bool) -> MigrationOptions:
    opts = MigrationOptions.default()
    if old:
        opts = opts.with_properties(dict(parse_global_arg(g) for g in OLD_DIALECT))
        opts = opts.with_parameters({"zero-page-detection": "legacy"})
    return opts.with_capabilities({"multifd": True, "return-path": True}).with_parameters(
        {"multifd-channels": CHANNELS, "max-bandwidth": 64 << 20, "downtime-limit": 300})


@pytest.mark.parametrize("old", [False, True], ids=["today", "qemu7.2"])
def test_dialect_on_the_wire(tmp_path, source, old):
    opts = dialect_options(old)
    dest = Destination(tmp_path, source, opts)
    relay = RecordingRelay(f"{tmp_path}/relay.sock", dest.uri.removeprefix("unix:"))
    try:
        mig = source.migration(opts)
        mig.compute_digests = True
        info = run_bounded(mig, relay.uri)
        assert info.status == "completed", info.to_qmp()
        assert dest.join().status == "completed"
        assert mig.switchover_digests == dest.mig.digests
        if source.kind == "ab":
            assert dest.mig.ab_result.ok, dest.mig.ab_result
        # The destination found the source's dialect by itself.
        assert dest.mig._flush_dialect is (not old)
    finally:
        dest.close()
        relay.close()

    events = main_channel_events(bytes(relay.main), source.guest.nvcpus)
    kinds = [type(e) for e in events]
    setup_end = kinds.index(ev.RamEOS)
    flushes = [i for i, k in enumerate(kinds) if k is ev.RamFlush]
    switchover = [i for i, k in enumerate(kinds) if k is ev.SwitchoverStart]
    zeros = sum(len(e) if isinstance(e, ev.RamZeros) else 1
                for e in events if isinstance(e, (ev.RamZero, ev.RamZeros)))
    last_ram_end = max(i for i, e in enumerate(events)
                       if isinstance(e, ev.SectionEnd))
    if old:
        assert flushes == [] and switchover == []
        # legacy detection: the idle image's zero pages went on this channel
        if source.kind == "none":
            assert zeros > 0
    else:
        # One flush in setup, then one per pass over the bitmap.
        assert flushes and flushes[0] < setup_end, kinds[:setup_end + 1]
        assert len(flushes) >= 1 + (info.to_qmp()["ram"]["dirty-sync-count"] > 1)
        assert len(switchover) == 1 and switchover[0] < last_ram_end
        assert zeros == 0       # found by the channels
