"""Convergence cases: each strategy against a guest dirtying faster than the link.

Sans-I/O: the table of strategies, the case they make, what each is expected
to do, and the verdict from what a run observed.  Running a case is
:mod:`~engine.stress.converge_run`'s business.

The guest writes random pages at ``dirty_rate`` MiB/s over all of its RAM
while ``max-bandwidth`` carries ``bandwidth`` MiB/s, ``dirty_rate`` several
times ``bandwidth``: every pass re-dirties most of RAM, so plain precopy
never gets under the switchover threshold.  Every case runs under a bound
(``bound`` seconds, then cancelled, as QEMU's migration-test bounds its
non-converging case by passes): a strategy that does not converge within it
"did not converge".

:data:`STRATEGIES` is one row per strategy; a strategy that needs more (say
xbzrle or dirty-limit) is one more row: its capabilities, parameters and
``engine migrate`` arguments, and whether it must converge.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

from engine.errors import ConfigError

__all__ = ["Strategy", "STRATEGIES", "ConvergenceCase", "ConvergenceObservation",
           "ConvergenceVerdict", "convergence_cases", "classify_convergence",
           "migrate_arguments"]


@dataclass(frozen=True)
class Strategy:
    """One way to make precopy finish: its ``engine migrate`` arguments
    (``--cap``/``--param``/others) and whether it must converge."""

    name: str
    caps: tuple[str, ...] = ()
    params: tuple[tuple[str, object], ...] = ()
    #: further arguments of ``engine migrate`` (``{bound}`` is the case's bound)
    args: tuple[str, ...] = ()
    converges: bool = True
    why: str = ""


#: the strategies, in the order they are run and reported
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("none", converges=False,
             why="the guest re-dirties more than a pass sends: precopy never converges"),
    Strategy("auto-converge", caps=("auto-converge",),
             params=(("cpu-throttle-initial", 50), ("cpu-throttle-increment", 25)),
             why="the throttle climbs until the dirty rate falls under the bandwidth"),
    Strategy("dirty-limit", caps=("dirty-limit",), params=(("vcpu-dirty-limit", 16),),
             why="once the dirty rate is high twice, each vCPU is held to 16 MB/s, under "
                 "the bandwidth"),
    Strategy("xbzrle", caps=("xbzrle",),
             why="re-sent pages go as their difference from the copy sent before"),
    Strategy("postcopy", caps=("postcopy-ram",), args=("--postcopy-after", "1"),
             why="after the first pass the destination runs the guest and pulls its pages"),
    Strategy("timeout-suspend", args=("--timeout", "{half}", "--timeout-action", "suspend"),
             why="at the time-out the guest stops and the rest goes out (virsh "
                 "--timeout-suspend)"),
)}


@dataclass(frozen=True)
class ConvergenceCase:
    """One strategy against one guest and link."""

    strategy: str
    ram: int = 64 << 20
    dirty_rate: float = 200.0      # MiB/s
    bandwidth: int = 64 << 20      # bytes/s
    bound: float = 20.0            # seconds, then cancelled

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown convergence strategy {self.strategy!r} "
                              f"(known: {', '.join(STRATEGIES)})")
        if self.dirty_rate * (1 << 20) <= 2 * self.bandwidth:
            raise ConfigError("a convergence case needs a guest dirtying at least twice "
                              "the bandwidth")
        if self.bound <= 2:
            raise ConfigError(f"a convergence case's bound must exceed 2 s, not {self.bound}")

    @property
    def id(self) -> str:
        return self.strategy

    def to_dict(self) -> dict:
        return asdict(self)


def convergence_cases(names=None, **guest) -> list[ConvergenceCase]:
    """One case per strategy (all of :data:`STRATEGIES` by default)."""
    return [ConvergenceCase(n, **guest) for n in (names or STRATEGIES)]


def migrate_arguments(case: ConvergenceCase) -> list[str]:
    """``engine migrate`` arguments for *case*, without the report path."""
    s = STRATEGIES[case.strategy]
    out = ["--ram", str(case.ram), "--vcpus", "1", "--workload", "random",
           "--dirty-rate", f"{case.dirty_rate:g}", "--param", f"max-bandwidth={case.bandwidth}"]
    for cap in s.caps:
        out += ["--cap", f"{cap}=on"]
    for name, value in s.params:
        out += ["--param", f"{name}={value}"]
    subst = {"bound": f"{case.bound:g}", "half": f"{case.bound / 2:g}"}
    out += [a.format(**subst) for a in s.args]
    if "--timeout" not in s.args:
        # The bound: cancelled if not over by then.
        out += ["--timeout", f"{case.bound:g}", "--timeout-action", "cancel"]
    return out


class ConvergenceVerdict(str, Enum):
    CONVERGED = "converged"
    DID_NOT = "did not converge"
    BROKEN = "broken"           # failed, or completed with memory that differs

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ConvergenceObservation:
    """What a run of a case saw (from ``engine migrate``'s JSON report)."""

    exit_status: int
    status: str
    memory_equal: bool | None = None
    total_ms: int | None = None
    downtime_ms: int | None = None
    passes: int = 0
    throttle: int = 0
    timed_out: bool = False
    guest: dict = field(default_factory=dict)
    error: str = ""

    @classmethod
    def from_report(cls, exit_status: int, rep: dict | None, stderr: str = "") \
            -> "ConvergenceObservation":
        if rep is None:
            return cls(exit_status, "no report", error=stderr.strip()[-500:])
        mig = rep.get("migration") or {}
        conv = rep.get("convergence") or {}
        return cls(exit_status, mig.get("status", "none"),
                   memory_equal=(rep.get("verification") or {}).get("memory_equal"),
                   total_ms=mig.get("total-time"), downtime_ms=mig.get("downtime"),
                   passes=(mig.get("ram") or {}).get("dirty-sync-count",
                                                     conv.get("passes", 0)),
                   throttle=conv.get("cpu-throttle-percentage", 0),
                   timed_out=bool(conv.get("timed-out")), guest=conv.get("guest") or {},
                   error=mig.get("error-desc") or "")


def classify_convergence(case: ConvergenceCase, obs: ConvergenceObservation) \
        -> tuple[ConvergenceVerdict, bool, str]:
    """The verdict, whether it is the expected one, and a line saying why."""
    strategy = STRATEGIES[case.strategy]
    if obs.status == "completed" and obs.exit_status == 0 and obs.memory_equal is not False:
        verdict = ConvergenceVerdict.CONVERGED
        detail = f"completed in {obs.total_ms} ms, downtime {obs.downtime_ms} ms"
    elif obs.status == "cancelled" and obs.exit_status == 1:
        verdict = ConvergenceVerdict.DID_NOT
        detail = f"cancelled after {case.bound:g} s, {obs.passes} passes"
    else:
        return (ConvergenceVerdict.BROKEN, False,
                f"{obs.status} (exit {obs.exit_status}): {obs.error or 'memory differs'}")
    expected = verdict is (ConvergenceVerdict.CONVERGED if strategy.converges
                           else ConvergenceVerdict.DID_NOT)
    if not expected:
        detail += f"; expected otherwise: {strategy.why}"
    return verdict, expected, detail
