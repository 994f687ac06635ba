"""A guest dirtying memory faster than max-bandwidth, as QEMU's migration-test
makes one for auto-converge: it completes with auto-converge and not without
(a time-out then cancels it); the vCPUs really slow down (their own count of
pages written); the time-out's actions, and the stall warning.

The guest: 64 MiB, one vCPU writing random pages at 200 MiB/s; the link:
64 MiB/s, so a pass takes about a second and re-dirties most of RAM.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

ENGINE = [sys.executable, "-m", "engine"]
TIMEOUT = 180
MIB = 1 << 20

GUEST = ["--ram", "64M", "--vcpus", "1", "--workload", "random", "--dirty-rate", "200"]
LINK = ["--param", f"max-bandwidth={64 * MIB}"]
#: steps of 50 %, 75 %, 99 %: converges within about six periods of a second
THROTTLE = ["--cap", "auto-converge=on", "--param", "cpu-throttle-initial=50",
            "--param", "cpu-throttle-increment=25"]


def migrate(tmp_path, *extra):
    report = tmp_path / "r.json"
    res = subprocess.run([*ENGINE, "migrate", *GUEST, *LINK, "--json", str(report), *extra],
                         capture_output=True, text=True, timeout=TIMEOUT)
    rep = json.loads(report.read_text()) if report.exists() else None
    return res, rep


def test_no_convergence_without_auto_converge_then_cancelled(tmp_path):
    res, rep = migrate(tmp_path, "--timeout", "8", "--timeout-action", "cancel")
    assert res.returncode == 1, res.stdout + res.stderr
    assert rep["migration"]["status"] == "cancelled"
    conv = rep["convergence"]
    assert conv["timed-out"] is True and conv["timeout-action"] == "cancel"
    assert conv["cpu-throttle-percentage"] == 0
    # Several passes went by without the remaining RAM falling: the stall warning.
    assert conv["stalled"] is True
    assert any(w.startswith("stalled: remaining RAM has not fallen for 5 passes")
               for w in rep["warnings"]), rep["warnings"]
    assert "timed out after 8 s in active: cancel" in rep["warnings"]
    assert "warning: stalled" in res.stdout
    # Nothing slowed the guest: its own rate during the migration is its rate before.
    assert conv["guest"]["slowdown"] > 0.7, conv["guest"]


def test_auto_converge_completes_and_slows_the_vcpus(tmp_path):
    res, rep = migrate(tmp_path, *THROTTLE, "--timeout", "60", "--timeout-action", "cancel")
    assert res.returncode == 0, res.stdout + res.stderr
    assert rep["migration"]["status"] == "completed"
    assert rep["verification"]["memory_equal"] is True
    conv = rep["convergence"]
    assert conv["timed-out"] is False
    assert 50 <= conv["cpu-throttle-percentage"] <= 99
    # The vCPU's own count of pages written: its last second before the
    # switchover ran at a fraction of its rate before the migration.
    guest = conv["guest"]
    assert guest["pages-per-second-before"] > 0
    assert guest["slowdown-last-second"] < 0.6, guest
    assert guest["ms-per-gib-last-second"] > guest["ms-per-gib-before"]
    # QEMU reports the throttle only while it is on: not after completion.
    assert "cpu-throttle-percentage" not in rep["migration"]


def test_timeout_suspend_stops_the_guest_and_completes(tmp_path):
    res, rep = migrate(tmp_path, "--timeout", "3")       # suspend is the default
    assert res.returncode == 0, res.stdout + res.stderr
    assert rep["migration"]["status"] == "completed"
    assert rep["verification"]["memory_equal"] is True
    conv = rep["convergence"]
    assert conv["timed-out"] is True and conv["timeout-action"] == "suspend"
    assert 3 <= conv["timed-out-after"] < 4
    assert rep["migration"]["total-time"] < 8000


def test_timeout_postcopy_switches(tmp_path):
    res, rep = migrate(tmp_path, "--cap", "postcopy-ram=on", "--timeout", "3",
                       "--timeout-action", "postcopy")
    assert res.returncode == 0, res.stdout + res.stderr
    assert rep["migration"]["status"] == "completed"
    assert rep["migration"]["ram"]["postcopy-bytes"] > 0
    assert rep["convergence"]["timed-out"] is True


def _pages_per_second(guest, seconds: float = 1.0) -> float:
    from engine.ram.workloads import REG_PAGES
    t0, p0 = time.monotonic(), int(guest.registers[:, REG_PAGES].sum())
    time.sleep(seconds)
    return (int(guest.registers[:, REG_PAGES].sum()) - p0) / (time.monotonic() - t0)


def test_throttle_lifted_after_cancel():
    """In-process: a throttled guest runs at full speed again once the
    migration is cancelled (its vCPU's own count of pages written)."""
    from engine.machine import get_profile
    from engine.migration.source import SourceMigration
    from engine.options import MigrationOptions
    from engine.ram.guest import Guest
    from engine.ram.workloads import WorkloadSpec
    from engine.transport import connect

    options = MigrationOptions.default().with_capabilities({"auto-converge": True}) \
        .with_parameters({"max-bandwidth": 32 * MIB, "cpu-throttle-initial": 80,
                          "cpu-throttle-increment": 10})
    with Guest.create([("m0", 64 * MIB, None)], vcpus=1,
                      workload=WorkloadSpec("random", dirty_rate_mbps=200)) as guest:
        before = _pages_per_second(guest)
        mig = SourceMigration(guest, get_profile("engine"), options)
        uri = "exec:cat > /dev/null"
        with connect(uri) as channel:
            runner = threading.Thread(target=mig.run, args=(channel, uri))
            runner.start()
            try:
                deadline = time.monotonic() + 60
                while mig.autoconverge.percentage < 80:
                    assert time.monotonic() < deadline, mig.info().to_qmp()
                    time.sleep(0.1)
                throttled = _pages_per_second(guest)
            finally:
                mig.cancel()
                runner.join(TIMEOUT)
        assert mig.state.status.value == "cancelled"
        assert mig.autoconverge.percentage == 0
        after = _pages_per_second(guest)
    assert throttled < 0.4 * before, (before, throttled, after)
    assert after > 0.7 * before, (before, throttled, after)


@pytest.mark.parametrize("args,needle", [
    (["--timeout", "5", "--timeout-action", "postcopy"], "needs --cap postcopy-ram=on"),
    (["--timeout-action", "cancel"], "needs --timeout SECONDS"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--timeout", "5", "--timeout-action", "pause"], "--timeout-action"),
])
def test_bad_timeouts_refused_before_anything_starts(tmp_path, args, needle):
    res = subprocess.run([*ENGINE, "migrate", "--ram", "16M", "--workload", "none", *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert needle in res.stderr


def test_stress_convergence_cases(tmp_path):
    out = tmp_path / "stress.json"
    res = subprocess.run([*ENGINE, "stress", "--converge", "auto-converge,postcopy",
                          "--json", str(out), "--quiet"],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {r["case"]["strategy"]: r for r in json.loads(out.read_text())["convergence"]}
    assert set(rows) == {"auto-converge", "postcopy"}
    for r in rows.values():
        assert r["verdict"] == "converged" and r["expected"] is True, r
    assert rows["auto-converge"]["observation"]["throttle"] >= 50
    assert "auto-converge    converged" in res.stdout


def test_bench_converge_reports_a_strategy_that_does_not_converge(tmp_path):
    from pathlib import Path
    bench = Path(__file__).resolve().parents[2] / "bench" / "converge.py"
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(bench), "--strategies", "none", "--bound", "4",
                          "--json", str(out)], capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout + res.stderr
    row = json.loads(out.read_text())["rows"][0]
    assert row["strategy"] == "none" and row["converged"] == 0 and row["expected"]
    assert row["time_s"] == 4 and row["slowdown"] is not None
    assert row["ms_per_gib_before"] > 0


def test_plot_draws_the_throttle(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread
    import numpy as np
    brown = (0.549, 0.337, 0.294)       # matplotlib's tab:brown, the throttle's line

    def brown_pixels(path):
        img = imread(str(path))[..., :3]
        return int(np.count_nonzero(np.all(np.abs(img - np.array(brown)) < 0.03, axis=-1)))

    with_ac, without = tmp_path / "ac.png", tmp_path / "none.png"
    res, _ = migrate(tmp_path, *THROTTLE, "--plot", str(with_ac))
    assert res.returncode == 0, res.stdout + res.stderr
    res, _ = migrate(tmp_path, "--timeout", "2", "--plot", str(without))
    assert res.returncode == 0, res.stdout + res.stderr
    assert brown_pixels(with_ac) > 100
    assert brown_pixels(without) == 0
