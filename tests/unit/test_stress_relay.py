"""engine stress: the main-channel relay (cut, structure and payload corruption),
the fault trigger, and the leak check.

The relay carries QEMU 7.2's recorded precopy stream between two unix
sockets of this test; what arrives is decoded with the engine's decoder.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from engine.devices import lookup_qemu_vmsd
from engine.errors import RemoteProtocolError
from engine.ram.shm import create_segment, unlink_segment
from engine.state import MigrationStatus as S
from engine.stream import NEED_DATA, RamPage, RamZero, StreamDecoder
from engine.stress import leaks
from engine.stress.faults import Relay, Trigger
from engine.stress.matrix import Fault
from engine.transport import listen
from tests.captures import require_captures

TIMEOUT = 30


@pytest.fixture(scope="module")
def stream() -> bytes:
    return (require_captures() / "precopy-file.stream").read_bytes()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.fromfile(require_captures() / "ram-4MiB.img", dtype=np.uint8)


class Pair:
    """A destination listener, a relay in front of it, and a source socket."""

    def __init__(self, tmp_path: Path):
        self.dest = listen(f"unix:{tmp_path}/dst.sock")
        self.relay = Relay(f"unix:{tmp_path}/relay.sock", self.dest.uri, lookup_qemu_vmsd)
        self.src = socket.socket(socket.AF_UNIX)
        self.src.settimeout(TIMEOUT)
        self.src.connect(self.relay.uri.split(":", 1)[1])
        self.received = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        with self.dest.accept(timeout=TIMEOUT) as ch:
            ch.settimeout(TIMEOUT)
            while data := ch.recv(1 << 16):
                self.received += data

    def send(self, data: bytes, piece: int = 7919) -> None:
        for i in range(0, len(data), piece):
            self.src.sendall(data[i:i + piece])
        self.src.shutdown(socket.SHUT_WR)

    def wait(self) -> bytes:
        self._reader.join(TIMEOUT)
        assert not self._reader.is_alive()
        return bytes(self.received)

    def close(self):
        self.src.close()
        self.relay.close()
        self.dest.close()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.close()


def decode(data: bytes, ram: np.ndarray) -> None:
    dec = StreamDecoder(lookup_qemu_vmsd)
    dec.feed(data)
    dec.feed_eof()
    while (e := dec.next_event()) is not NEED_DATA:
        if isinstance(e, RamPage):
            ram[e.offset:e.offset + 4096] = e.data
        elif isinstance(e, RamZero):
            ram[e.offset:e.offset + 4096] = 0
    assert dec.finished


def test_relay_passes_the_stream_unchanged(pair, stream):
    pair.send(stream)
    assert pair.wait() == stream
    assert pair.relay.corrupted_at is None and pair.relay.follow_error is None


def test_structure_corruption_is_a_record_the_destination_rejects(pair, stream):
    pair.relay.arm("structure")
    pair.send(stream)
    out = pair.wait()
    at = pair.relay.corrupted_at
    assert at is not None and len(out) == len(stream)
    assert [i for i in range(len(out)) if out[i] != stream[i]] == [at]
    with pytest.raises(RemoteProtocolError, match="Unknown combination of migration flags") \
            as err:
        decode(out, np.zeros_like(np.frombuffer(bytes(4 << 20), np.uint8)))
    # The flags byte is the last of the record's 8-byte header.
    assert err.value.offset == at - 7


def test_payload_corruption_passes_the_format_and_damages_one_page(pair, stream, image):
    pair.relay.arm("payload")
    pair.send(stream)
    out = pair.wait()
    ram = np.zeros_like(image)
    decode(out, ram)                        # nothing on the wire notices
    bad = np.flatnonzero((ram.reshape(-1, 4096) != image.reshape(-1, 4096)).any(axis=1))
    assert len(bad) == 1
    assert "data byte" in pair.relay.corrupted_what


def test_cut_ends_both_directions(pair, stream):
    pair.src.sendall(stream[:100000])
    pair.relay.cut()
    out = pair.wait()                       # the destination sees the end of its channel
    assert len(out) <= 100000
    with pytest.raises(OSError):
        for _ in range(100):
            pair.src.sendall(stream)


# -- the trigger ---------------------------------------------------------------


class Progress:
    def __init__(self):
        self.value = ("setup", 0, 1000)

    def __call__(self):
        return self.value


def test_trigger_fires_once_at_its_fraction_of_the_first_pass():
    progress, fired = Progress(), []
    t = Trigger(Fault("channel-dropped", "active", None, 0.5), 1000, progress,
                lambda: fired.append(progress.value[1]) or "done")
    t.poke()
    progress.value = ("active", 499, 501)
    t.poke()
    assert not t.fired
    progress.value = ("active", 500, 500)
    t.poke()
    progress.value = ("active", 900, 100)
    t.poke()
    assert t.fired and fired == [500] and t.note == "done" and t.fired_status == "active"


@pytest.mark.parametrize("new, fires", [(S.DEVICE, True), (S.PRE_SWITCHOVER, True),
                                        (S.FAILED, False), (S.CANCELLING, False)])
def test_trigger_in_active_fires_at_the_switchover_if_progress_never_showed_the_mark(
        new, fires):
    """The rest of the pass went out before an acknowledgement crossing the
    mark was read: the switchover is the last moment still in the pass.  A
    migration that ends otherwise gets no fault."""
    progress, fired = Progress(), []
    t = Trigger(Fault("worker-killed", "active", "destination", 0.4), 1000, progress,
                lambda: fired.append(progress.value[1]))
    progress.value = ("active", 300, 700)
    t.poke()
    t.on_status(S.ACTIVE, new)
    assert t.fired is fires and fired == ([300] if fires else [])
    assert t.fired_status == ("active" if fires else None)
    t.on_status(new, S.FAILED)
    assert len(fired) == int(fires)


def test_trigger_in_postcopy_counts_from_the_switch():
    progress, fired = Progress(), []
    t = Trigger(Fault("destination-killed", "postcopy", None, 0.25), 1000, progress,
                lambda: fired.append(progress.value[1]))
    progress.value = ("postcopy-device", 600, 400)
    t.poke()
    progress.value = ("postcopy-active", 700, 400)     # the base: 400 pages to go
    t.poke()
    progress.value = ("postcopy-active", 799, 301)
    t.poke()
    assert not fired
    progress.value = ("postcopy-active", 800, 300)
    t.poke()
    assert fired == [800]


def test_trigger_on_a_status_and_a_failing_action():
    t = Trigger(Fault("cancel", "device"), 1000, Progress(), lambda: 1 / 0)
    t.on_status(S.ACTIVE, S.PRE_SWITCHOVER)
    assert not t.fired
    t.on_status(S.PRE_SWITCHOVER, S.DEVICE)
    assert t.fired and t.fired_status == "device" and "ZeroDivisionError" in t.error


# -- leaks ---------------------------------------------------------------------


def test_leak_check_finds_and_removes_a_segment_and_a_process():
    before = leaks.snapshot()
    assert leaks.find_leaks(before, grace=0.2) == ([], [])
    shm = create_segment(4096)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        segs, procs = leaks.find_leaks(before, grace=0.3)
        assert segs == [shm.name.lstrip("/")]
        assert len(procs) == 1 and f"pid {proc.pid}" in procs[0]
        proc.wait(TIMEOUT)          # killed by the check
        assert leaks.find_leaks(before, grace=0.2) == ([], [])
    finally:
        proc.kill()
        proc.wait()
        unlink_segment(shm)     # already gone: the check removed it
        shm.close()


def test_leak_check_finds_and_removes_an_engine_temp_dir():
    import socket
    import tempfile

    from engine.stress.verdict import Expectation, Observation, Verdict, classify
    before = leaks.snapshot()
    made = [tempfile.mkdtemp(prefix=p) for p in leaks.TEMP_DIR_PREFIXES]
    other = tempfile.mkdtemp(prefix="engine-stress-")      # not one the check watches
    try:
        # one with a socket bound in it, as a pool's has while it runs
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(os.path.join(made[0], "ch0.sock"))
            found, procs = leaks.find_leaks(before, grace=0.2)
        assert found == sorted(made) and procs == []
        assert not any(os.path.exists(d) for d in made)     # removed by the check
        assert leaks.find_leaks(before, grace=0.2) == ([], [])
        verdict, detail = classify(Expectation(frozenset({Verdict.COMPLETED})),
                                   Observation(source_status="completed",
                                               leaked_segments=(made[1],)))
        assert verdict is Verdict.LEAK and f"temp directories {made[1]}" in detail
    finally:
        for d in made + [other]:
            shutil.rmtree(d, ignore_errors=True)


def test_temp_dirs_another_process_tree_works_in_are_not_ours():
    """Seen from a child (whose tree this process is not in): the directory
    this process has a file open in, and the one it has a socket bound in,
    are another run's; an idle one is not."""
    import tempfile
    held, bound, idle = (tempfile.mkdtemp(prefix=p) for p in leaks.TEMP_DIR_PREFIXES)
    f = open(os.path.join(held, "x"), "w")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(os.path.join(bound, "ch.sock"))
        s.listen()
        code = ("import sys; from engine.stress import leaks; "
                "print(sorted(leaks.dirs_used_by_others(set(sys.argv[1:]))))")
        out = subprocess.run([sys.executable, "-c", code, held, bound, idle], check=True,
                             capture_output=True, text=True, timeout=TIMEOUT).stdout
        assert out.strip() == repr(sorted([held, bound]))
    finally:
        f.close()
        s.close()
        for d in (held, bound, idle):
            shutil.rmtree(d, ignore_errors=True)
