"""validate-uuid against QEMU (7.2 and 10.0), both directions.

QEMU runs with ``-uuid``; the engine with ``--uuid``.  Equal UUIDs migrate
(with multifd too: every MultiFDInit carries the source's UUID and the
destination compares it with its own); different ones are refused by the
destination with QEMU's message, whichever side the destination is.
"""
from __future__ import annotations

import subprocess

import pytest

from tests.qemu import (ManagedProcess, QemuMigrationFailed, QemuVM, fill_image,
                        free_tcp_port, image_differences)

pytestmark = pytest.mark.interop

SIZE = "16M"
A = "6a1f1e2c-0b5e-4c39-9a55-2b1d8c0f3e71"
B = "0d4c2b8e-7f3a-4e11-8c6d-5a9b0e2f1c34"
WAIT_S = 60.0
CASES = [pytest.param(A, False, id="same"), pytest.param(A, True, id="same-multifd"),
         pytest.param(B, False, id="different")]


def _caps(multifd: bool) -> dict:
    # return-path: the source waits for the destination's verdict
    caps = {"validate-uuid": True, "return-path": True}
    if multifd:
        caps["multifd"] = True
    return caps


def _engine_args(qemu, uuid: str, multifd: bool) -> list[str]:
    args = ["--machine", "none" if qemu.modern else "none-7.2", "--ram", SIZE,
            "--uuid", uuid]
    for cap in _caps(multifd):
        args += ["--cap", f"{cap}=on"]
    if multifd:
        args += ["--param", "multifd-channels=2"]
    return args


@pytest.mark.parametrize(("engine_uuid", "multifd"), CASES)
def test_qemu_source_to_engine(qemu, engine_uuid, multifd, engine_cmd, tmp_shm_path,
                               tmp_path):
    qemu_ram = tmp_shm_path
    engine_ram = tmp_shm_path.with_name(tmp_shm_path.name + "-engine")
    fill_image(qemu_ram, SIZE, 14)
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    try:
        with QemuVM(qemu_ram, SIZE, name="qemu-src", qemu=qemu,
                    extra_args=["-uuid", A]) as src, \
                ManagedProcess([*engine_cmd, "incoming", uri, "--mem-path", engine_ram,
                                *_engine_args(qemu, engine_uuid, multifd)],
                               tmp_path, "engine-incoming") as dst:
            src.set_caps(_caps(multifd))
            if multifd:
                src.set_params({"multifd-channels": 2})
            if engine_uuid == A:
                src.migrate_when_listening(uri, timeout=WAIT_S,
                                           listener_alive=lambda: dst.poll() is None)
                src.wait_for_status("completed", timeout=WAIT_S)
                assert dst.wait(timeout=WAIT_S) == 0, dst.describe()
                assert image_differences(qemu_ram, engine_ram) is None
            else:
                try:
                    src.migrate_when_listening(uri, timeout=WAIT_S,
                                               listener_alive=lambda: dst.poll() is None)
                    src.wait_for_status("completed", timeout=WAIT_S)
                except QemuMigrationFailed:
                    pass        # QEMU may see the channel close first
                assert dst.wait(timeout=WAIT_S) == 1
                assert f"UUID received is {A} and local is {B}" in dst.describe()
    finally:
        engine_ram.unlink(missing_ok=True)


@pytest.mark.parametrize(("engine_uuid", "multifd"), CASES)
def test_engine_source_to_qemu(qemu, engine_uuid, multifd, engine_cmd, tmp_shm_path,
                               tmp_path):
    engine_ram = tmp_shm_path
    qemu_ram = tmp_shm_path.with_name(tmp_shm_path.name + "-qemu")
    fill_image(engine_ram, SIZE, 15)
    try:
        with QemuVM(qemu_ram, SIZE, incoming="defer", name="qemu-dst", qemu=qemu,
                    extra_args=["-uuid", A]) as dst:
            dst.set_caps(_caps(multifd))
            if multifd:
                dst.set_params({"multifd-channels": 2})
            dst.migrate_incoming("tcp:127.0.0.1:0")
            uri = f"tcp:127.0.0.1:{dst.incoming_port()}"
            res = subprocess.run([*engine_cmd, "migrate", "--to", uri, "--mem-path",
                                  str(engine_ram), "--workload", "none",
                                  *_engine_args(qemu, engine_uuid, multifd)],
                                 capture_output=True, text=True, timeout=WAIT_S)
            if engine_uuid == A:
                assert res.returncode == 0, res.stderr
                dst.wait_for_status("completed", timeout=WAIT_S)
                assert image_differences(engine_ram, qemu_ram) is None
            else:
                # QEMU fails the load and exits (exit-on-error)
                assert dst.proc.wait(timeout=WAIT_S) == 1
                assert f"UUID received is {B} and local is {A}" in dst.log_tail()
                assert res.returncode == 1
                assert "the destination gave up" in res.stderr, res.stderr
    finally:
        qemu_ram.unlink(missing_ok=True)
