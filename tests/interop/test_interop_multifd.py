"""Multifd between the engine CLI and a real QEMU (7.2 and 10.0), both directions.

The guest is QEMU's ``-M none`` with 16 MiB of file-backed RAM (block ``m0``)
filled by :func:`fill_image` (about half zero pages, the rest text-like or
random); on the engine side the RAM is a file too, so the proof of a correct
migration is the two RAM files being equal byte for byte.  The destination's
RAM file starts out full of a non-zero pattern, so a destination that skips a
zero page (or a page it never received) leaves a visible difference.

The two dialects the engine must speak:

* QEMU 7.2 finds zero pages on the main thread and sends them there as ZERO
  records (it has no ``zero-page-detection``); it syncs every channel before
  each RAM section's EOS; its destination takes the first connection as the
  main channel (the engine connects that one first).  An engine source talks
  to it with the ``none-7.2`` machine profile, which also turns
  ``zero-page-detection`` to ``legacy``.
* QEMU 10.0 lists zero pages in the multifd packets (``zero-page-detection=
  multifd``, its default; ``legacy`` and ``none`` are tested too); it flushes
  the channels with a MULTIFD_FLUSH record in setup and once per pass over
  the dirty bitmap, not per section; its destination tells the channels by
  their magic.

Every process is started inside a ``with`` that kills and reaps it, and every
wait is bounded.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.qemu import (PAGE_SIZE, ManagedProcess, Qemu, QemuVM, fill_image,
                        free_tcp_port, image_differences, parse_size)

pytestmark = pytest.mark.interop

SIZE = "16M"
SIZE_BYTES = parse_size(SIZE)
SEED = 7_2_1
#: Bytes/s for QEMU's max-bandwidth: far above what the guest needs (7.2's
#: default cap is 128 MiB/s).
FAST = 1_000_000_000
#: Upper bound for any single wait; never reached when things work.
WAIT_S = 120.0
#: What the destination's RAM holds before the migration: no page of it is
#: zero, and no page of the source image looks like it.
STALE_BYTE = 0xA5

MATRIX = [pytest.param(n, codec, id=f"{n}ch-{codec}")
          for n in (1, 2, 4) for codec in ("none", "zlib", "zstd")]
#: where zero pages are found: in the channels (QEMU >= 9.0's default) or on
#: the main thread (7.2's only way)
ZERO_DETECTION = ("multifd", "legacy")


def _zero_detection(qemu: Qemu, zero_detection: str) -> str:
    if not qemu.modern and zero_detection != "legacy":
        pytest.skip(f"QEMU {qemu.version} has no zero-page-detection (legacy only); "
                    "test_engine_multifd_zero_pages_need_legacy_for_qemu72 shows why")
    return zero_detection


def _second_path(shm_path: Path, suffix: str) -> Path:
    # Same prefix so the suite's /dev/shm leak check covers it.
    return shm_path.with_name(f"{shm_path.name}-{suffix}")


def _fill_stale(path: Path) -> None:
    """Make ``path`` a RAM file of SIZE bytes whose every byte is STALE_BYTE."""
    with open(path, "wb") as f:
        chunk = bytes([STALE_BYTE]) * (1 << 20)
        for _ in range(SIZE_BYTES // len(chunk)):
            f.write(chunk)


def _fill_zero(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(SIZE_BYTES)


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


def _qemu_multifd(vm: QemuVM, channels: int, codec: str,
                  zero_detection: str | None = None) -> None:
    vm.set_caps({"multifd": True})
    params = {"multifd-channels": channels, "multifd-compression": codec,
              "max-bandwidth": FAST}
    if zero_detection is not None:
        params["zero-page-detection"] = zero_detection
    vm.set_params(params)


def _machine(qemu: Qemu) -> str:
    """The engine's machine profile that speaks ``qemu``'s dialect of ``-M none``."""
    return "none" if qemu.modern else "none-7.2"


def _engine_multifd(channels: int, codec: str) -> list[str]:
    return ["--cap", "multifd=on", "--param", f"multifd-channels={channels}",
            "--param", f"multifd-compression={codec}"]


def _read_json(path: Path, proc: ManagedProcess) -> dict:
    assert path.exists(), f"no --json report written\n{proc.describe()}"
    return json.loads(path.read_text())


def _qemu_to_engine(qemu: Qemu, engine_cmd, tmp_shm_path: Path, tmp_path: Path,
                    channels: int, codec: str, zero_detection: str | None = None):
    """Migrate a QEMU guest to ``engine incoming``; the fill statistics and
    the engine's ``--json`` report once both sides completed."""
    qemu_ram = tmp_shm_path
    engine_ram = _second_path(tmp_shm_path, "engine")
    report = tmp_path / "incoming.json"
    stats = fill_image(qemu_ram, SIZE, SEED)
    _fill_stale(engine_ram)
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    try:
        with QemuVM(qemu_ram, SIZE, name="qemu-src", qemu=qemu) as src, \
                ManagedProcess([*engine_cmd, "incoming", uri, "--machine", _machine(qemu),
                                "--ram", SIZE, "--mem-path", engine_ram,
                                *_engine_multifd(channels, codec), "--json", report],
                               tmp_path, "engine-incoming") as dst:
            _qemu_multifd(src, channels, codec, zero_detection)
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
        assert data["devices"]["globalstate"]["runstate"] == "prelaunch"
        return stats, info, data
    finally:
        engine_ram.unlink(missing_ok=True)


