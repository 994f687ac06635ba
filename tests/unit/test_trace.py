"""Trace points: QEMU-style named events, off unless enabled by glob."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from engine import trace

LINE = re.compile(r"^(\d+)@(\d+\.\d+):(\w+)(.*)$")


@pytest.fixture
def enabled(capsys):
    yield lambda patterns: trace.enable(patterns)
    trace.enable(None)


def test_nothing_is_traced_unless_enabled(capsys):
    trace.trace("migrate_set_state", new="active")
    assert capsys.readouterr().err == ""


def test_enabled_events_are_lines_like_qemus_log_backend(enabled, capsys):
    enabled("migrate_set_state, multifd_*")
    trace.trace("migrate_set_state", role="source", new="active")
    trace.trace("multifd_send_sync_main", round=3)
    trace.trace("migration_bitmap_sync_end", pending=0)      # not enabled
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    m = LINE.match(lines[0])
    assert m and m.group(3) == "migrate_set_state"
    assert m.group(4) == " role=source new=active"
    assert LINE.match(lines[1]).group(3) == "multifd_send_sync_main"
    enabled("")
    trace.trace("migrate_set_state", new="failed")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("where", ["before", "after"])
def test_the_command_line_traces_both_sides_in_order(tmp_path, where):
    """--trace (before or after the subcommand) reaches the local destination
    (a child), whose lines join the source's stderr as they happen; each
    side's status changes are in order."""
    opt = ["--trace", "migrate_set_state"]
    cmd = ["migrate", "--ram", "16M", "--quiet", "--no-verify"]
    r = subprocess.run([sys.executable, "-m", "engine",
                        *(opt + cmd if where == "before" else cmd + opt)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    events = [LINE.match(line) for line in r.stderr.splitlines()]
    assert all(events), r.stderr
    by_role: dict = {}
    for m in events:
        fields = dict(kv.split("=") for kv in m.group(4).split())
        by_role.setdefault(fields["role"], []).append(fields["new"])
    assert by_role["source"] == ["setup", "active", "device", "completed"]
    assert by_role["destination"] == ["setup", "active", "completed"]
    # Each side's lines in order (the destination's are relayed by a thread,
    # so they may land a little after a later line of the source's).
    for pid in {m.group(1) for m in events}:
        stamps = [float(m.group(2)) for m in events if m.group(1) == pid]
        assert stamps == sorted(stamps)
