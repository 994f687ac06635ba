"""Downtime of a live guest: multifd must stop the guest no longer than one channel.

A guest that keeps dirtying memory while a max-bandwidth cap is in force (the
engine's default 128 MiB/s) switches over with some megabytes still dirty.
After the source stops its vCPUs nothing may slow that final pass: QEMU
checks the rate limit only while iterating.  The engine once kept the cap
through the switchover with multifd, shrinking each hand-out to a page or
two, so a 100 ms downtime on one channel became 2-3 s on two.

The checks compare figures of the same guest on the same host (ratios, not
timings) and look at what the report says about the downtime's bytes.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

ENGINE = [sys.executable, "-m", "engine"]
#: a guest that dirties memory while it migrates, under the default bandwidth cap
LIVE_GUEST = ["--ram", "256M", "--vcpus", "1", "--workload", "random", "--dirty-rate", "100"]
#: multifd downtime may be this many times one channel's (before the fix: 25-30x)
SAME_ORDER = 6


def migrate(tmp_path, name: str, transport: str, extra: list[str]) -> dict:
    report = tmp_path / f"{name}.json"
    uri = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/{name}.sock"
    res = subprocess.run(ENGINE + ["migrate", *LIVE_GUEST, "--uri", uri, "--quiet",
                                   "--json", str(report), *extra],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(report.read_text())
    assert rep["verification"]["memory_equal"] is True, rep["verification"]
    info = rep["migration"]
    assert info["status"] == "completed"
    return info


@pytest.fixture(scope="module")
def single_channel(tmp_path_factory):
    """The same guest's downtime over one channel, per transport (measured once)."""
    tmp = tmp_path_factory.mktemp("single")
    return {t: migrate(tmp, f"single-{t}", t, []) for t in ("unix", "tcp")}


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("channels,codec", [(2, "none"), (4, "none"), (2, "zstd"),
                                            (2, "zlib")])
def test_multifd_downtime_same_order_as_one_channel(single_channel, transport, channels,
                                                    codec, tmp_path):
    one = single_channel[transport]
    info = migrate(tmp_path, "multifd", transport,
                   ["--cap", "multifd=on", "--param", f"multifd-channels={channels}",
                    "--param", f"multifd-compression={codec}"])
    assert info["downtime"] <= SAME_ORDER * max(one["downtime"], 1), (info, one)
    ram = info["ram"]
    # The bytes of the final pass are reported, as for one channel: nearly
    # all of them went over the multifd channels.
    assert ram["dirty-sync-count"] >= 2
    assert ram["precopy-bytes"] > 0
    assert ram["precopy-bytes"] + ram["downtime-bytes"] <= ram["transferred"]
    assert ram["multifd-bytes"] > 0
