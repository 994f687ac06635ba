"""Smoke test of bench/postcopy.py: a tiny run completes and reports every figure.

No timing is checked (the host is shared); only that each cell migrated,
that faults were taken and measured, and the shape of the JSON report.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "postcopy.py"


def run_bench(*args, timeout=300):
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True,
                          text=True, timeout=timeout)


def test_tiny_run_reports_latency_next_to_the_socket_round_trip(tmp_path):
    out = tmp_path / "postcopy.json"
    # 32 MiB, half of it non-zero, at 16 MiB/s: about a second of background
    # stream for a vCPU touching 1024 random pages a second.
    r = run_bench("--size", "32M", "--repeat", "1", "--background-rate", "16M",
                  "--touch-rate", "4", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["size_bytes"] == 32 << 20 and res["repeat"] == 1
    assert res["background_rate"] == 16 << 20
    assert len(res["host"]["loadavg_at_start"]) == 3 and len(res["loadavg_at_end"]) == 3

    summary = res["summary"]
    rtt = summary["rtt"]
    assert 0 < rtt["median_us"] <= rtt["p99_us"]

    cells = summary["cells"]
    assert [c["preempt"] for c in cells] == [False, True]
    assert {c["faults"] for c in cells} <= {"userfaultfd", "software"}
    for c in cells:
        assert c["runs"] == 1 and "errors" not in c, c
        assert c["requests"] > 0                    # the vCPU did fault on missing pages
        assert c["source_requests"] > 0             # and the source served them
        assert 0 < c["latency_p50_us"] <= c["latency_p99_us"]
        assert c["latency_mean_us"] > 0
        assert c["background_s"] > 0 and c["blocktime_ms"] >= 0
        assert c["p50_over_rtt"] > 0 and c["p99_over_rtt"] > 0
        if c["preempt"]:
            assert isinstance(c["target_met"], bool)
            assert c["target_median_us"] == 200
        else:
            assert "target_met" not in c
    run = res["repeats"][0]["cells"]
    assert set(run) == {c["key"] for c in cells}
    for fig in run.values():
        assert fig["faults_mode"] in ("userfaultfd", "software")
        assert len(fig["vcpu_blocktime_ms"]) == 1
    # The table is printed, with the load and the baseline next to the cells.
    assert "load average" in r.stdout and "round trip" in r.stdout
    assert all(c["key"] in r.stdout for c in cells)


def test_refuses_a_size_that_is_not_whole_pages():
    r = run_bench("--size", "1000")
    assert r.returncode == 2
    assert "multiple of 4096" in r.stderr


def test_refuses_an_uncapped_background():
    # Without a cap the stream may end before anything is measured.
    r = run_bench("--background-rate", "0")
    assert r.returncode == 2
    assert "background rate" in r.stderr
