"""Smoke tests of bench/precopy.py, bench/multifd.py and bench/rss.py.

A tiny run of each must complete, check its own migrations and report every
figure in the shape the README describes.  No timing is checked (the host
is shared, and at these sizes fixed costs dominate); QEMU takes part when
it is installed, as it is in CI.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.qemu import qemu_available

BENCH = Path(__file__).resolve().parents[2] / "bench"
QEMU_OK, QEMU_WHY = qemu_available()
QEMU_ARGS = () if QEMU_OK else ("--no-qemu",)


def run_bench(script: str, *args, timeout=600):
    return subprocess.run([sys.executable, str(BENCH / script), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_multifd_matrix_reports_every_cell_and_the_codec_libraries(tmp_path):
    out, png = tmp_path / "multifd.json", tmp_path / "multifd.png"
    r = run_bench("multifd.py", "--size", "16M", "--repeat", "1", "--channels", "1,2",
                  "--codecs", "none,zlib,zstd", "--json", str(out), "--png", str(png),
                  *QEMU_ARGS)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["channels"] == [1, 2] and res["codecs"] == ["none", "zlib", "zstd"]
    cells = {(c["channels"], c["codec"]): c for c in res["summary"]["cells"]}
    assert set(cells) == {(n, c) for n in (1, 2) for c in ("none", "zlib", "zstd")}
    for (n, codec), cell in cells.items():
        eng = cell["engine"]
        assert eng["runs"] == 1 and eng["total_time_ms"] > 0
        assert eng["multifd_bytes"] > 0               # the pages went over multifd
        if codec != "none":
            # Compressed: fewer bytes on the wire than the non-zero half of RAM.
            assert eng["multifd_bytes"] < (16 << 20) // 2
        assert cell["engine_over_socket"] > 0 and cell["engine_over_memcpy"] > 0
        assert cell["floor_ms"] > 0 and cell["engine_over_floor"] > 0
        if QEMU_OK:
            assert cell["qemu"]["total_time_ms"] > 0 and cell["engine_over_qemu"] > 0
            assert f"{n}ch-{codec}" in r.stdout
    assert cells[(2, "none")]["target"] == 0.4
    assert cells[(1, "zstd")]["target"] == cells[(2, "zlib")]["target"] == 0.5
    assert "target" not in cells[(1, "none")]
    # The libraries behind the codecs, measured on the same image.
    libs = res["codec_limits"]
    assert set(libs) == {"zlib", "ISA-L", "zstd"}
    for lib in libs.values():
        assert lib["mbps"] > 0 and 0 < lib["ratio"] < 1
    assert "one core" in r.stdout and "ISA-L" in r.stdout
    # The engine's own page work, per codec and side, behind the floor column
    # (it checked its destination against the image, or the run had failed).
    work = res["summary"]["work_cpu_s_median"]
    assert set(work) == {"none", "zlib", "zstd"}
    for sides in work.values():
        assert sides["source_cpu_s"] > 0 and sides["destination_cpu_s"] > 0
    assert "work floor" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multifd_bench_refuses_a_bad_size():
    r = run_bench("multifd.py", "--size", "12345", "--no-qemu", timeout=60)
    assert r.returncode == 2
    assert "size" in r.stderr


def test_precopy_reports_engine_next_to_the_limits(tmp_path):
    out = tmp_path / "precopy.json"
    r = run_bench("precopy.py", "--size", "16M", "--repeat", "1", "--json", str(out),
                  *QEMU_ARGS)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    med, ratios = res["median"], res["ratios"]
    assert med["engine"]["total_time_ms"] > 0 and med["engine"]["transferred_bytes"] > 0
    assert med["socket_gbps"] > 0 and med["memcpy_gbps"] > 0
    assert ratios["engine_guest_gbps_over_socket"] > 0
    if QEMU_OK:
        assert med["qemu"]["total_time_ms"] > 0
        assert ratios["engine_over_qemu_total_time"] > 0
    else:
        assert "qemu" not in med


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_rss_reports_both_coordinators_and_checks_memory(tmp_path, codec):
    out = tmp_path / "rss.json"
    r = run_bench("rss.py", "--size", "256M", "--codec", codec, "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    run = res["run"]
    assert run["memory_equal"] is True
    assert run["normal_pages"] > 0 and run["zero_pages"] > 0
    for side in ("source", "destination"):
        peak = run[side]
        assert peak["samples"] > 0 and peak["peak_rss_bytes"] > 0
        assert peak["under_limit"] is True
        assert peak["peak"]["VmHWM"] >= peak["peak"]["RssAnon"]
