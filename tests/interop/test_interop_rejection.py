"""A QEMU destination that rejects the engine's stream, and the engine noticing.

QEMU fails the load and closes (or, with a return path, says SHUT 1 first);
the engine source must fail at once, not at the end of a timeout, say that
the destination gave up, and leave its guest running with its memory intact
(here: exit 1 with the RAM file untouched).  The rejections are real QEMU
refusals: a RAM block of the wrong size (both QEMUs), and QEMU 7.2 refusing
today's multifd stream (the MULTIFD_FLUSH record), for which the error names
the 7.2 machine profile.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.qemu import QemuVM, fill_image

pytestmark = pytest.mark.interop

#: a source that hangs on a rejected stream would wait for multifd
#: acknowledgements for 120 s; this is far below that and far above a
#: failure noticed at once (well under a second here)
NOTICE_S = 30
QEMU_RAM = "16M"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _migrate(qemu, engine_cmd, tmp_shm_path, *, machine: str, ram: str, multifd: bool,
             return_path: bool) -> tuple[subprocess.CompletedProcess, str]:
    engine_ram = tmp_shm_path
    qemu_ram = tmp_shm_path.with_name(tmp_shm_path.name + "-qemu")
    fill_image(engine_ram, ram, 11)
    before = _digest(engine_ram)
    caps = {"multifd": multifd, "return-path": return_path}
    try:
        with QemuVM(qemu_ram, QEMU_RAM, incoming="defer", name="qemu-dst", qemu=qemu) as dst:
            dst.set_caps({k: v for k, v in caps.items() if v})
            if multifd:
                dst.set_params({"multifd-channels": 2})
            dst.migrate_incoming("tcp:127.0.0.1:0")
            uri = f"tcp:127.0.0.1:{dst.incoming_port()}"
            args = [*engine_cmd, "migrate", "--to", uri, "--machine", machine, "--ram", ram,
                    "--mem-path", str(engine_ram), "--workload", "none"]
            args += [a for name, on in caps.items() if on for a in ("--cap", f"{name}=on")]
            if multifd:
                args += ["--param", "multifd-channels=2"]
            res = subprocess.run(args, capture_output=True, text=True, timeout=NOTICE_S)
            log = dst.log_tail()
    finally:
        qemu_ram.unlink(missing_ok=True)
    assert _digest(engine_ram) == before, "the source's memory changed"
    return res, log


@pytest.mark.parametrize("return_path", [False, True], ids=["plain", "return-path"])
@pytest.mark.parametrize("multifd", [False, True], ids=["1ch", "multifd"])
def test_wrong_ram_size_is_noticed_at_once(qemu, multifd, return_path, engine_cmd,
                                           tmp_shm_path):
    machine = "none" if qemu.modern else "none-7.2"
    res, log = _migrate(qemu, engine_cmd, tmp_shm_path, machine=machine, ram="32M",
                        multifd=multifd, return_path=return_path)
    assert "Size mismatch" in log, log
    assert res.returncode == 1, res.stderr
    if return_path:
        # QEMU's SHUT(1) on the return path, or the channel it closed
        assert "SHUT 1" in res.stderr or "the destination gave up" in res.stderr, res.stderr
    else:
        assert "the destination gave up" in res.stderr, res.stderr


def test_qemu72_refusing_todays_multifd_stream_names_the_fix(qemu72, engine_cmd,
                                                             tmp_shm_path):
    res, log = _migrate(qemu72, engine_cmd, tmp_shm_path, machine="none", ram=QEMU_RAM,
                        multifd=True, return_path=False)
    assert "Unknown combination of migration flags: 0x200" in log, log
    assert res.returncode == 1, res.stderr
    assert "--machine none-7.2" in res.stderr, res.stderr
