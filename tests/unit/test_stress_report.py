"""engine stress: the summary table, JUnit XML, JSON and the exit status."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from engine.stress import report
from engine.stress.matrix import sample
from engine.stress.runner import CaseResult
from engine.stress.verdict import Observation, Verdict

CASES = sample(9, 5)


def results(*verdicts: Verdict) -> list[CaseResult]:
    obs = Observation(source_status="failed", notes=("a note <with> & 'markup'",))
    return [CaseResult(c, v, f"why & <{v.name}>", 1.5 + i,
                       None if v is Verdict.SKIPPED else obs)
            for i, (c, v) in enumerate(zip(CASES, verdicts))]


GOOD = (Verdict.COMPLETED, Verdict.FAILED_CLEANLY, Verdict.SPLIT)


def test_exit_code():
    assert report.exit_code(results(*GOOD)) == 0
    assert report.exit_code(results(*GOOD, Verdict.SKIPPED)) == 0
    assert report.exit_code(results(*GOOD, Verdict.LEAK)) == 1
    assert report.exit_code(results(Verdict.HANG)) == 1
    assert report.exit_code(results(Verdict.SOURCE_NOT_INTACT)) == 1
    assert report.exit_code(results(Verdict.UNEXPECTED)) == 1
    # A lost or corrupted page says so in the status, whatever else went wrong.
    assert report.exit_code(results(Verdict.LEAK, Verdict.CORRUPTED)) == 3


def test_junit_xml_is_well_formed_with_one_testcase_per_case():
    res = results(Verdict.COMPLETED, Verdict.CORRUPTED, Verdict.LEAK, Verdict.SPLIT,
                  Verdict.SKIPPED)
    doc = report.junit_xml(res, {"seed": 9, "cases": 5})
    root = ET.fromstring(doc)               # raises on malformed XML
    assert doc.startswith(b"<?xml")
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert suite.get("tests") == "5" and suite.get("failures") == "2"
    assert suite.get("skipped") == "1" and suite.get("errors") == "0"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props == {"seed": "9", "cases": "5"}
    cases = suite.findall("testcase")
    assert len(cases) == 5
    assert [c.get("name").split()[0] for c in cases] == [c.id for c in CASES]
    assert all(float(c.get("time")) >= 0 for c in cases)
    failed = [c for c in cases if c.find("failure") is not None]
    assert [f.find("failure").get("type") for f in failed] == ["corrupted", "leak"]
    assert failed[0].find("failure").get("message").startswith("lost or corrupted page")
    assert "<with>" in failed[0].find("failure").text        # escaped, then read back
    assert cases[4].find("skipped") is not None
    assert cases[0].find("system-out").text.startswith("completed, memory verified")


def test_table_lists_every_case_and_marks_bad_ones():
    res = results(Verdict.COMPLETED, Verdict.HANG, Verdict.SKIPPED)
    text = report.table(res)
    lines = text.splitlines()
    assert lines[0].split() == list(report.HEADER)
    assert len(lines) == 2 + 3 + 1
    assert "BAD: hang" in lines[3]
    assert "skipped" in lines[4] and lines[4].rstrip().endswith("-")
    assert lines[-1] == "2 case(s) run in 4 s: 1 good, 1 bad, 1 skipped (time limit)"
    assert "case " + CASES[1].id in report.failures(res)


def test_json_round_trips():
    res = results(Verdict.COMPLETED, Verdict.CORRUPTED)
    doc = json.loads(json.dumps(report.to_json(res, {"seed": 9})))
    assert doc["seed"] == 9 and doc["ok"] is False
    assert doc["counts"] == {"cases": 2, "run": 2, "good": 1, "bad": 1, "skipped": 0}
    assert [r["verdict"] for r in doc["results"]] == [
        "completed, memory verified", "lost or corrupted page"]
    assert doc["results"][1]["good"] is False
    assert doc["results"][0]["case"]["fault"]["kind"] == CASES[0].fault.kind
