"""``engine stress`` end to end: real migrations with real faults, judged.

A short run of seed 4 draws one case of each fault kind (the sampler
guarantees it for any six consecutive cases): a destination multifd worker
killed in precopy, the main channel cut in precopy, a postcopy guest with
no fault, the destination process killed in postcopy, a cancel in
pre-switchover, and a corrupted record in postcopy, which both sides must
survive by recovery.  Every verdict must be good, each the one its fault
calls for, and the reports must say so.

``silent-corruption`` flips a byte of page data on the wire, which the
format cannot notice: the run must say a page was corrupted, and fail.
"""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

from engine.stress.matrix import FAULT_KINDS

ENGINE = [sys.executable, "-m", "engine"]
TIMEOUT = 300

#: what seed 4's first six cases must end with, by fault kind
SEED_4 = {
    "worker-killed": "failed cleanly, source intact",
    "channel-dropped": "failed cleanly, source intact",
    "none": "completed, memory verified",
    "destination-killed": "failed as expected (postcopy: state on destination)",
    "cancel": "failed cleanly, source intact",
    "packet-corrupted": "completed, memory verified",
}


def stress(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*ENGINE, "stress", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def test_one_case_of_each_fault_kind(tmp_path):
    junit, report = tmp_path / "j.xml", tmp_path / "s.json"
    r = stress("--seed", "4", "--cases", "6", "--junit", str(junit), "--json", str(report))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(report.read_text())
    assert doc["ok"] is True and doc["seed"] == 4
    results = doc["results"]
    assert sorted(x["case"]["fault"]["kind"] for x in results) == sorted(FAULT_KINDS)
    for x in results:
        kind, obs = x["case"]["fault"]["kind"], x["observation"]
        assert x["verdict"] == SEED_4[kind], x
        assert obs["fault_fired"] is (kind != "none"), x
        assert not obs["leaked_segments"] and not obs["leaked_processes"]
        if x["verdict"] == "completed, memory verified":
            assert True in (obs["memory_equal"], obs["ab_ok"])
    by_kind = {x["case"]["fault"]["kind"]: x for x in results}
    # The corrupted record paused postcopy; the runner recovered it.
    corrupted = by_kind["packet-corrupted"]["observation"]
    assert corrupted["recovered"] and "postcopy-recover" in corrupted["source_history"]
    assert corrupted["ab_ok"] is True
    # The killed destination left the source stopped with the split error.
    split = by_kind["destination-killed"]["observation"]
    assert split["source_running"] is False and "split" in split["source_error"]
    assert by_kind["cancel"]["observation"]["source_status"] == "cancelled"
    # The summary table has a row per case.
    rows = [line for line in r.stdout.splitlines() if line[:2].isdigit()]
    assert [row.split()[0] for row in rows] == ["01", "02", "03", "04", "05", "06"]
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "6" and suite.get("failures") == "0"
    assert len(suite.findall("testcase")) == 6


def test_a_silently_corrupted_page_is_caught_and_fails_the_run(tmp_path):
    junit, report = tmp_path / "j.xml", tmp_path / "s.json"
    r = stress("--seed", "1", "--cases", "1", "--faults", "silent-corruption",
               "--junit", str(junit), "--json", str(report))
    assert r.returncode == 3, r.stdout + r.stderr
    (x,) = json.loads(report.read_text())["results"]
    assert x["verdict"] == "lost or corrupted page" and x["good"] is False
    assert x["observation"]["memory_equal"] is False
    assert x["observation"]["bad_pages"] == 1
    assert "BAD: lost or corrupted page" in r.stdout
    (case,) = ET.parse(junit).getroot().iter("testcase")
    assert case.find("failure").get("type") == "corrupted"


def test_time_limit_stops_starting_cases(tmp_path):
    report = tmp_path / "s.json"
    r = stress("--seed", "2", "--cases", "3", "--faults", "none", "--time-limit", "0.001",
               "--json", str(report))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(report.read_text())
    # The first case always starts; then the budget is spent.
    assert doc["counts"] == {"cases": 3, "run": 1, "good": 1, "bad": 0, "skipped": 2}
    assert [x["verdict"] for x in doc["results"]][1:] == ["skipped (time limit)"] * 2
    assert "2 skipped (time limit)" in r.stdout


def test_list_prints_the_sample_without_running_it():
    first = stress("--seed", "9", "--cases", "12", "--list")
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.splitlines()) == 12
    assert stress("--seed", "9", "--cases", "12", "--list").stdout == first.stdout
    one = stress("--seed", "9", "--cases", "12", "--list", "--only", "7")
    assert one.stdout.splitlines() == [first.stdout.splitlines()[6]]


def test_bad_options_are_refused_before_anything_runs():
    r = stress("--faults", "none,meteor-strike")
    assert r.returncode == 2 and "meteor-strike" in r.stderr
    r = stress("--seed", "1", "--cases", "3", "--only", "9")
    assert r.returncode == 2 and "no case 09" in r.stderr
