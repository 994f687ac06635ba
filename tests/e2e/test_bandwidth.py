"""max-bandwidth limits what goes on the wire, with or without multifd.

A paused guest of random pages (nothing zero, nothing compressible) is
migrated under a cap by ``engine migrate``; downtime-limit 1 ms keeps every
page in the rate-limited iteration (QEMU lifts the cap for the switchover).
The migration then cannot be faster than bytes / cap; and it must not be
much slower either, which would mean bytes charged twice.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

RAM = 12 << 20
CAP = 6 << 20          # bytes/s: about 2 s for the guest

MODES = {
    "single": [],
    "multifd-none": ["--cap", "multifd=on", "--param", "multifd-channels=2"],
    "multifd-zstd": ["--cap", "multifd=on", "--param", "multifd-channels=2",
                     "--param", "multifd-compression=zstd"],
    "multifd-legacy-zero": ["--cap", "multifd=on", "--param", "multifd-channels=4",
                            "--param", "zero-page-detection=legacy"],
}


def migrate(tmp_shm_path, tmp_path, mode: str, downtime_limit: int = 1) -> dict:
    report = tmp_path / "migrate.json"
    r = subprocess.run(
        [sys.executable, "-m", "engine", "migrate", "--machine", "none", "--ram", str(RAM),
         "--mem-path", str(tmp_shm_path), "--workload", "none", *MODES[mode],
         "--param", f"max-bandwidth={CAP}", "--param", f"downtime-limit={downtime_limit}",
         "--json", str(report), "--quiet"],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(report.read_text())["migration"]
    assert info["status"] == "completed"
    return info


def check_rate(info: dict) -> None:
    wire = info["ram"]["transferred"]
    seconds = info["total-time"] / 1000
    expected = wire / CAP
    # The first window may start full and the last is cut short: one window
    # (100 ms) of slack each way, then no more than a third over.
    assert seconds >= expected - 0.2, (seconds, expected)
    assert seconds <= expected * 4 / 3 + 0.2, (seconds, expected)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_max_bandwidth_caps_the_wire_rate(tmp_shm_path, tmp_path, mode):
    np.random.default_rng(7).integers(1, 256, RAM, dtype=np.uint8).tofile(tmp_shm_path)
    info = migrate(tmp_shm_path, tmp_path, mode)
    assert info["ram"]["transferred"] > RAM          # every page went, in full
    check_rate(info)
    if mode != "single":
        assert info["ram"]["multifd-bytes"] > RAM


@pytest.mark.parametrize("mode", ["multifd-none", "multifd-zstd"])
def test_bytes_saved_on_the_wire_are_given_back_to_the_budget(tmp_shm_path, tmp_path,
                                                              mode):
    """A multifd batch is charged in full when handed out; its zero pages
    (found by the workers) and compression do not go on the wire, and the
    budget gets them back: the cap is on wire bytes, not on guest pages."""
    pages = np.random.default_rng(8).integers(1, 256, (RAM // 4096, 4096), dtype=np.uint8)
    pages[::2] = 0
    pages.tofile(tmp_shm_path)
    info = migrate(tmp_shm_path, tmp_path, mode)
    assert info["ram"]["duplicate"] == RAM // 4096 // 2
    assert info["ram"]["transferred"] < RAM * 0.6
    check_rate(info)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_cap_is_lifted_once_the_guest_stops(tmp_shm_path, tmp_path, mode):
    """A downtime limit that the whole guest fits in: after the first window
    measured the bandwidth, the guest stops with nearly every page still to
    send, and those go out uncapped (QEMU checks the rate limit only while
    iterating; a cap in the final pass only stretches the downtime).  Under
    the cap they would take RAM / CAP = 2 s; uncapped, tens of milliseconds.
    (With the cap kept, multifd handed its workers a page or two at a time
    and took 0.8-0.9 s here.)"""
    np.random.default_rng(9).integers(1, 256, RAM, dtype=np.uint8).tofile(tmp_shm_path)
    info = migrate(tmp_shm_path, tmp_path, mode, downtime_limit=600_000)
    ram = info["ram"]
    assert ram["downtime-bytes"] > RAM // 2, info        # most of it after the stop
    assert ram["precopy-bytes"] + ram["downtime-bytes"] <= ram["transferred"]
    capped = ram["downtime-bytes"] / CAP
    assert info["downtime"] / 1000 < capped / 8, (info["downtime"], capped)