@pytest.mark.parametrize("zero_detection", ZERO_DETECTION)
@pytest.mark.parametrize(("channels", "codec"), MATRIX)
def test_qemu_multifd_source_to_engine_incoming(qemu, channels, codec, zero_detection,
                                                engine_cmd, tmp_shm_path, tmp_path):
    zpd = _zero_detection(qemu, zero_detection)
    stats, info, data = _qemu_to_engine(qemu, engine_cmd, tmp_shm_path, tmp_path,
                                        channels, codec, zpd if qemu.modern else None)
    # The zero pages are found once (the guest is paused, -S): with legacy
    # detection QEMU sends them on the main channel, with multifd it lists
    # them in the packets.  Every other page goes on the channels.
    assert info["ram"]["duplicate"] == stats.zero_pages
    assert data["pages"] == 0
    if zpd == "multifd":
        assert (data["zero_pages"], data["multifd_zero_pages"]) == (0, stats.zero_pages)
    else:
        assert (data["zero_pages"], data["multifd_zero_pages"]) == (stats.zero_pages, 0)
    if qemu.modern:
        assert data["multifd_pages"] == info["ram"]["normal"] == stats.pages - stats.zero_pages
    else:
        # 7.2 puts a few pages on the channels twice and counts them once
        # (its multifd-bytes carry them: 2059 pages of data against a
        # 'normal' of 2050 in one run).
        assert data["multifd_pages"] >= info["ram"]["normal"] == stats.pages - stats.zero_pages


def test_qemu10_without_zero_page_detection_to_engine(qemu10, engine_cmd, tmp_shm_path,
                                                      tmp_path):
    stats, info, data = _qemu_to_engine(qemu10, engine_cmd, tmp_shm_path, tmp_path,
                                        2, "none", "none")
    # Not looked for: every page travels in full on the channels.
    assert info["ram"]["duplicate"] == 0
    assert data["pages"] == data["zero_pages"] == 0
    assert (data["multifd_pages"], data["multifd_zero_pages"]) == (stats.pages, 0)


