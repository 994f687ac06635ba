"""Multifd end to end through the command line: worker processes on both sides."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.ram.image import write_mixed_image

ENGINE = [sys.executable, "-m", "engine"]


def migrate(args, tmp_path):
    report = tmp_path / "r.json"
    res = subprocess.run(ENGINE + ["migrate", "--json", str(report)] + args,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(report.read_text())
    assert rep["migration"]["status"] == "completed"
    assert rep["verification"]["memory_equal"] is True, rep["verification"]
    return rep


@pytest.mark.parametrize("codec", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("zero", ["multifd", "legacy", "none"])
def test_multifd_codecs_and_zero_page_modes(codec, zero, tmp_path, tmp_shm_path):
    write_mixed_image(str(tmp_shm_path), 32 << 20, seed=11)
    rep = migrate(["--ram", "32M", "--mem-path", str(tmp_shm_path), "--workload", "none",
                   "--cap", "multifd=on", "--param", "multifd-channels=2",
                   "--param", f"multifd-compression={codec}",
                   "--param", f"zero-page-detection={zero}"], tmp_path)
    ram = rep["migration"]["ram"]
    assert ram["multifd-bytes"] > 0
    assert ram["normal"] + ram["duplicate"] == (32 << 20) // 4096
    if zero == "none":
        assert ram["duplicate"] == 0          # every page went as data
    else:
        assert ram["duplicate"] > 0


def test_multifd_refuses_one_way_transport(tmp_path):
    res = subprocess.run(ENGINE + ["migrate", "--to", f"file:{tmp_path}/x", "--cap",
                                   "multifd=on"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "multifd needs a socket transport" in res.stderr
