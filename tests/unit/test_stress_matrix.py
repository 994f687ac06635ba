"""engine stress: the case matrix and its seeded sampling."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from engine.errors import ConfigError
from engine.stress.matrix import (FAULT_KINDS, VARIANTS, Case, Fault, check_case, sample)
from engine.stress.runner import Settings, case_options


def test_same_seed_same_cases():
    assert sample(7, 40) == sample(7, 40)
    # A prefix of a longer sample is the shorter sample.
    assert sample(7, 40)[:12] == sample(7, 12)


def test_other_seed_other_cases():
    assert sample(1, 30) != sample(2, 30)


def test_same_cases_in_another_interpreter():
    """Nothing process-specific (hash seeds, dict order) enters the sampling."""
    code = ("from engine.stress.matrix import sample; "
            "print([c.to_dict() for c in sample(11, 20)])")
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
           for seed in ("1", "2")]
    assert out[0] == out[1] == f"{[c.to_dict() for c in sample(11, 20)]}\n"


@pytest.mark.parametrize("seed", [0, 1, 5, 123])
def test_every_kind_once_in_each_round(seed):
    cases = sample(seed, 3 * len(FAULT_KINDS))
    for r in range(3):
        chunk = cases[r * len(FAULT_KINDS):(r + 1) * len(FAULT_KINDS)]
        assert sorted(c.fault.kind for c in chunk) == sorted(FAULT_KINDS)


def test_thirty_cases_cover_every_variant():
    cases = sample(1, 30)
    seen = {(c.fault.kind, c.fault.moment, c.fault.side) for c in cases}
    wanted = {(k, m, s) for k in FAULT_KINDS for m, s in VARIANTS[k]}
    assert seen == wanted
    assert {c.transport for c in cases} == {"unix", "tcp"}
    assert {c.channels for c in cases} == {0, 2, 4}
    assert {c.mode for c in cases} == {"precopy", "postcopy", "postcopy-preempt"}
    assert {c.codec for c in cases} == {"none", "zlib", "zstd"}


def test_sampled_cases_are_valid_and_timed():
    for c in sample(3, 200):
        check_case(c)       # raises for an impossible combination
        f = c.fault
        if f.kind == "none" or f.moment in ("setup", "pre-switchover", "device"):
            assert f.at is None
        else:
            assert 0.15 <= f.at <= 0.6
        if f.kind == "worker-killed":
            assert 0 <= f.target < c.channels
        if f.moment == "postcopy":
            assert c.postcopy and c.postcopy_after == 0
        if c.postcopy and f.moment == "active":
            assert c.postcopy_after == 1


def test_case_round_trips_through_its_dict():
    for c in sample(4, 20):
        assert Case.from_dict(c.to_dict()) == c


def test_only_the_kinds_asked_for():
    cases = sample(2, 10, ["cancel", "none"])
    assert Counter(c.fault.kind for c in cases) == {"cancel": 5, "none": 5}
    corrupt = sample(2, 3, ["silent-corruption"])
    assert all(c.mode == "precopy" and c.channels == 0 and c.workload == "none"
               for c in corrupt)


@pytest.mark.parametrize("kw, why", [
    (dict(channels=0, codec="zstd"), "codec"),
    (dict(mode="postcopy", workload="none", postcopy_after=1), "workload"),
    (dict(fault=Fault("worker-killed", "active", "source", 0.3)), "worker-killed"),
    (dict(fault=Fault("cancel", "postcopy", None, 0.3)), "precopy mode"),
    (dict(mode="postcopy", workload="ab"), "postcopy_after"),
    (dict(mode="postcopy", workload="ab", postcopy_after=0,
          fault=Fault("channel-dropped", "active", None, 0.3)), "first pass"),
])
def test_impossible_cases_are_refused(kw, why):
    base = dict(seed=0, index=0, transport="unix", channels=0, codec="none",
                mode="precopy", workload="none", fault=Fault())
    with pytest.raises(ConfigError, match=why):
        Case(**{**base, **kw})


def test_unknown_fault_kind_and_variant():
    with pytest.raises(ConfigError, match="unknown fault kind"):
        sample(1, 3, ["none", "meteor-strike"])
    with pytest.raises(ConfigError, match="no variant"):
        Fault("cancel", "postcopy-paused")


def test_labels():
    assert Fault().label == "none"
    assert Fault("worker-killed", "active", "destination", 0.2).label == \
        "worker-killed(dst)@active"
    assert Fault("cancel", "device").label == "cancel@device"


def test_case_options():
    settings = Settings()
    multifd = Case(0, 0, "tcp", 4, "zstd", "postcopy-preempt", "ab",
                   Fault("cancel", "pre-switchover"), postcopy_after=1)
    opts = case_options(multifd, settings)
    assert opts.cap("multifd") and opts.cap("postcopy-ram") and opts.cap("postcopy-preempt")
    assert opts.cap("pause-before-switchover") and opts.cap("return-path")
    assert opts.param("multifd-channels") == 4
    assert opts.param("multifd-compression") == "zstd"
    assert opts.param("max-postcopy-bandwidth") == settings.postcopy_bandwidth
    single = Case(0, 0, "unix", 0, "none", "precopy", "none", Fault())
    opts = case_options(single, settings)
    assert not opts.cap("multifd") and not opts.cap("postcopy-ram")
    assert not opts.cap("pause-before-switchover")
    # The first pass runs with a 1 ms downtime limit (all of it is 'active').
    assert opts.param("downtime-limit") == 1
