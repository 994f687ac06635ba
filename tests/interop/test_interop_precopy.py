"""Precopy between the engine CLI and a real QEMU (7.2 and 10.0), both directions.

The guest is QEMU's ``-M none`` with file-backed RAM (block ``m0``) filled by
:func:`fill_image`; on the engine side the RAM is a file too, so the proof of
a correct migration is the two RAM files being equal byte for byte.  QEMU
runs with ``-S``, so nothing but the migration writes its RAM.  Each case
runs over tcp and unix, plain, with a return path, and with switchover-ack
(which needs one), against each QEMU.

Every process is started inside a ``with`` that kills and reaps it, and every
wait is bounded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.qemu import (ManagedProcess, QemuVM, fill_image, free_tcp_port,
                        image_differences, parse_size)

pytestmark = pytest.mark.interop

SIZE = "16M"
SIZE_BYTES = parse_size(SIZE)
SEED = 7_2_0
#: Bytes/s for QEMU's max-bandwidth: far above what the guest needs, so the
#: test is quick (QEMU's default cap is 128 MiB/s).
FAST = 1_000_000_000
#: Upper bound for any single wait; generous for slow CI, never reached when
#: things work (these migrations take well under a second).
WAIT_S = 120.0

#: capabilities QEMU 7.2 does not have (switchover-ack came in 8.1)
NOT_IN_72 = {"switchover-ack"}

#: transport and capabilities of each case (both sides get the capabilities)
CASES = {
    "tcp": ("tcp", {}),
    "unix": ("unix", {}),
    "return-path": ("tcp", {"return-path": True}),
    "switchover-ack": ("unix", {"return-path": True, "switchover-ack": True}),
}


def _second_path(shm_path: Path, suffix: str) -> Path:
    # Same prefix so the suite's /dev/shm leak check covers it.
    return shm_path.with_name(f"{shm_path.name}-{suffix}")


def _read_json(path: Path, proc: ManagedProcess) -> dict:
    assert path.exists(), f"no --json report written\n{proc.describe()}"
    return json.loads(path.read_text())


def _case(qemu, case: str) -> tuple[str, dict]:
    transport, caps = CASES[case]
    if not qemu.modern and NOT_IN_72.intersection(caps):
        pytest.skip(f"QEMU {qemu.version} has no {', '.join(NOT_IN_72.intersection(caps))}")
    return transport, caps


def _engine_caps(caps: dict) -> list[str]:
    return [arg for name in caps for arg in ("--cap", f"{name}=on")]


@pytest.mark.parametrize("case", list(CASES))
def test_qemu_source_to_engine_incoming(qemu, case, engine_cmd, tmp_shm_path, tmp_path):
    transport, caps = _case(qemu, case)
    qemu_ram = tmp_shm_path
    engine_ram = _second_path(tmp_shm_path, "engine")
    report = tmp_path / "incoming.json"
    fill_image(qemu_ram, SIZE, SEED)
    uri = (f"tcp:127.0.0.1:{free_tcp_port()}" if transport == "tcp"
           else f"unix:{tmp_path}/in.sock")
    try:
        with QemuVM(qemu_ram, SIZE, name="qemu-src", qemu=qemu) as src, \
                ManagedProcess([*engine_cmd, "incoming", uri, "--machine", "none",
                                "--ram", SIZE, "--mem-path", engine_ram, "--ram-id", "m0",
                                *_engine_caps(caps), "--json", report],
                               tmp_path, "engine-incoming") as dst:
            src.set_params({"max-bandwidth": FAST})
            if caps:
                src.set_caps(caps)
            # The engine may not listen yet: retry while the port refuses.
            src.migrate_when_listening(uri, timeout=WAIT_S,
                                       listener_alive=lambda: dst.poll() is None)
            info = src.wait_for_status("completed", timeout=WAIT_S)
            rc = dst.wait(timeout=WAIT_S)
            assert rc == 0, f"engine incoming failed\n{dst.describe()}"
            assert info["ram"]["total"] == SIZE_BYTES
            diff = image_differences(qemu_ram, engine_ram)
            assert diff is None, diff

        data = _read_json(report, dst)
        assert data["migration"]["status"] == "completed"
        devices = data["devices"]
        assert isinstance(devices["timer"], dict)
        # QEMU stores the run state it had when migration started: -S keeps it
        # in prelaunch.
        assert devices["globalstate"]["runstate"] == "prelaunch"
    finally:
        engine_ram.unlink(missing_ok=True)


@pytest.mark.parametrize("case", list(CASES))
def test_engine_source_to_qemu_incoming(qemu, case, engine_cmd, tmp_shm_path, tmp_path):
    transport, caps = _case(qemu, case)
    engine_ram = tmp_shm_path
    qemu_ram = _second_path(tmp_shm_path, "qemu")
    report = tmp_path / "migrate.json"
    fill_image(engine_ram, SIZE, SEED)
    try:
        with QemuVM(qemu_ram, SIZE, incoming="defer", name="qemu-dst", qemu=qemu) as dst:
            if caps:
                dst.set_caps(caps)
            if transport == "tcp":
                # Port 0 and ask QEMU which port it got: no race for a free port.
                dst.migrate_incoming("tcp:127.0.0.1:0")
                uri = f"tcp:127.0.0.1:{dst.incoming_port()}"
            else:
                uri = f"unix:{tmp_path}/in.sock"
                dst.migrate_incoming(uri)
            with ManagedProcess([*engine_cmd, "migrate", "--to", uri,
                                 "--machine", qemu_machine(qemu), "--ram", SIZE,
                                 "--mem-path", engine_ram, "--workload", "none",
                                 *_engine_caps(caps), "--json", report],
                                tmp_path, "engine-migrate") as src:
                rc = src.wait(timeout=WAIT_S)
            dst.completed_from(src, rc, timeout=WAIT_S)
            # The destination keeps the guest paused (-S) after loading.
            assert dst.query_status() in ("prelaunch", "paused")
            diff = image_differences(engine_ram, qemu_ram)
            assert diff is None, diff

        data = _read_json(report, src)
        assert data["migration"]["status"] == "completed"
    finally:
        qemu_ram.unlink(missing_ok=True)


def qemu_machine(qemu) -> str:
    """The engine's machine profile that speaks ``qemu``'s dialect of ``-M none``."""
    return "none" if qemu.modern else "none-7.2"


def test_engine_loads_qemu_stream_file(qemu, engine_cmd, tmp_shm_path, tmp_path):
    stats = fill_image(tmp_shm_path, SIZE, SEED)
    stream = tmp_path / "qemu.stream"
    report = tmp_path / "load.json"
    with QemuVM(tmp_shm_path, SIZE, name="qemu-src", qemu=qemu) as vm:
        vm.set_params({"max-bandwidth": FAST})
        vm.migrate(f"exec:cat > {stream}")
        vm.wait_for_status("completed", timeout=WAIT_S)

    with ManagedProcess([*engine_cmd, "load", stream, "--json", report],
                        tmp_path, "engine-load") as load:
        rc = load.wait(timeout=WAIT_S)
    assert rc == 0, f"engine load failed\n{load.describe()}"

    data = _read_json(report, load)
    assert data["machine"] == "none"
    assert [(b["idstr"], b["used_length"]) for b in data["ram"]["blocks"]] == \
        [("m0", SIZE_BYTES)]
    sections = {s["idstr"]: (s["instance_id"], s["version_id"]) for s in data["sections"]}
    # Instance and version ids as QEMU writes them for machine 'none'.
    assert sections["timer"] == (0, 2)
    assert sections["globalstate"] == (0, 1)
    # A paused source sends each page once; the zero ones as zero records.
    ram = data["ram"]
    assert ram["zero_pages"] == stats.zero_pages
    # 'pages' counts the pages sent with their contents: all the others.
    assert ram["pages"] == stats.pages - stats.zero_pages