def _engine_to_qemu(qemu: Qemu, engine_cmd, engine_ram: Path, qemu_ram: Path,
                    tmp_path: Path, channels: int, codec: str,
                    zero_detection: str | None = None) -> dict:
    """Migrate the engine guest in ``engine_ram`` to a QEMU destination.

    Returns the engine's ``--json`` report once both sides completed.
    """
    report = tmp_path / "migrate.json"
    zpd = [] if zero_detection is None else \
        ["--param", f"zero-page-detection={zero_detection}"]
    with QemuVM(qemu_ram, SIZE, incoming="defer", name="qemu-dst", qemu=qemu) as dst:
        # Multifd is set up when the destination starts listening.
        _qemu_multifd(dst, channels, codec)
        dst.migrate_incoming("tcp:127.0.0.1:0")
        uri = f"tcp:127.0.0.1:{dst.incoming_port()}"
        with ManagedProcess([*engine_cmd, "migrate", "--to", uri,
                             "--machine", _machine(qemu), "--ram", SIZE,
                             "--mem-path", engine_ram, "--workload", "none",
                             *_engine_multifd(channels, codec), *zpd,
                             "--json", report], tmp_path, "engine-migrate") as src:
            rc = src.wait(timeout=WAIT_S)
        dst.completed_from(src, rc, timeout=WAIT_S)
        # The destination keeps the guest paused (-S) after loading.
        assert dst.query_status() in ("prelaunch", "paused")
    data = _read_json(report, src)
    assert data["migration"]["status"] == "completed"
    return data


def _engine_to_qemu_checked(qemu: Qemu, engine_cmd, tmp_shm_path: Path, tmp_path: Path,
                            channels: int, codec: str, zero_detection: str | None = None):
    engine_ram = tmp_shm_path
    qemu_ram = _second_path(tmp_shm_path, "qemu")
    stats = fill_image(engine_ram, SIZE, SEED)
    if qemu.modern and zero_detection in (None, "multifd"):
        # QEMU >= 9.0 takes a destination page that was never received for
        # zero already (fresh RAM is) and does not clear it when the packets
        # list it as zero: its RAM must start out zero, as it does in real use.
        _fill_zero(qemu_ram)
    else:
        _fill_stale(qemu_ram)
    try:
        data = _engine_to_qemu(qemu, engine_cmd, engine_ram, qemu_ram, tmp_path,
                               channels, codec, zero_detection)
        diff = image_differences(engine_ram, qemu_ram)
        assert diff is None, diff
        ram = data["migration"]["ram"]
        assert ram["multifd-bytes"] > 0
        return stats, ram
    finally:
        qemu_ram.unlink(missing_ok=True)


@pytest.mark.parametrize("zero_detection", ZERO_DETECTION)
@pytest.mark.parametrize(("channels", "codec"), MATRIX)
def test_engine_multifd_source_to_qemu_incoming(qemu, channels, codec, zero_detection,
                                                engine_cmd, tmp_shm_path, tmp_path):
    zpd = _zero_detection(qemu, zero_detection)
    stats, ram = _engine_to_qemu_checked(qemu, engine_cmd, tmp_shm_path, tmp_path,
                                         channels, codec, zpd)
    # Each page once (the engine guest has no workload), the zero ones found
    # on the main thread (legacy) or by the channels (multifd).
    assert ram["duplicate"] == stats.zero_pages
    assert ram["normal"] == stats.pages - stats.zero_pages


def test_engine_without_zero_page_detection_to_qemu10(qemu10, engine_cmd, tmp_shm_path,
                                                      tmp_path):
    stats, ram = _engine_to_qemu_checked(qemu10, engine_cmd, tmp_shm_path, tmp_path,
                                         2, "none", "none")
    assert ram["duplicate"] == 0
    assert ram["normal"] == stats.pages


def test_engine_multifd_zero_pages_need_legacy_for_qemu72(qemu72, engine_cmd,
                                                          tmp_shm_path, tmp_path):
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
        data = _engine_to_qemu(qemu72, engine_cmd, engine_ram, qemu_ram, tmp_path,
                               2, "none", "multifd")
        assert data["migration"]["ram"]["multifd-bytes"] > 0
        zero = _zero_page_mask(engine_ram)
        assert int(zero.sum()) == stats.zero_pages > 0
        differing = _differing_pages(engine_ram, qemu_ram)
        np.testing.assert_array_equal(differing, zero)
    finally:
        qemu_ram.unlink(missing_ok=True)
