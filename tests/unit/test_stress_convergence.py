"""The convergence cases of ``engine stress --converge``: strategies, arguments, verdicts."""
from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.stress.convergence import (STRATEGIES, ConvergenceCase, ConvergenceObservation,
                                       ConvergenceVerdict, classify_convergence,
                                       convergence_cases, migrate_arguments)

V = ConvergenceVerdict


def test_every_strategy_has_a_case_in_table_order():
    assert [c.strategy for c in convergence_cases()] == list(STRATEGIES)
    assert list(STRATEGIES) == ["none", "auto-converge", "dirty-limit", "xbzrle", "postcopy",
                                "timeout-suspend"]


def test_a_case_must_dirty_faster_than_the_link():
    with pytest.raises(ConfigError, match="twice the bandwidth"):
        ConvergenceCase("none", dirty_rate=64, bandwidth=64 << 20)
    with pytest.raises(ConfigError, match="unknown convergence strategy"):
        ConvergenceCase("magic")


def test_arguments_bound_every_case():
    none = migrate_arguments(ConvergenceCase("none", bound=12))
    assert none[-4:] == ["--timeout", "12", "--timeout-action", "cancel"]
    ac = migrate_arguments(ConvergenceCase("auto-converge"))
    assert "auto-converge=on" in ac and "--timeout" in ac
    suspend = migrate_arguments(ConvergenceCase("timeout-suspend", bound=20))
    # its own time-out (half the bound) replaces the bound's cancel
    assert suspend.count("--timeout") == 1
    assert suspend[suspend.index("--timeout") + 1] == "10"
    assert suspend[suspend.index("--timeout-action") + 1] == "suspend"


def _obs(rc, status, **kw):
    return ConvergenceObservation(rc, status, **kw)


@pytest.mark.parametrize("strategy,obs,verdict,expected", [
    ("none", _obs(1, "cancelled"), V.DID_NOT, True),
    ("none", _obs(0, "completed", memory_equal=True), V.CONVERGED, False),
    ("auto-converge", _obs(0, "completed", memory_equal=True), V.CONVERGED, True),
    ("auto-converge", _obs(1, "cancelled"), V.DID_NOT, False),
    ("postcopy", _obs(1, "failed", error="boom"), V.BROKEN, False),
    ("timeout-suspend", _obs(3, "completed", memory_equal=False), V.BROKEN, False),
    ("timeout-suspend", _obs(-1, "no report"), V.BROKEN, False),
])
def test_verdicts(strategy, obs, verdict, expected):
    got, ok, detail = classify_convergence(ConvergenceCase(strategy), obs)
    assert (got, ok) == (verdict, expected), detail


def test_observation_from_report():
    rep = {"migration": {"status": "completed", "total-time": 5000, "downtime": 40,
                         "ram": {"dirty-sync-count": 7}},
           "verification": {"memory_equal": True},
           "convergence": {"cpu-throttle-percentage": 75, "timed-out": False,
                           "guest": {"slowdown": 0.7}}}
    obs = ConvergenceObservation.from_report(0, rep)
    assert (obs.status, obs.passes, obs.throttle, obs.downtime_ms) == ("completed", 7, 75, 40)
    cancelled = ConvergenceObservation.from_report(
        1, {"migration": {"status": "cancelled"}, "convergence": {"passes": 9}})
    assert cancelled.passes == 9
    assert ConvergenceObservation.from_report(1, None, "oops").status == "no report"
