"""Verdicts: what a case's outcome means, and which outcomes each fault allows.

A case is judged from an :class:`Observation` (what the runner saw on both
sides after the migration ended) against :data:`EXPECTED`, the explicit
table of the outcomes each (mode, fault kind, moment) may legitimately
have.  Three outcomes are good:

* ``completed, memory verified`` - the destination's memory equals the
  source's at switchover (sha256 per block), or, for an ``ab`` guest that
  ran on the destination during postcopy, QEMU's ``ab`` check passes there;
* ``failed cleanly, source intact`` - the source ended ``failed`` or
  ``cancelled`` with its guest running again and its memory its own (same
  digest for a still guest; ``ab`` check and vCPUs making progress for an
  ``ab`` guest), and the destination failed without running the guest;
* ``failed as expected (postcopy: state on destination)`` - once postcopy
  has started the destination owns the guest; when the destination dies
  the source fails with the split error, keeps its guest stopped, and its
  (stale) memory is still consistent.

Everything else is bad: a lost or corrupted page, a source that is not
intact, a hang, a leaked segment or process, or an outcome the table does
not allow for the fault (a fault that fired and was not noticed, a cancel
that won in postcopy...).  A fault that never fired (the migration ended
first) may only complete: that is good, and noted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

from engine.stress.matrix import Case


class Verdict(str, Enum):
    """The end of one case; ``good`` says whether CI may pass with it."""

    COMPLETED = "completed, memory verified"
    FAILED_CLEANLY = "failed cleanly, source intact"
    SPLIT = "failed as expected (postcopy: state on destination)"
    CORRUPTED = "lost or corrupted page"
    SOURCE_NOT_INTACT = "source not intact"
    HANG = "hang"
    LEAK = "leak"
    UNEXPECTED = "unexpected outcome"
    SKIPPED = "skipped (time limit)"

    def __str__(self) -> str:
        return self.value

    @property
    def good(self) -> bool:
        return self in (Verdict.COMPLETED, Verdict.FAILED_CLEANLY, Verdict.SPLIT)


_C, _F, _S = Verdict.COMPLETED, Verdict.FAILED_CLEANLY, Verdict.SPLIT

#: destination statuses that count as failed: ``setup`` is one that never got
#: a connection (the source failed first), ``killed`` one the case killed
DESTINATION_FAILED = frozenset({"failed", "killed", "setup"})


@dataclass(frozen=True)
class Expectation:
    """The verdicts a fault may end with once it fired, the source status a
    clean failure must have, and why."""

    verdicts: frozenset
    source_status: str | None = None
    why: str = ""
    #: False for the cases without a fault
    fault: bool = True


def _precopy_table(family: str) -> dict:
    failed = "failed"
    return {
        (family, "none", "-"): Expectation(frozenset({_C}), None, "nothing goes wrong",
                                           fault=False),
        (family, "worker-killed", "active"): Expectation(
            frozenset({_F}), failed, "a multifd channel is lost: the migration fails"),
        (family, "channel-dropped", "active"): Expectation(
            frozenset({_F}), failed, "the main channel is cut in precopy"),
        (family, "packet-corrupted", "active"): Expectation(
            frozenset({_F}), failed, "the destination rejects a malformed record"),
        (family, "destination-killed", "active"): Expectation(
            frozenset({_F}), failed, "nobody receives: the source fails"),
        **{(family, "cancel", m): Expectation(
            frozenset({_F}), "cancelled", f"migrate_cancel in {m}")
           for m in ("setup", "active", "pre-switchover", "device")},
    }


#: (mode family, fault kind, moment) -> the outcomes allowed once the fault fired
EXPECTED: dict[tuple[str, str, str], Expectation] = {
    **_precopy_table("precopy"),
    # Before the switch a postcopy migration is a precopy one.
    **_precopy_table("postcopy"),
    ("postcopy", "channel-dropped", "postcopy"): Expectation(
        frozenset({_C}), None, "both sides pause; migrate-recover + resume completes it"),
    ("postcopy", "packet-corrupted", "postcopy"): Expectation(
        frozenset({_C}), None, "the destination drops the channel and pauses; "
        "recovery completes it"),
    ("postcopy", "destination-killed", "postcopy"): Expectation(
        frozenset({_S}), "failed", "the guest's state is split: the source must not "
        "resume it, and fails"),
    ("postcopy", "cancel", "postcopy"): Expectation(
        frozenset({_C}), None, "migrate_cancel is refused once postcopy started"),
    # The verifier's own check: no good outcome exists.
    ("precopy", "silent-corruption", "active"): Expectation(
        frozenset(), None, "a flipped data byte passes the format: memory must differ"),
}


def expectation(case: Case) -> Expectation:
    family = "postcopy" if case.postcopy else "precopy"
    return EXPECTED[(family, case.fault.kind, case.fault.moment)]


@dataclass(frozen=True)
class Observation:
    """What the runner saw after a case (None: not observed / not applicable)."""

    source_status: str
    source_error: str | None = None
    #: the statuses the source went through
    source_history: tuple = ()
    destination_status: str | None = None
    destination_error: str | None = None
    destination_running: bool | None = None
    #: completed: digests equal (precopy); the ab check on the destination
    memory_equal: bool | None = None
    bad_pages: int | None = None
    first_bad_page: int | None = None
    ab_ok: bool | None = None
    #: failed: the source guest runs, its memory is its own, its vCPUs progress
    source_running: bool | None = None
    source_memory_ok: bool | None = None
    source_progressing: bool | None = None
    fault_fired: bool = False
    #: the source status when the fault fired, and what the action reported
    fault_status: str | None = None
    fault_note: str | None = None
    recovered: bool = False
    hung: str | None = None
    #: segment names in /dev/shm, and temp directories (absolute paths)
    leaked_segments: tuple = ()
    leaked_processes: tuple = ()
    #: an exception the runner itself hit (a bug here, or set-up trouble)
    runner_error: str | None = None
    notes: tuple = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


def classify(expect: Expectation, obs: Observation) -> tuple[Verdict, str]:
    """The verdict and a one-line reason."""
    if obs.hung:
        return Verdict.HANG, obs.hung
    if obs.runner_error:
        return Verdict.UNEXPECTED, f"runner error: {obs.runner_error}"
    if obs.leaked_segments or obs.leaked_processes:
        parts = []
        # Segment names, and temp directories by their paths.
        segs = [n for n in obs.leaked_segments if not n.startswith("/")]
        dirs = [n for n in obs.leaked_segments if n.startswith("/")]
        if segs:
            parts.append("segments " + ", ".join(segs))
        if dirs:
            parts.append("temp directories " + ", ".join(dirs))
        if obs.leaked_processes:
            parts.append("processes " + ", ".join(obs.leaked_processes))
        return Verdict.LEAK, "left behind: " + "; ".join(parts)
    if obs.source_status == "completed":
        return _completed(expect, obs)
    if obs.source_status in ("failed", "cancelled"):
        return _failed(expect, obs)
    return Verdict.UNEXPECTED, f"source ended in {obs.source_status!r}"


def _completed(expect: Expectation, obs: Observation) -> tuple[Verdict, str]:
    if obs.destination_status != "completed":
        return (Verdict.UNEXPECTED, f"source completed but destination is "
                f"{obs.destination_status}: {obs.destination_error}")
    if obs.memory_equal is False:
        where = ""
        if obs.bad_pages is not None:
            where = f": {obs.bad_pages} page(s) differ, first at page {obs.first_bad_page}"
        return Verdict.CORRUPTED, "destination memory differs from the source's at " \
            "switchover" + where
    if obs.ab_ok is False:
        return Verdict.CORRUPTED, f"ab check failed on the destination " \
            f"({obs.bad_pages} bad page(s))"
    if obs.memory_equal is None and obs.ab_ok is None:
        return Verdict.UNEXPECTED, "completed, but nothing verified the memory"
    proof = "sha256 equal" if obs.memory_equal else "ab check passed"
    if obs.memory_equal and obs.ab_ok:
        proof = "sha256 equal, ab check passed"
    if obs.fault_fired and _C not in expect.verdicts:
        return (Verdict.UNEXPECTED, f"the fault fired ({obs.fault_note or obs.fault_status}) "
                "and yet the migration completed")
    extra = []
    if obs.recovered:
        extra.append("after postcopy recovery")
    if not obs.fault_fired and expect.fault:
        extra.append("the fault did not fire: the migration ended first")
    if obs.fault_note:
        extra.append(obs.fault_note)
    return Verdict.COMPLETED, proof + "".join(f"; {e}" for e in extra)


def _failed(expect: Expectation, obs: Observation) -> tuple[Verdict, str]:
    what = f"source {obs.source_status}: {obs.source_error}"
    postcopied = any(s in ("postcopy-active", "postcopy-paused") for s in obs.source_history)
    if postcopied:
        if _S not in expect.verdicts or not obs.fault_fired:
            return Verdict.UNEXPECTED, f"postcopy ended on a split guest: {what}"
        if obs.source_running:
            return Verdict.SOURCE_NOT_INTACT, "the source resumed a guest that runs " \
                "on the destination"
        if obs.source_memory_ok is False:
            return Verdict.SOURCE_NOT_INTACT, "the source's stale memory is inconsistent"
        if "split" not in (obs.source_error or ""):
            return Verdict.UNEXPECTED, f"no split error: {what}"
        return Verdict.SPLIT, what
    if not obs.source_running:
        return Verdict.SOURCE_NOT_INTACT, f"the source guest is not running ({what})"
    if obs.source_memory_ok is False:
        return Verdict.SOURCE_NOT_INTACT, f"the source's memory changed ({what})"
    if obs.source_progressing is False:
        return Verdict.SOURCE_NOT_INTACT, f"the source's vCPUs make no progress ({what})"
    if obs.destination_status == "completed" or obs.destination_running:
        return (Verdict.UNEXPECTED, f"the destination {obs.destination_status} and "
                f"{'runs' if obs.destination_running else 'holds'} the guest too ({what})")
    if obs.destination_status not in DESTINATION_FAILED:
        return (Verdict.UNEXPECTED, f"the destination did not fail: it is "
                f"{obs.destination_status} ({what})")
    if not obs.fault_fired:
        return Verdict.UNEXPECTED, f"failed, and no fault fired: {what}"
    if _F not in expect.verdicts:
        return Verdict.UNEXPECTED, f"{obs.fault_note or 'the fault'} should not fail " \
            f"the migration: {what}"
    if expect.source_status is not None and obs.source_status != expect.source_status:
        return (Verdict.UNEXPECTED, f"source ended {obs.source_status}, expected "
                f"{expect.source_status}: {obs.source_error}")
    return Verdict.FAILED_CLEANLY, what
