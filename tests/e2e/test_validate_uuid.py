"""validate-uuid and the VM's UUID (QEMU's -uuid), engine to engine.

As in QEMU: with validate-uuid a source that has a UUID sends it in the
configuration section and the destination refuses a different one ("UUID
received is A and local is B"), or only warns when it has none; whatever
the capability, multifd channels carry the source's UUID and the destination
refuses channels whose UUID is not its own.
"""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

ENGINE = [sys.executable, "-m", "engine"]
A = "6a1f1e2c-0b5e-4c39-9a55-2b1d8c0f3e71"
B = "0d4c2b8e-7f3a-4e11-8c6d-5a9b0e2f1c34"
TIMEOUT = 120


def migrate(tmp_path, src_uuid, dst_uuid, *caps):
    """``engine incoming`` with ``dst_uuid`` and ``engine migrate --to`` it with
    ``src_uuid`` (None: not set); (source result, destination result)."""
    sock = tmp_path / "in.sock"
    common = ["--ram", "16M", "--workload", "none", "--vcpus", "1"]
    opts = [a for c in caps for a in ("--cap", c)]
    if "multifd=on" in caps:
        opts += ["--param", "multifd-channels=2"]
    dst = subprocess.Popen([*ENGINE, "incoming", f"unix:{sock}", *common, *opts,
                            *(["--uuid", dst_uuid] if dst_uuid else [])],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # "listening on ..." is its first line
        assert dst.stdout.readline().startswith("listening on"), dst.stderr.read()
        src = subprocess.run([*ENGINE, "migrate", "--to", f"unix:{sock}", *common, *opts,
                              *(["--uuid", src_uuid] if src_uuid else [])],
                             capture_output=True, text=True, timeout=TIMEOUT)
        out, err = dst.communicate(timeout=TIMEOUT)
    finally:
        if dst.poll() is None:
            dst.kill()
            dst.wait()
    return src, (dst.returncode, err)


@pytest.mark.parametrize("multifd", [[], ["multifd=on"]], ids=["1ch", "multifd"])
def test_same_uuid_migrates(tmp_path, multifd):
    src, (rc, err) = migrate(tmp_path, A, A, "validate-uuid=on", "return-path=on", *multifd)
    assert src.returncode == 0, src.stderr
    assert rc == 0, err


def test_different_uuid_is_refused_with_qemus_message(tmp_path):
    src, (rc, err) = migrate(tmp_path, A, B, "validate-uuid=on", "return-path=on")
    assert rc == 1
    assert f"UUID received is {A} and local is {B}" in err, err
    assert src.returncode == 1
    # The configuration section comes before the return path opens, so the
    # destination can only close (QEMU's too).
    assert "the destination gave up" in src.stderr, src.stderr


def test_without_validate_uuid_the_uuids_are_not_compared(tmp_path):
    src, (rc, err) = migrate(tmp_path, A, B)
    assert (src.returncode, rc) == (0, 0), (src.stderr, err)


def test_a_destination_without_uuid_warns(tmp_path):
    src, (rc, err) = migrate(tmp_path, A, None, "validate-uuid=on")
    assert (src.returncode, rc) == (0, 0), (src.stderr, err)
    assert f"warning: UUID is received {A}, but local uuid isn't set" in err, err


def test_multifd_channels_carry_the_uuid(tmp_path):
    """QEMU checks every MultiFDInit's UUID against its own, capability or not."""
    src, (rc, err) = migrate(tmp_path, A, B, "multifd=on")
    assert rc == 1
    assert f"received uuid '{A.replace('-', '')}'" in err, err
    assert src.returncode == 1


def test_bad_uuid_is_a_usage_error():
    r = subprocess.run([*ENGINE, "migrate", "--uuid", "not-a-uuid"], capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 2
    assert "invalid UUID 'not-a-uuid'" in r.stderr


def test_engine_vm_takes_the_uuid(tmp_path):
    """engine vm's --uuid reaches both roles: equal UUIDs migrate, different
    ones are refused by the destination with QEMU's message."""
    from tests.e2e.test_qmp_harness import EngineVM
    guest = ("--machine", "none", "--vcpus", "0", "--workload", "none", "--ram", "16M")
    for dst_uuid, ok in ((A, True), (B, False)):
        with EngineVM(tmp_path, f"src-{ok}", *guest, "--uuid", A) as src, \
                EngineVM(tmp_path, f"dst-{ok}", *guest, "--uuid", dst_uuid,
                         "--incoming", "defer") as dst:
            for vm in (src, dst):
                vm.set_caps(events=True, validate_uuid=True)
            uri = f"unix:{tmp_path}/{ok}.sock"
            dst.cmd("migrate-incoming", {"uri": uri, "exit-on-error": False})
            src.cmd("migrate", {"uri": uri})
            if ok:
                src.wait_status("completed")
                dst.wait_status("completed")
            else:
                dst.wait_event("MIGRATION", lambda e: e["data"]["status"] == "failed")
                info = dst.cmd("query-migrate")
                assert f"UUID received is {A} and local is {B}" in info["error-desc"], info
