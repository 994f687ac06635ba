"""engine stress: verdicts from observations, against the table of expected outcomes."""
from __future__ import annotations

from dataclasses import replace

import pytest

from engine.stress.matrix import FAULT_KINDS, VARIANTS, Case, Fault
from engine.stress.verdict import EXPECTED, Observation, Verdict, classify, expectation


def case(kind="none", moment="-", mode="precopy", side=None, at=None) -> Case:
    postcopy = mode != "precopy"
    return Case(seed=0, index=0, transport="unix", channels=2 if kind == "worker-killed" else 0,
                codec="none", mode=mode, workload="ab" if postcopy else "none",
                fault=Fault(kind, moment, side, at),
                postcopy_after=(0 if moment == "postcopy" else 1) if postcopy else None)


def judge(c: Case, obs: Observation) -> Verdict:
    return classify(expectation(c), obs)[0]


COMPLETED = Observation(source_status="completed", source_history=(
    "none", "setup", "active", "device", "completed"), destination_status="completed",
    memory_equal=True)
CLEAN = Observation(source_status="failed", source_error="channel broken",
                    source_history=("none", "setup", "active", "failed"),
                    destination_status="failed", destination_running=False,
                    source_running=True, source_memory_ok=True, fault_fired=True)
SPLIT = Observation(
    source_status="failed", source_error="postcopy failed ...: state is now split ...",
    source_history=("none", "setup", "active", "device", "postcopy-device",
                    "postcopy-active", "postcopy-paused", "failed"),
    destination_status="killed", source_running=False, source_memory_ok=True,
    fault_fired=True)


def test_every_sampled_variant_has_an_expectation():
    for kind in FAULT_KINDS:
        for moment, _ in VARIANTS[kind]:
            for family in ("precopy", "postcopy"):
                if moment == "postcopy" and family == "precopy":
                    continue
                assert (family, kind, moment) in EXPECTED, (family, kind, moment)


def test_good_verdicts():
    assert judge(case(), COMPLETED) is Verdict.COMPLETED
    assert judge(case("channel-dropped", "active", at=0.3), CLEAN) is Verdict.FAILED_CLEANLY
    assert judge(case("cancel", "device"), replace(CLEAN, source_status="cancelled")) \
        is Verdict.FAILED_CLEANLY
    assert judge(case("destination-killed", "postcopy", "postcopy", at=0.3), SPLIT) \
        is Verdict.SPLIT
    recovered = replace(COMPLETED, memory_equal=None, ab_ok=True, recovered=True,
                        fault_fired=True)
    assert judge(case("channel-dropped", "postcopy", "postcopy-preempt", at=0.3),
                 recovered) is Verdict.COMPLETED
    assert all(v.good for v in (Verdict.COMPLETED, Verdict.FAILED_CLEANLY, Verdict.SPLIT))


def test_a_corrupted_destination_page_is_a_bad_verdict():
    obs = replace(COMPLETED, memory_equal=False, bad_pages=1, first_bad_page=1234)
    verdict, why = classify(expectation(case()), obs)
    assert verdict is Verdict.CORRUPTED and not verdict.good
    assert "1234" in why
    ab = replace(COMPLETED, memory_equal=None, ab_ok=False, bad_pages=3)
    assert judge(case(), ab) is Verdict.CORRUPTED
    # Also when the fault itself completes the migration.
    assert judge(case("cancel", "postcopy", "postcopy", at=0.2),
                 replace(ab, fault_fired=True)) is Verdict.CORRUPTED


def test_completed_without_any_check_is_not_good():
    obs = replace(COMPLETED, memory_equal=None)
    assert judge(case(), obs) is Verdict.UNEXPECTED


def test_completed_source_needs_a_completed_destination():
    obs = replace(COMPLETED, destination_status="failed")
    assert judge(case(), obs) is Verdict.UNEXPECTED


