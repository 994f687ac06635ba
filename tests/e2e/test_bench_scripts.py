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
                  "--codecs", "none,zlib,zstd", "--uri", "unix", "--mode", "resident,fresh",
                  "--json", str(out), "--png", str(png), *QEMU_ARGS)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["channels"] == [1, 2] and res["codecs"] == ["none", "zlib", "zstd"]
    assert res["modes"] == ["resident", "fresh"] and res["transports"] == ["unix"]
    cells = {(c["mode"], c["channels"], c["codec"]): c for c in res["summary"]["cells"]}
    assert set(cells) == {(m, n, c) for m in ("resident", "fresh") for n in (1, 2)
                          for c in ("none", "zlib", "zstd")}
    for (mode, n, codec), cell in cells.items():
        eng = cell["engine"]
        assert eng["runs"] == 1 and eng["total_time_ms"] > 0
        assert eng["multifd_bytes"] > 0               # the pages went over multifd
        # CPU clocks tick in 10 ms: a 16 MiB migration may read 0.
        assert eng["cpu_s"] >= 0 and eng["cpu_s_per_gib"] >= 0 and eng["downtime_ms"] >= 0
        if codec != "none":
            # Compressed: fewer bytes on the wire than the non-zero half of RAM.
            assert eng["multifd_bytes"] < (16 << 20) // 2
        assert cell["engine_over_socket"] > 0 and cell["engine_over_memcpy"] > 0
        assert cell["floor_ms"] > 0 and cell["engine_over_floor"] > 0
        if QEMU_OK:
            assert cell["qemu"]["total_time_ms"] > 0 and cell["engine_over_qemu"] > 0
            assert cell["qemu"]["cpu_s"] >= 0
            assert f"{mode}-unix-{n}ch-{codec}" in r.stdout
    assert cells[("resident", 2, "none")]["target"] == 0.8
    assert cells[("resident", 2, "none")]["cpu_target"] == 1.0
    assert cells[("resident", 2, "zstd")]["target"] == 0.9
    assert cells[("resident", 1, "zlib")]["target"] == cells[("resident", 2, "zlib")]["target"] \
        == 0.3
    assert "target" not in cells[("resident", 1, "none")]
    assert all(cells[("fresh", n, c)]["target"] == 1.0 for n in (1, 2)
               for c in ("none", "zlib", "zstd"))
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


@pytest.mark.interop
def test_the_baseline_qemu_is_chosen_and_named(qemu, tmp_path):
    """--qemu takes a binary's path (an unpacked tree runs with -L its data)
    or a version label; the report names the QEMU it used."""
    for choice in (qemu.binary, qemu.version.rsplit(".", 1)[0]):
        out = tmp_path / "precopy.json"
        r = run_bench("precopy.py", "--size", "16M", "--repeat", "1", "--uri", "unix",
                      "--qemu", choice, "--json", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        res = json.loads(out.read_text())
        assert f"version {qemu.version}" in res["qemu_version"]
        assert res["qemu_binary"] == qemu.binary
        assert f"baseline QEMU emulator version {qemu.version}" in r.stdout
        [cell] = res["summary"]["cells"]
        assert cell["qemu"]["total_time_ms"] > 0


def test_multifd_bench_refuses_a_bad_size():
    r = run_bench("multifd.py", "--size", "12345", "--no-qemu", timeout=60)
    assert r.returncode == 2
    assert "size" in r.stderr


def test_precopy_reports_both_modes_and_transports_next_to_the_limits(tmp_path):
    out = tmp_path / "precopy.json"
    r = run_bench("precopy.py", "--size", "16M", "--repeat", "1", "--mode", "resident,fresh",
                  "--json", str(out), *QEMU_ARGS)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    s = res["summary"]
    cells = {c["key"]: c for c in s["cells"]}
    assert set(cells) == {f"{m}-{t}" for m in ("resident", "fresh") for t in ("unix", "tcp")}
    for key, cell in cells.items():
        eng = cell["engine"]
        assert eng["total_time_ms"] > 0 and eng["transferred_bytes"] > 0
        assert eng["cpu_s"] >= 0 and eng["downtime_ms"] >= 0    # CPU ticks: 10 ms
        assert cell["engine_over_socket"] > 0 and cell["target"] == 1.0
        assert ("cpu_target" in cell) == key.startswith("resident")
        if QEMU_OK:
            assert cell["qemu"]["total_time_ms"] > 0 and cell["engine_over_qemu"] > 0
            assert cell["qemu"]["cpu_s"] >= 0
        else:
            assert "qemu" not in cell
    assert s["memcpy_gbps"] > 0 and set(s["socket_gbps"]) == {"unix", "tcp"}
    # The command line around a migration: start-up and teardown.
    st = s["startup"]
    assert st["migrate_wall_s"] > st["migrate_total_time_s"] > 0
    assert st["incoming_listen_s"] > 0 and set(st["met"]) == {"migrate_overhead_s",
                                                               "incoming_listen_s"}
    assert "start-up:" in r.stdout


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


def test_population_model_reports_every_case(tmp_path):
    out = tmp_path / "population.json"
    r = run_bench("population.py", "--size", "32M", "--repeat", "1", "--settle", "0",
                  "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    med = json.loads(out.read_text())["median_us_per_page"]
    assert set(med) == {"resident_fault_us", "resident_populate_us", "resident_pwrite_us",
                        "fresh_fault_now_us", "fresh_populate_now_us",
                        "fresh_fault_settled_us", "fresh_populate_settled_us"}
    assert all(v > 0 for v in med.values())
    assert "us per 4 KiB page" in r.stdout
