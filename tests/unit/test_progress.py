"""The live progress line: the ETA rule, the line's layout, when it is drawn."""
from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.commands.common import (MIB, EtaCountdown, Progress, format_eta,
                                    format_progress, progress_fields)
from engine.telemetry import Sample


def sample(t=1.0, status="active", passes=2, transferred=300 * MIB, remaining=100 * MIB,
           total=1024 * MIB, dirty_pages_rate=0, throughput=50 * MIB):
    return Sample(t=t, status=status, passes=passes, transferred=transferred,
                  remaining=remaining, total=total, dirty_pages_rate=dirty_pages_rate,
                  page_size=4096, mbps=0.0, throughput=throughput)


# -- the ETA rule ---------------------------------------------------------------

def run(eta: EtaCountdown, steps):
    """Feed (t, remaining MiB, bandwidth MiB/s, dirty MiB/s); the values shown."""
    return [eta.update(t, r * MIB, bw * MIB, d * MIB) for t, r, bw, d in steps]


def test_estimate_is_remaining_over_net_bandwidth():
    assert EtaCountdown.estimate(100 * MIB, 50 * MIB, 0) == pytest.approx(2.0)
    assert EtaCountdown.estimate(100 * MIB, 50 * MIB, 25 * MIB) == pytest.approx(4.0)
    assert EtaCountdown.estimate(100 * MIB, 50 * MIB, 50 * MIB) is None
    assert EtaCountdown.estimate(100 * MIB, 50 * MIB, 80 * MIB) is None
    assert EtaCountdown.estimate(100 * MIB, 0, 0) is None


def test_follows_a_falling_estimate():
    # 100 MiB at 10 MiB/s net, draining as predicted: 10, 9, 8, ...
    shown = run(EtaCountdown(), [(t, 100 - 10 * t, 20, 10) for t in range(5)])
    assert shown == pytest.approx([10, 9, 8, 7, 6])


def test_growing_dirty_data_does_not_run_backwards():
    # A new pass finds more dirty data each time: remaining grows from 100
    # to 400 MiB while the net bandwidth stays 10 MiB/s.  The plain estimate
    # goes 10, 20, 30, 40 s; the countdown holds and counts down in real time.
    eta = EtaCountdown()
    steps = [(0.0, 100, 20, 10), (1.0, 200, 20, 10), (2.0, 300, 20, 10), (3.0, 400, 20, 10)]
    shown = run(eta, steps)
    assert shown == pytest.approx([10, 9, 8, 7])
    # Then the data drains fast (the guest stopped dirtying): the estimate
    # falls below the held countdown, and is followed from there.
    assert eta.update(4.0, 30 * MIB, 20 * MIB, 10 * MIB) == pytest.approx(3)
    assert eta.update(5.0, 20 * MIB, 20 * MIB, 10 * MIB) == pytest.approx(2)


def test_held_countdown_meets_the_estimate():
    eta = EtaCountdown()
    assert eta.update(0.0, 50 * MIB, 10 * MIB) == pytest.approx(5)
    # remaining jumps: the estimate says 8 s, the display holds at 4 s...
    assert eta.update(1.0, 80 * MIB, 10 * MIB) == pytest.approx(4)
    # ...the estimate comes down to 3.5 s while the hold would show 3 s: 3
    assert eta.update(2.0, 35 * MIB, 10 * MIB) == pytest.approx(3)
    # and below the hold, the estimate wins
    assert eta.update(2.5, 10 * MIB, 10 * MIB) == pytest.approx(1)


def test_cannot_converge_shows_none_then_starts_over():
    eta = EtaCountdown()
    assert eta.update(0.0, 100 * MIB, 20 * MIB, 10 * MIB) == pytest.approx(10)
    # the dirty rate reaches the bandwidth: no estimate
    assert eta.update(1.0, 120 * MIB, 20 * MIB, 20 * MIB) is None
    assert eta.update(2.0, 150 * MIB, 20 * MIB, 30 * MIB) is None
    # converging again: a new countdown, from the new estimate (15 s)
    assert eta.update(3.0, 150 * MIB, 20 * MIB, 10 * MIB) == pytest.approx(15)
    assert eta.update(4.0, 200 * MIB, 20 * MIB, 10 * MIB) == pytest.approx(14)


def test_countdown_at_zero_while_running_shows_none():
    eta = EtaCountdown()
    assert eta.update(0.0, 20 * MIB, 10 * MIB) == pytest.approx(2)
    # remaining keeps growing: the hold runs out at t=2 with the migration
    # still going; the display says "--" rather than 0
    assert eta.update(1.0, 40 * MIB, 10 * MIB) == pytest.approx(1)
    assert eta.update(2.0, 60 * MIB, 10 * MIB) is None
    # ...and starts over with what the estimate says now
    assert eta.update(2.5, 60 * MIB, 10 * MIB) == pytest.approx(6)
    # remaining 0 while still running (the last pages in flight): "--" too
    assert EtaCountdown().update(0.0, 0, 10 * MIB) is None


def test_no_bandwidth_yet_is_none():
    assert EtaCountdown().update(0.0, 100 * MIB, 0.0) is None