@pytest.mark.parametrize("change, verdict", [
    (dict(source_running=False), Verdict.SOURCE_NOT_INTACT),
    (dict(source_memory_ok=False), Verdict.SOURCE_NOT_INTACT),
    (dict(source_progressing=False), Verdict.SOURCE_NOT_INTACT),
    (dict(destination_status="completed"), Verdict.UNEXPECTED),
    (dict(destination_running=True), Verdict.UNEXPECTED),
    (dict(destination_status="postcopy-paused"), Verdict.UNEXPECTED),
    (dict(fault_fired=False), Verdict.UNEXPECTED),
    (dict(hung="source still active after 90 s"), Verdict.HANG),
    (dict(leaked_segments=("engine-0123",)), Verdict.LEAK),
    (dict(leaked_processes=("pid 42 (python)",)), Verdict.LEAK),
    (dict(runner_error="KeyError: 'x'"), Verdict.UNEXPECTED),
])
def test_failed_cleanly_needs_all_of_it(change, verdict):
    c = case("packet-corrupted", "active", at=0.3)
    assert judge(c, CLEAN) is Verdict.FAILED_CLEANLY
    assert judge(c, replace(CLEAN, **change)) is verdict


def test_a_leak_spoils_even_a_completed_migration():
    assert judge(case(), replace(COMPLETED, leaked_segments=("engine-1",))) is Verdict.LEAK


def test_failure_without_a_fault_is_not_good():
    assert judge(case(), replace(CLEAN, fault_fired=False)) is Verdict.UNEXPECTED


def test_cancel_must_end_cancelled_and_others_failed():
    cancel = case("cancel", "setup")
    assert judge(cancel, CLEAN) is Verdict.UNEXPECTED        # 'failed', not 'cancelled'
    worker = case("worker-killed", "active", side="source", at=0.3)
    assert judge(worker, replace(CLEAN, source_status="cancelled")) is Verdict.UNEXPECTED


def test_postcopy_faults_that_must_be_recovered():
    c = case("channel-dropped", "postcopy", "postcopy", at=0.3)
    # Failing (split) where recovery was expected is wrong.
    assert judge(c, SPLIT) is Verdict.UNEXPECTED
    # A cancel that won after the switch would lose the guest.
    cancel = case("cancel", "postcopy", "postcopy", at=0.3)
    assert judge(cancel, replace(CLEAN, source_status="cancelled")) is Verdict.UNEXPECTED


def test_split_source_must_stay_stopped_and_consistent():
    c = case("destination-killed", "postcopy", "postcopy", at=0.3)
    assert judge(c, replace(SPLIT, source_running=True)) is Verdict.SOURCE_NOT_INTACT
    assert judge(c, replace(SPLIT, source_memory_ok=False)) is Verdict.SOURCE_NOT_INTACT
    assert judge(c, replace(SPLIT, source_error="channel broken")) is Verdict.UNEXPECTED
    # A split in precopy mode cannot be expected.
    assert judge(case("destination-killed", "active", "postcopy", at=0.3), SPLIT) \
        is Verdict.UNEXPECTED


def test_a_fault_that_fired_yet_completed_is_unexpected():
    c = case("channel-dropped", "active", at=0.3)
    assert judge(c, replace(COMPLETED, fault_fired=True)) is Verdict.UNEXPECTED
    verdict, why = classify(expectation(c), COMPLETED)      # never fired: fine, noted
    assert verdict is Verdict.COMPLETED and "did not fire" in why


def test_silent_corruption_has_no_good_outcome():
    c = Case(0, 0, "unix", 0, "none", "precopy", "none",
             Fault("silent-corruption", "active", None, 0.3))
    assert not expectation(c).verdicts
    assert judge(c, replace(COMPLETED, fault_fired=True)) is Verdict.UNEXPECTED
    assert judge(c, replace(COMPLETED, fault_fired=True, memory_equal=False)) \
        is Verdict.CORRUPTED
