"""A stress run's results for people (a table) and for CI (JUnit XML, JSON).

JUnit XML follows the common schema Jenkins, GitLab and GitHub's test
reporters read: one ``<testsuite>`` with one ``<testcase>`` per case; a bad
verdict is a ``<failure>`` (message: the verdict, text: why), a case the
time limit kept from starting is ``<skipped>``.
"""
from __future__ import annotations

import socket
import time
import xml.etree.ElementTree as ET
from typing import Sequence

from engine.stress.runner import CaseResult
from engine.stress.verdict import Verdict

HEADER = ("case", "transport", "channels", "codec", "mode", "fault", "verdict", "seconds")

#: exit codes, as engine.cli's: all good / a bad verdict / a lost or corrupted page
EXIT_OK, EXIT_FAILED, EXIT_MISMATCH = 0, 1, 3


def _row(r: CaseResult) -> tuple[str, ...]:
    c = r.case
    return (c.id, c.transport, c.channels_label, c.codec, c.mode, c.fault.label,
            r.verdict.value if r.good or r.verdict is Verdict.SKIPPED
            else f"BAD: {r.verdict.value}",
            "-" if r.verdict is Verdict.SKIPPED else f"{r.seconds:.1f}")


def table(results: Sequence[CaseResult]) -> str:
    """The summary table, one line per case, then the tally."""
    rows = [HEADER] + [_row(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n" + tally(results)


def tally(results: Sequence[CaseResult]) -> str:
    ran = [r for r in results if r.verdict is not Verdict.SKIPPED]
    bad = [r for r in ran if not r.good]
    skipped = len(results) - len(ran)
    seconds = sum(r.seconds for r in ran)
    text = f"{len(ran)} case(s) run in {seconds:.0f} s: {len(ran) - len(bad)} good, " \
        f"{len(bad)} bad"
    if skipped:
        text += f", {skipped} skipped (time limit)"
    return text


def failures(results: Sequence[CaseResult]) -> str:
    """One paragraph per bad verdict: what, and why."""
    out = []
    for r in results:
        if r.good or r.verdict is Verdict.SKIPPED:
            continue
        out.append(f"case {r.case.id} ({r.case.fault.label}, {r.case.mode}): "
                   f"{r.verdict.value}: {r.detail}")
        if r.observation is not None:
            out += [f"    {n}" for n in r.observation.notes]
    return "\n".join(out)


def exit_code(results: Sequence[CaseResult]) -> int:
    """0 only if every verdict is good; 3 if a page was lost or corrupted."""
    verdicts = {r.verdict for r in results}
    if Verdict.CORRUPTED in verdicts:
        return EXIT_MISMATCH
    if any(not r.good and r.verdict is not Verdict.SKIPPED for r in results):
        return EXIT_FAILED
    return EXIT_OK


def junit_xml(results: Sequence[CaseResult], properties: dict | None = None,
              name: str = "engine stress") -> bytes:
    """The JUnit XML document (UTF-8 bytes)."""
    ran = [r for r in results if r.verdict is not Verdict.SKIPPED]
    suite = ET.Element("testsuite", {
        "name": name, "tests": str(len(results)),
        "failures": str(sum(1 for r in ran if not r.good)), "errors": "0",
        "skipped": str(len(results) - len(ran)),
        "time": f"{sum(r.seconds for r in ran):.3f}",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "hostname": socket.gethostname()})
    if properties:
        props = ET.SubElement(suite, "properties")
        for key, value in properties.items():
            ET.SubElement(props, "property", {"name": str(key), "value": str(value)})
    for r in results:
        c = r.case
        case = ET.SubElement(suite, "testcase", {
            "classname": f"engine.stress.{c.mode}",
            "name": f"{c.id} {c.transport} {c.channels_label} {c.codec} {c.workload} "
                    f"{c.fault.label}",
            "time": f"{r.seconds:.3f}"})
        notes = list(r.observation.notes) if r.observation is not None else []
        if r.verdict is Verdict.SKIPPED:
            ET.SubElement(case, "skipped", {"message": r.detail})
        elif not r.good:
            fail = ET.SubElement(case, "failure", {
                "message": f"{r.verdict.value}: {r.detail}",
                "type": r.verdict.name.lower()})
            fail.text = "\n".join([r.detail, *notes])
        else:
            out = ET.SubElement(case, "system-out")
            out.text = "\n".join([f"{r.verdict.value}: {r.detail}", *notes])
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def to_json(results: Sequence[CaseResult], meta: dict | None = None) -> dict:
    """Everything: the run's settings, each case, verdict, observation."""
    ran = [r for r in results if r.verdict is not Verdict.SKIPPED]
    return {**(meta or {}),
            "ok": exit_code(results) == EXIT_OK,
            "counts": {"cases": len(results), "run": len(ran),
                       "good": sum(1 for r in ran if r.good),
                       "bad": sum(1 for r in ran if not r.good),
                       "skipped": len(results) - len(ran)},
            "seconds": round(sum(r.seconds for r in ran), 3),
            "results": [r.to_dict() for r in results]}