steps_strategy = st.lists(
    st.tuples(st.floats(0.01, 5.0),                 # seconds since the last step
              st.integers(0, 2048),                # remaining MiB
              st.floats(0.0, 500.0),               # bandwidth MiB/s
              st.floats(0.0, 500.0)),              # dirty rate MiB/s
    min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps_strategy)
def test_shown_value_never_increases_between_dashes(steps):
    eta, t, previous = EtaCountdown(), 0.0, None
    for dt, remaining, bw, dirty in steps:
        t += dt
        shown = eta.update(t, remaining * MIB, bw * MIB, dirty * MIB)
        if shown is not None:
            assert shown > 0
            assert shown <= EtaCountdown.estimate(remaining * MIB, bw * MIB, dirty * MIB) + 1e-9
            if previous is not None:
                # never up; and while held, down by at least the time elapsed
                assert shown <= previous - dt + 1e-9
        previous = shown


@pytest.mark.parametrize("seconds, text", [
    (None, "--"), (0.2, "1s"), (1.0, "1s"), (1.01, "2s"), (59.5, "1m00s"),
    (65, "1m05s"), (3600, "1h00m"), (3725, "1h02m"),
])
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


# -- the line -------------------------------------------------------------------

def test_fields_units_and_qemu_status_names():
    f = progress_fields(sample(status="postcopy-active", passes=3, transferred=1536 * MIB,
                               remaining=int(12.5 * MIB), throughput=300 * MIB,
                               dirty_pages_rate=2560), eta=65)
    assert f["status"].strip() == "postcopy-active"
    assert f["pass"] == "pass  3"
    assert f["sent"] == "sent 1536.0 MiB"
    assert f["remaining"] == "left   12.5 MiB"
    assert f["throughput"] == "300.0 MiB/s"
    # after the switchover the source's vCPUs dirty nothing
    assert f["dirty"] == "dirty   0.0 MiB/s"
    assert f["eta"] == "ETA 1m05s"
    f = progress_fields(sample(status="active", dirty_pages_rate=2560), eta=None)
    assert f["dirty"] == "dirty  10.0 MiB/s"       # 2560 pages/s x 4 KiB
    assert f["eta"] == "ETA    --"
    assert progress_fields(sample(status="completed"), None)["eta"] == "ETA  done"


def test_widths_do_not_move_with_the_numbers():
    a = format_progress(sample(transferred=1 * MIB, remaining=2 * MIB, throughput=3 * MIB), 5)
    b = format_progress(sample(transferred=900 * MIB, remaining=800 * MIB,
                               throughput=700 * MIB, dirty_pages_rate=99999), 50)
    assert len(a) == len(b)
    assert [a.index(k) for k in ("pass", "sent", "left", "dirty", "ETA")] == \
        [b.index(k) for k in ("pass", "sent", "left", "dirty", "ETA")]


@pytest.mark.parametrize("width", [200, 100, 80, 60, 40, 20])
def test_line_fits_the_terminal(width):
    line = format_progress(sample(status="active"), 12, width)
    assert len(line) <= width - 1
    assert len(format_progress(sample(status="postcopy-recover-setup"), 12, width)) <= width - 1
    if width >= 100:
        assert all(k in line for k in ("pass", "sent", "left", "MiB/s", "dirty", "ETA"))
    if width == 80:
        # the least useful field goes first; what is left and the ETA stay
        assert "sent" not in line and "left" in line and "ETA" in line


# -- drawing --------------------------------------------------------------------

class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_draws_one_line_redrawn_in_place_on_a_terminal():
    term = FakeTerminal()
    with Progress(quiet=False, stream=term, refresh=0.2) as p:
        assert p.enabled
        p.update(sample(t=0.0, remaining=100 * MIB, throughput=10 * MIB))
        p.update(sample(t=0.1, remaining=99 * MIB, throughput=10 * MIB))    # too soon
        p.update(sample(t=0.3, remaining=85 * MIB, throughput=10 * MIB))
        p.update(sample(t=0.35, status="device", remaining=1 * MIB))       # status: at once
    out = term.getvalue()
    frames = out.split("\r\033[K")
    assert frames[0] == "" and frames[-1] == ""      # starts and ends with an erase
    drawn = [f for f in frames if f]
    assert len(drawn) == 3
    assert "\n" not in out
    assert drawn[0].startswith("active") and "ETA   10s" in drawn[0]
    assert "ETA    9s" in drawn[1]                    # 85 MiB / 10 MiB/s: 8.5 s
    assert drawn[2].startswith("device")


def test_silent_when_not_a_terminal_or_quiet():
    pipe = io.StringIO()
    p = Progress(quiet=False, stream=pipe)
    assert not p.enabled
    with p:
        p.update(sample())
    assert pipe.getvalue() == ""
    term = FakeTerminal()
    with Progress(quiet=True, stream=term) as p:
        p.update(sample())
    assert term.getvalue() == ""


def test_a_terminal_that_goes_away_turns_the_display_off():
    class Broken(FakeTerminal):
        def write(self, text):
            raise OSError(5, "Input/output error")
    p = Progress(quiet=False, stream=Broken())
    p.update(sample())
    assert not p.enabled
    p.update(sample(t=5))        # no exception, nothing attempted
