"""Postcopy from a real QEMU source (7.2 and 10.0) to the engine's destination.

The guest is QEMU's ``-M none`` with 16 MiB of file-backed RAM (block ``m0``,
``share=on``) filled by :func:`fill_image`; the engine destination is the
``engine incoming`` CLI with ``--mem-path`` on a second file that starts out
full of a non-zero pattern, so a page the destination never placed (or a
discard it did not apply) shows up as a difference.  QEMU runs with ``-S``,
so nothing but the migration touches either file: the proof of a correct
migration is the two RAM files being equal byte for byte.

QEMU is kept from converging in precopy (a small ``max-bandwidth``,
``downtime-limit`` 1 ms) and is switched with ``migrate-start-postcopy``
either as soon as the migration is active or after a quarter of its RAM went
in precopy.  RAM counts as postcopiable, so the switch happens at the next
iteration.  What the engine destination must follow is QEMU's postcopy
stream: ADVISE before the RAM block list, a DISCARD for every page
not sent yet, PACKAGED (LISTEN, device state, PINGs 3 and 0x42, RUN), RAM
PART sections of postcopy records with no rate limit
(``max-postcopy-bandwidth`` 0), EOF without a vmdesc, and SHUT on the return
path at the end.  A start-postcopy after the first pass is not possible here:
``-M none`` has no vCPU to dirty pages, so once the first pass ends nothing
is pending and QEMU completes in precopy.

With no vCPU on QEMU's side nothing faults on the destination unless the
engine's own guest runs: :func:`test_qemu_postcopy_serves_engine_page_requests`
resumes it (QEMU's run state says ``running``) so that its vCPU faults, the
engine sends REQ_PAGES_ID / REQ_PAGES and QEMU answers them.

Every process is started inside a ``with`` that kills and reaps it, and every
wait is bounded.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine.devices import globalstate_runstate
from engine.machine import get_profile
from engine.migration.channels import accept_channels
from engine.migration.destination import DestinationMigration
from engine.options import MigrationOptions
from engine.ram.guest import Guest
from engine.ram.workloads import WorkloadSpec
from engine.transport import listen, parse_uri
from tests.qemu import (PAGE_SIZE, ManagedProcess, Qemu, QemuMigrationFailed, QemuVM,
                        QMPCommandError, fill_image, free_tcp_port, image_differences,
                        parse_size)

pytestmark = pytest.mark.interop

SIZE = "16M"
SIZE_BYTES = parse_size(SIZE)
SEED = 7_2_3
#: QEMU's precopy max-bandwidth (bytes/s): the guest would take about 2 s,
#: far longer than issuing migrate-start-postcopy takes.
SLOW = 8 << 20
#: Upper bound for any single wait; never reached when things work.
WAIT_S = 120.0
#: A migration whose byte count has not moved for this long (seconds) is
#: stuck; fail it then rather than at WAIT_S.
STALL_S = 20.0
#: What the destination's RAM holds before the migration: no page of it is
#: zero, and no page of the source image looks like it.
STALE_BYTE = 0xA5
#: Statuses that end the wait for QEMU's ``completed`` early.  7.2 pauses
#: (rather than fails) on a broken channel in postcopy.
QEMU_FAIL = ("failed", "cancelled", "postcopy-paused")

WHEN = [pytest.param("at-once", id="at-once"), pytest.param("mid-pass", id="mid-pass")]


@contextlib.contextmanager
def _ram_files(shm_path: Path):
    """Yield (QEMU's RAM file holding the image, the engine's holding STALE_BYTE).

    The engine's file is ``shm_path`` plus a suffix, so the suite's
    /dev/shm leak check covers it.  Other test sessions may run on this
    machine, and their leak check takes an ``engine-*`` file in /dev/shm
    that no process has open for a leak of theirs and deletes it.  Ours are
    open from creation to the last comparison, whether QEMU and the engine
    have them mapped yet or not, and removed afterwards.
    """
    paths = (shm_path, shm_path.with_name(f"{shm_path.name}-engine"))
    fds = []
    try:
        for path in paths:
            fds.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        fill_image(paths[0], SIZE, SEED)
        _fill_stale(paths[1])
        yield paths
    finally:
        for fd in fds:
            os.close(fd)
        for path in paths:
            path.unlink(missing_ok=True)


def _fill_stale(path: Path) -> None:
    """Make ``path`` a RAM file of SIZE bytes whose every byte is STALE_BYTE."""
    with open(path, "wb") as f:
        chunk = bytes([STALE_BYTE]) * (1 << 20)
        for _ in range(SIZE_BYTES // len(chunk)):
            f.write(chunk)


def _read_json(path: Path, proc: ManagedProcess) -> dict:
    assert path.exists(), f"no --json report written\n{proc.describe()}"
    return json.loads(path.read_text())


def _qemu_postcopy_source(src: QemuVM, multifd: int = 0) -> None:
    """postcopy-ram (+ multifd), events on, and no convergence in precopy.

    Raises :class:`QMPCommandError` if QEMU refuses the capabilities.
    """
    caps = {"postcopy-ram": True, "events": True}
    if multifd:
        caps["multifd"] = True
    src.set_caps(caps)
    params: dict = {"max-bandwidth": SLOW, "downtime-limit": 1}
    if multifd:
        params["multifd-channels"] = multifd
    src.set_params(params)


def _start_postcopy(src: QemuVM, when: str) -> None:
    """``migrate-start-postcopy`` while QEMU is still in its first precopy pass."""
    if when == "mid-pass":
        deadline = time.monotonic() + WAIT_S
        while True:
            info = src.query_migrate()
            assert info.get("status") == "active", (
                f"QEMU left precopy before postcopy was asked for: {info}")
            if info["ram"]["transferred"] >= SIZE_BYTES // 4:
                break
            assert time.monotonic() < deadline, f"QEMU precopy stalled: {info}"
            time.sleep(0.02)
    info = src.query_migrate()
    assert info.get("status") == "active", f"not in precopy any more: {info}"
    # Still in the first pass: nothing has been synced twice.
    assert info["ram"]["dirty-sync-count"] == 1, info
    src.cmd("migrate-start-postcopy")


def _qemu_statuses(src: QemuVM) -> list[str]:
    return [e["data"]["status"] for e in src.events
            if e["event"] == "MIGRATION" and "data" in e]


def _wait_completed(src: QemuVM, dst_status, describe_dst) -> dict:
    """QEMU's final ``query-migrate`` once it says ``completed``.

    Fails at once on a QEMU status in QEMU_FAIL or an engine that exited
    with an error (``dst_status()``: its exit status, ``None`` while it
    runs), and after STALL_S seconds without a transferred byte.
    """
    deadline = time.monotonic() + WAIT_S
    last, moved = -1, time.monotonic()
    while True:
        info = src.query_migrate()
        status = info.get("status")
        if status == "completed":
            return info
        why = None
        if status in QEMU_FAIL:
            why = QemuMigrationFailed(src.name, info)
        elif dst_status() not in (None, 0):
            why = AssertionError(f"the engine destination failed while QEMU is {status}")
        else:
            now, sent = time.monotonic(), info.get("ram", {}).get("transferred", 0)
            if sent != last:
                last, moved = sent, now
            elif now - moved > STALL_S or now > deadline:
                why = TimeoutError(f"QEMU stuck in {status} for {now - moved:.0f} s")
        if why is not None:
            raise AssertionError(f"{why}\nQEMU query-migrate: {info}\n"
                                 f"QEMU log: {src.log_tail()}\n{describe_dst()}") from why
        time.sleep(0.02)


def _migrate_to_engine(qemu: Qemu, engine_cmd, qemu_ram: Path, engine_ram: Path,
                       tmp_path: Path, *, faults: str, when: str, vcpus: int,
                       multifd: int = 0) -> tuple[dict, dict]:
    """QEMU source -> ``engine incoming`` with postcopy-ram.

    Returns (QEMU's final ``query-migrate``, the engine's ``--json`` report)
    once both sides completed and the RAM files were found equal.
    """
    report = tmp_path / "incoming.json"
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    engine_multifd = (["--cap", "multifd=on", "--param", f"multifd-channels={multifd}"]
                      if multifd else [])
    with QemuVM(qemu_ram, SIZE, name="qemu-src", qemu=qemu) as src, \
            ManagedProcess([*engine_cmd, "incoming", uri, "--machine", "none",
                            "--ram", SIZE, "--mem-path", engine_ram, "--ram-id", "m0",
                            "--vcpus", str(vcpus), "--workload", "none",
                            "--cap", "postcopy-ram=on", "--cap", "postcopy-blocktime=on",
                            "--postcopy-faults", faults,
                            *engine_multifd, "--json", report],
                           tmp_path, "engine-incoming") as dst:
        _qemu_postcopy_source(src, multifd)
        # The engine may not listen yet: retry while the port refuses.
        src.migrate_when_listening(uri, timeout=WAIT_S,
                                   listener_alive=lambda: dst.poll() is None)
        _start_postcopy(src, when)
        info = _wait_completed(src, dst.poll, dst.describe)
        rc = dst.wait(timeout=WAIT_S)
        assert rc == 0, f"engine incoming failed\n{dst.describe()}"
        assert "postcopy-active" in _qemu_statuses(src), _qemu_statuses(src)
        # -S: the source stays paused; it never ran, so nothing else wrote
        # its RAM.
        assert src.query_status() in ("postmigrate", "paused", "prelaunch")
        diff = image_differences(qemu_ram, engine_ram)
        assert diff is None, diff
    return info, _read_json(report, dst)


def _check_report(data: dict, info: dict, faults: str, vcpus: int, multifd: int) -> None:
    mig = data["migration"]
    assert mig["status"] == "completed"
    assert mig["x-postcopy-faults"] == faults
    # No vCPU ran on either side: nothing faulted, nothing was requested.
    assert mig["ram"]["postcopy-requests"] == 0
    assert info["ram"]["postcopy-requests"] == 0
    assert mig["postcopy-blocktime"] == 0
    assert mig["postcopy-vcpu-blocktime"] == [0] * vcpus
    assert data["devices"]["globalstate"]["runstate"] == "prelaunch"
    ram = info["ram"]
    assert ram["total"] == SIZE_BYTES
    assert ram["postcopy-bytes"] > 0
    # QEMU sends each page once (nothing re-dirtied it); 7.2 sends zero
    # pages on the main channel even with multifd, 10.0 lists them in the
    # multifd packets.
    assert ram["duplicate"] + ram["normal"] == SIZE_BYTES // PAGE_SIZE
    assert data["zero_pages"] + data["multifd_zero_pages"] == ram["duplicate"]
    if multifd:
        # The precopy pages that were not zero went on the multifd channels.
        assert ram["multifd-bytes"] > 0
        assert data["pages"] < ram["normal"]
    else:
        assert data["pages"] == ram["normal"]


@pytest.mark.parametrize("when", WHEN)
@pytest.mark.parametrize("faults", ["userfaultfd", "software"])
def test_qemu_postcopy_to_engine_incoming(qemu, faults, when, engine_cmd, tmp_shm_path,
                                         tmp_path):
    with _ram_files(tmp_shm_path) as (qemu_ram, engine_ram):
        info, data = _migrate_to_engine(qemu, engine_cmd, qemu_ram, engine_ram, tmp_path,
                                        faults=faults, when=when, vcpus=1)
        _check_report(data, info, faults, vcpus=1, multifd=0)
        if when == "mid-pass":
            # A quarter or more went before the switch (QEMU files what a
            # guest that is not running sends under downtime-bytes).
            ram = info["ram"]
            assert ram["transferred"] - ram["postcopy-bytes"] >= SIZE_BYTES // 4


def test_qemu_postcopy_to_engine_without_vcpus(qemu, engine_cmd, tmp_shm_path, tmp_path):
    """No vCPU registers: pages are written in place, no userfaultfd copy."""
    with _ram_files(tmp_shm_path) as (qemu_ram, engine_ram):
        info, data = _migrate_to_engine(qemu, engine_cmd, qemu_ram, engine_ram, tmp_path,
                                        faults="userfaultfd", when="mid-pass", vcpus=0)
        _check_report(data, info, "userfaultfd", vcpus=0, multifd=0)


@pytest.mark.parametrize("faults", ["userfaultfd", "software"])
def test_qemu_multifd_postcopy_to_engine_incoming(qemu, faults, engine_cmd, tmp_shm_path,
                                                  tmp_path):
    """multifd (2 channels) in precopy, then postcopy.

    QEMU 7.2 accepts the two capabilities together, 10.0 refuses them.  It sends postcopy
    pages on the main channel only, but it keeps its multifd channels open
    and keeps syncing them (a SYNC packet on every channel before each RAM
    section's EOS, in postcopy too; its own destination syncs at each EOS
    in ram_load_postcopy), and closes them only at cleanup.  The engine
    destination keeps its workers until then and syncs the open ones.
    """
    with _ram_files(tmp_shm_path) as (qemu_ram, engine_ram):
        if qemu.modern:
            # 10.0 refuses the pair; 10.1 and the engine accept it (the
            # channels end when postcopy starts).
            with pytest.raises(QMPCommandError, match="not yet compatible with multifd"):
                _migrate_to_engine(qemu, engine_cmd, qemu_ram, engine_ram, tmp_path,
                                   faults=faults, when="mid-pass", vcpus=1, multifd=2)
            return
        info, data = _migrate_to_engine(qemu, engine_cmd, qemu_ram, engine_ram, tmp_path,
                                        faults=faults, when="mid-pass", vcpus=1, multifd=2)
        _check_report(data, info, faults, vcpus=1, multifd=2)


#: The engine guest's dirty rate while it runs in postcopy (MiB/s): a few
#: thousand page writes in all, so each page it touches gets few stores.
FAULT_DIRTY_RATE = 4
#: QEMU's max-postcopy-bandwidth (bytes/s): the background pages take a
#: few seconds, so the guest's first accesses find their pages missing.
POSTCOPY_SLOW = 16 << 20


def _spy_discards(mig: DestinationMigration) -> dict:
    """Record the POSTCOPY_RAM_DISCARD ranges the destination applies.

    Returns a dict that fills in as they arrive: ``blocks`` (names seen),
    ``pages`` (bool per page of block 0: discarded) and ``received`` (the
    received bitmap as it was at the first discard, i.e. after precopy).
    """
    seen: dict = {"blocks": set()}
    incoming = mig.postcopy
    apply = incoming.discard
    npages = SIZE_BYTES // PAGE_SIZE

    def discard(block, ranges):
        if "received" not in seen:
            seen["received"] = incoming.received[0].copy()
            seen["pages"] = np.zeros(npages, dtype=bool)
        seen["blocks"].add(block)
        for start, length in ranges:
            seen["pages"][start // PAGE_SIZE:(start + length) // PAGE_SIZE] = True
        apply(block, ranges)
    incoming.discard = discard
    return seen


def _check_guest_writes(qemu_ram: Path, engine_ram: Path, written: np.ndarray) -> None:
    """The engine's RAM is QEMU's plus the guest's stores into ``written`` pages.

    A page written after its contents arrived differs from QEMU's in the few
    8-byte words stored to it, never in none of them (a store lost under a
    page placed later) nor in most (a page used before it arrived).
    """
    words = PAGE_SIZE // 8
    a = np.memmap(qemu_ram, dtype=np.uint64, mode="r").reshape(-1, words)
    b = np.memmap(engine_ram, dtype=np.uint64, mode="r").reshape(-1, words)
    try:
        differing = (a != b).sum(axis=1)
    finally:
        del a, b
    assert written.any(), "the engine guest never ran"
    untouched = np.flatnonzero((differing > 0) & ~written)
    assert untouched.size == 0, (
        f"{untouched.size} pages the guest never wrote differ from QEMU's: "
        f"{untouched[:8].tolist()}")
    assert differing[written].min() >= 1, "a store of the guest was lost"
    assert differing[written].max() <= words // 4, (
        f"a page the guest wrote differs in {differing[written].max()} words")


def _run_destination(mig: DestinationMigration, listener, out: dict) -> threading.Thread:
    def run():
        try:
            channel, _ = accept_channels(listener, 0, timeout=WAIT_S)
            listener.close()
            with channel:
                out["info"] = mig.run(channel)
        except BaseException as exc:     # noqa: BLE001 - reported by the test
            out["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("faults", ["userfaultfd", "software"])
def test_qemu_postcopy_serves_engine_page_requests(qemu, faults, tmp_shm_path):
    """The engine guest runs during postcopy: its vCPU faults on missing pages,
    the engine sends REQ_PAGES_ID / REQ_PAGES and QEMU serves them.

    QEMU is resumed (``cont``) before migrating, so its global state says
    ``running`` and the engine starts its guest at POSTCOPY_RUN; QEMU has
    no vCPU, so nothing changes its RAM.  The engine vCPU (``random``
    workload) stores 8-byte words into random pages and marks them in its
    dirty log, which tells :func:`_check_guest_writes` what may differ.
    The destination runs in process, so the test also sees the DISCARD
    ranges it decoded from QEMU's bytes: exactly the pages it had not
    received when postcopy started.
    """
    with _ram_files(tmp_shm_path) as (qemu_ram, engine_ram):
        guest = mig = listener = None
        out: dict = {}
        try:
            guest = Guest.create([("m0", SIZE_BYTES, str(engine_ram))], vcpus=1,
                                 workload=WorkloadSpec("random", dirty_rate_mbps=FAULT_DIRTY_RATE),
                                 start=False)
            opts = MigrationOptions.default().replace({"postcopy-ram": True,
                                                       "postcopy-blocktime": True}, {})
            mig = DestinationMigration(get_profile("none"), opts, guest=guest, vcpus=1,
                                       postcopy_faults=faults)
            mig.prepare()
            discards = _spy_discards(mig)
            listener = listen(parse_uri("tcp:127.0.0.1:0"))
            thread = _run_destination(mig, listener, out)

            def engine_status():
                if thread.is_alive():
                    return None
                return 0 if "info" in out and out["info"].status == "completed" else 1

            with QemuVM(qemu_ram, SIZE, name="qemu-src", qemu=qemu) as src:
                src.cmd("cont")
                assert src.query_status() == "running"
                _qemu_postcopy_source(src)
                src.set_params({"max-postcopy-bandwidth": POSTCOPY_SLOW})
                src.migrate(listener.uri)
                src.wait_for_status("active", timeout=WAIT_S)
                _start_postcopy(src, "mid-pass")
                info = _wait_completed(src, engine_status,
                                       lambda: f"engine: {out.get('error')!r} {mig.info()}")
                thread.join(WAIT_S)
                assert not thread.is_alive(), f"the engine destination hung in {mig.state.status}"
                assert "error" not in out, out["error"]
                assert "postcopy-active" in _qemu_statuses(src)
            guest.stop()
            q = out["info"].to_qmp()
            assert q["status"] == "completed", q
            states = [s.value for _, s in mig.state.history]
            assert states[-3:] == ["postcopy-device", "postcopy-active", "completed"], states
            # The name ends at its NUL: 10.0 leaves bytes of its own after it.
            assert globalstate_runstate(mig.devices_loaded["globalstate"]) == "running"
            # QEMU discards exactly the pages it had not sent at the switch,
            # which are the ones the engine had not received.
            assert discards.get("blocks") == {"m0"}, discards
            np.testing.assert_array_equal(discards["pages"], discards["received"] == 0)
            assert 0 < discards["pages"].sum() < len(discards["pages"])
            # Every page came once on the main channel, requested or not.
            assert mig.pages + mig.zero_pages == SIZE_BYTES // PAGE_SIZE
            assert mig.zero_pages == info["ram"]["duplicate"]

            # The requests went to QEMU and QEMU took every one of them: the
            # engine asks for one page per message, QEMU counts messages.
            requests = info["ram"]["postcopy-requests"]
            assert requests > 0, info
            assert q["ram"]["postcopy-requests"] == requests, (q, info)
            assert q["x-postcopy-faults"] == faults
            assert q["postcopy-latency"] > 0
            assert len(q["postcopy-vcpu-blocktime"]) == 1

            _check_guest_writes(qemu_ram, engine_ram, guest.dirty_log("m0").log != 0)
        finally:
            if mig is not None:
                mig.close()
            if listener is not None:
                listener.close()
            if guest is not None:
                guest.close()
