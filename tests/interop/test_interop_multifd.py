"""Multifd between the engine CLI and a real QEMU 7.2, both directions.

The guest is QEMU's ``-M none`` with 64 MiB of file-backed RAM (block ``m0``)
filled by :func:`fill_image` (about half zero pages, the rest text-like or
random); on the engine side the RAM is a file too, so the proof of a correct
migration is the two RAM files being equal byte for byte.  The destination's
RAM file starts out full of a non-zero pattern, so a destination that skips a
zero page (or a page it never received) leaves a visible difference.

What QEMU 7.2 does, and the engine must match:

* every non-zero page travels on a multifd channel, zero pages travel on the
  main channel as ZERO records (7.2 has no multifd zero-page detection);
* before each RAM section's EOS every channel carries a SYNC packet, and the
  destination syncs its channels when it reads that EOS;
* MultiFDInit carries the VM's UUID, all zeros for both;
* a 7.2 destination does not peek at a connection's magic: the first one it
  accepts is the main channel, so a source must connect that one first (the
  engine connects it before its workers open theirs).

An engine source talking to 7.2 therefore needs
``zero-page-detection=legacy``; :func:`test_engine_multifd_zero_pages_need_legacy_for_qemu72`
shows what goes wrong without it.

Every process is started inside a ``with`` that kills and reaps it, and every
wait is bounded.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.qemu import (PAGE_SIZE, ManagedProcess, QemuVM, fill_image, free_tcp_port,
                        image_differences, parse_size, qemu_available)

_OK, _WHY = qemu_available()
pytestmark = [pytest.mark.interop, pytest.mark.skipif(not _OK, reason=_WHY)]

SIZE = "64M"
SIZE_BYTES = parse_size(SIZE)
SEED = 7_2_1
#: Bytes/s for QEMU's max-bandwidth: far above what 64 MiB needs (7.2's
#: default cap is 128 MiB/s).
FAST = 1_000_000_000
#: Upper bound for any single wait; never reached when things work.
WAIT_S = 120.0
#: What the destination's RAM holds before the migration: no page of it is
#: zero, and no page of the source image looks like it.
STALE_BYTE = 0xA5

MATRIX = [pytest.param(n, codec, id=f"{n}ch-{codec}")
          for n in (2, 4) for codec in ("none", "zlib", "zstd")]


def _second_path(shm_path: Path, suffix: str) -> Path:
    # Same prefix so the suite's /dev/shm leak check covers it.
    return shm_path.with_name(f"{shm_path.name}-{suffix}")


def _fill_stale(path: Path) -> None:
    """Make ``path`` a RAM file of SIZE bytes whose every byte is STALE_BYTE."""
    with open(path, "wb") as f:
        chunk = bytes([STALE_BYTE]) * (1 << 20)
        for _ in range(SIZE_BYTES // len(chunk)):
            f.write(chunk)


def _zero_page_mask(path: Path) -> np.ndarray:
    pages = np.memmap(path, dtype=np.uint64, mode="r").reshape(-1, PAGE_SIZE // 8)
    try:
        return ~pages.any(axis=1)
    finally:
        del pages


def _differing_pages(a: Path, b: Path) -> np.ndarray:
    ma = np.memmap(a, dtype=np.uint64, mode="r").reshape(-1, PAGE_SIZE // 8)
    mb = np.memmap(b, dtype=np.uint64, mode="r").reshape(-1, PAGE_SIZE // 8)
    try:
        return (ma != mb).any(axis=1)
    finally:
        del ma, mb


def _qemu_multifd(vm: QemuVM, channels: int, codec: str) -> None:
    vm.set_caps({"multifd": True})
    vm.set_params({"multifd-channels": channels, "multifd-compression": codec,
                   "max-bandwidth": FAST})


def _engine_multifd(channels: int, codec: str) -> list[str]:
    return ["--cap", "multifd=on", "--param", f"multifd-channels={channels}",
            "--param", f"multifd-compression={codec}"]


def _read_json(path: Path, proc: ManagedProcess) -> dict:
    assert path.exists(), f"no --json report written\n{proc.describe()}"
    return json.loads(path.read_text())


@pytest.mark.parametrize(("channels", "codec"), MATRIX)
def test_qemu_multifd_source_to_engine_incoming(channels, codec, engine_cmd,
                                                tmp_shm_path, tmp_path):
    qemu_ram = tmp_shm_path
    engine_ram = _second_path(tmp_shm_path, "engine")
    report = tmp_path / "incoming.json"
    stats = fill_image(qemu_ram, SIZE, SEED)
    _fill_stale(engine_ram)
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    try:
        with QemuVM(qemu_ram, SIZE, name="qemu-src") as src, \
                ManagedProcess([*engine_cmd, "incoming", uri, "--machine", "none",
                                "--ram", SIZE, "--mem-path", engine_ram,
                                *_engine_multifd(channels, codec), "--json", report],
                               tmp_path, "engine-incoming") as dst:
            _qemu_multifd(src, channels, codec)
            # The engine may not listen yet: retry while the port refuses.
            src.migrate_when_listening(uri, timeout=WAIT_S,
                                       listener_alive=lambda: dst.poll() is None)
            info = src.wait_for_status("completed", timeout=WAIT_S)
            rc = dst.wait(timeout=WAIT_S)
            assert rc == 0, f"engine incoming failed\n{dst.describe()}"
            diff = image_differences(qemu_ram, engine_ram)
            assert diff is None, diff
            assert info["ram"]["total"] == SIZE_BYTES
            assert info["ram"]["multifd-bytes"] > 0

        data = _read_json(report, dst)
        assert data["migration"]["status"] == "completed"
        # 7.2 sends every page once (the guest is paused): the zero ones on
        # the main channel, all the others on the multifd channels.
        assert data["zero_pages"] == stats.zero_pages
        assert data["pages"] == 0
        assert data["devices"]["globalstate"]["runstate"] == "prelaunch"
    finally:
        engine_ram.unlink(missing_ok=True)


def _engine_to_qemu(engine_cmd, engine_ram: Path, qemu_ram: Path, tmp_path: Path,
                    channels: int, codec: str, zero_detection: str) -> dict:
    """Migrate the engine guest in ``engine_ram`` to a QEMU 7.2 destination.

    Returns the engine's ``--json`` report once both sides completed.
    """
    report = tmp_path / "migrate.json"
    with QemuVM(qemu_ram, SIZE, incoming="defer", name="qemu-dst") as dst:
        # Multifd is set up when the destination starts listening.
        _qemu_multifd(dst, channels, codec)
        dst.migrate_incoming("tcp:127.0.0.1:0")
        uri = f"tcp:127.0.0.1:{dst.incoming_port()}"
        with ManagedProcess([*engine_cmd, "migrate", "--to", uri, "--machine", "none",
                             "--ram", SIZE, "--mem-path", engine_ram, "--workload", "none",
                             *_engine_multifd(channels, codec),
                             "--param", f"zero-page-detection={zero_detection}",
                             "--json", report], tmp_path, "engine-migrate") as src:
            rc = src.wait(timeout=WAIT_S)
        assert rc == 0, (f"engine migrate failed\n{src.describe()}\n"
                         f"QEMU query-migrate: {dst.query_migrate()}\n"
                         f"QEMU log: {dst.log_tail()}")
        dst.wait_for_status("completed", timeout=WAIT_S)
        # The destination keeps the guest paused (-S) after loading.
        assert dst.query_status() in ("prelaunch", "paused")
    data = _read_json(report, src)
    assert data["migration"]["status"] == "completed"
    return data


@pytest.mark.parametrize(("channels", "codec"), MATRIX)
def test_engine_multifd_source_to_qemu_incoming(channels, codec, engine_cmd,
                                                tmp_shm_path, tmp_path):
    engine_ram = tmp_shm_path
    qemu_ram = _second_path(tmp_shm_path, "qemu")
    stats = fill_image(engine_ram, SIZE, SEED)
    _fill_stale(qemu_ram)
    try:
        data = _engine_to_qemu(engine_cmd, engine_ram, qemu_ram, tmp_path,
                               channels, codec, "legacy")
        diff = image_differences(engine_ram, qemu_ram)
        assert diff is None, diff
        ram = data["migration"]["ram"]
        assert ram["multifd-bytes"] > 0
        # legacy: the zero pages were found on the main thread, the rest went
        # to the channels, each page once.
        assert ram["duplicate"] == stats.zero_pages
        assert ram["normal"] == stats.pages - stats.zero_pages
    finally:
        qemu_ram.unlink(missing_ok=True)


def test_engine_multifd_zero_pages_need_legacy_for_qemu72(engine_cmd, tmp_shm_path,
                                                          tmp_path):
    """With ``zero-page-detection=multifd`` a 7.2 destination drops the zero pages.

    The engine lists them in the packets' zero-page words, which 7.2 reads as
    reserved: the migration completes on both sides, but exactly the source's
    zero pages keep the destination's old contents.  This is why an engine
    source must use ``legacy`` against QEMU before 9.0.
    """
    engine_ram = tmp_shm_path
    qemu_ram = _second_path(tmp_shm_path, "qemu")
    stats = fill_image(engine_ram, SIZE, SEED)
    _fill_stale(qemu_ram)
    try:
        data = _engine_to_qemu(engine_cmd, engine_ram, qemu_ram, tmp_path,
                               2, "none", "multifd")
        assert data["migration"]["ram"]["multifd-bytes"] > 0
        zero = _zero_page_mask(engine_ram)
        assert int(zero.sum()) == stats.zero_pages > 0
        differing = _differing_pages(engine_ram, qemu_ram)
        np.testing.assert_array_equal(differing, zero)
    finally:
        qemu_ram.unlink(missing_ok=True)
