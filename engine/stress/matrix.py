"""The stress matrix: what one case migrates, what goes wrong, and when.

A :class:`Case` is one migration: a transport, the channels (precopy's
single main channel, or multifd with 2 or 4 channels), a multifd codec, a
mode (precopy, postcopy, postcopy with the preempt channel; postcopy starts
after the first pass or at once), the guest's workload, and one
:class:`Fault`.  A fault has a *kind* (what is done), a
*moment* (the migration status it is aimed at) and, for faults triggered
by progress, *at*: the fraction of the phase's pages sent when it fires
(the phase is the first pass over RAM for moment ``active``, the pages
left at the start of ``postcopy-active`` for moment ``postcopy``).  Tying
faults to pages sent rather than to the clock makes a case land at the same
point of its migration on a fast machine and on a loaded one.

:func:`sample` draws cases from a seed.  Kinds come in rounds: each round is
a seeded shuffle of every kind, so cases 1-6, 7-12, ... each hold every
kind once; a kind's variants (moments, sides) rotate the same way, and the
rest of a case (transport, channels, codec, mode, workload, timing) is drawn
among the combinations the fault allows.  The same seed gives the same
cases on any machine (``random.Random``, nothing hash- or clock-dependent),
and a longer sample begins with the shorter one.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Sequence

from engine.errors import ConfigError

TRANSPORTS = ("unix", "tcp")
#: 0 is precopy's single main channel; N > 0 is multifd with N channels
CHANNELS = (0, 2, 4)
CODECS = ("none", "zlib", "zstd")
MODES = ("precopy", "postcopy", "postcopy-preempt")
WORKLOADS = ("none", "ab")

#: kinds sampled by default, in no particular order (sampling shuffles them)
FAULT_KINDS = ("none", "worker-killed", "channel-dropped", "packet-corrupted",
               "destination-killed", "cancel")
#: kinds only run when asked for.  ``silent-corruption`` flips a byte of a
#: page's data on the main channel: QEMU's format has no checksum, so the
#: migration completes, and the verifier must catch the damaged page (a run
#: with it must end with a bad verdict and a non-zero exit).
EXTRA_FAULT_KINDS = ("silent-corruption",)

#: kind -> its variants as (moment, side).  A moment is the migration status
#: a fault aims at (``-``: none); a side only for worker-killed
VARIANTS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "none": (("-", None),),
    "worker-killed": (("active", "source"), ("active", "destination")),
    "channel-dropped": (("active", None), ("postcopy", None)),
    "packet-corrupted": (("active", None), ("postcopy", None)),
    "destination-killed": (("active", None), ("postcopy", None)),
    "cancel": (("setup", None), ("active", None), ("pre-switchover", None),
               ("device", None), ("postcopy", None)),
    "silent-corruption": (("active", None),),
}

#: moments reached by status alone; the others fire on progress (``at``)
STATUS_MOMENTS = frozenset({"setup", "pre-switchover", "device"})
#: bounds of ``at``: late enough that pages are moving, early enough that
#: plenty are still to come when the fault lands
AT_RANGE = (0.15, 0.6)


@dataclass(frozen=True)
class Fault:
    """What goes wrong in a case, and when.

    ``at`` is a fraction of the phase's pages (None for status moments and
    no fault); ``target`` picks the multifd channel whose worker is killed.
    """

    kind: str = "none"
    moment: str = "-"
    side: str | None = None
    at: float | None = None
    target: int = 0

    def __post_init__(self) -> None:
        if self.kind not in VARIANTS:
            raise ConfigError(f"unknown fault kind {self.kind!r} "
                              f"(known: {', '.join(VARIANTS)})")
        if (self.moment, self.side) not in VARIANTS[self.kind]:
            raise ConfigError(f"fault {self.kind!r} has no variant "
                              f"moment={self.moment!r} side={self.side!r}")

    @property
    def label(self) -> str:
        """Short text: ``none``, ``cancel@device``, ``worker-killed(dst)@active``."""
        if self.kind == "none":
            return "none"
        side = {"source": "(src)", "destination": "(dst)"}.get(self.side or "", "")
        return f"{self.kind}{side}@{self.moment}"


@dataclass(frozen=True)
class Case:
    """One migration of the matrix (``index`` counts from 0 in its sample)."""

    seed: int
    index: int
    transport: str
    channels: int
    codec: str
    mode: str
    workload: str
    fault: Fault
    #: postcopy: switch after this many dirty-bitmap passes (0: before any page
    #: goes out, so that postcopy has the whole guest to send); None in precopy
    postcopy_after: int | None = None

    def __post_init__(self) -> None:
        check_case(self)

    @property
    def id(self) -> str:
        return f"{self.index + 1:02d}"

    @property
    def postcopy(self) -> bool:
        return self.mode != "precopy"

    @property
    def channels_label(self) -> str:
        return "single" if self.channels == 0 else f"multifd-{self.channels}"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["id"] = self.id
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        fields = {k: v for k, v in d.items() if k != "id"}
        fields["fault"] = Fault(**fields["fault"])
        return cls(**fields)


def check_case(case: Case) -> None:
    """Refuse a combination the engine (or QEMU) cannot run."""
    f = case.fault
    problems = []
    if case.transport not in TRANSPORTS:
        problems.append(f"transport {case.transport!r}")
    if case.channels not in CHANNELS:
        problems.append(f"channels {case.channels!r}")
    if case.codec not in CODECS or (case.channels == 0 and case.codec != "none"):
        problems.append(f"codec {case.codec!r} with {case.channels} multifd channels "
                        "(a codec needs multifd)")
    if case.mode not in MODES:
        problems.append(f"mode {case.mode!r}")
    if case.workload not in WORKLOADS or (case.postcopy and case.workload != "ab"):
        problems.append(f"workload {case.workload!r} (postcopy runs the ab guest: its "
                        "check is what proves a page faulted in was the right one)")
    if f.moment == "postcopy" and not case.postcopy:
        problems.append(f"fault {f.label} in precopy mode")
    if (case.postcopy_after is None) == case.postcopy:
        problems.append("postcopy_after goes with postcopy modes, and only with them")
    elif case.postcopy and f.moment == "active" and (case.postcopy_after or 0) < 1:
        problems.append("a fault in the first pass needs a first pass: postcopy_after >= 1")
    if f.kind == "worker-killed" and not case.channels:
        problems.append("worker-killed needs multifd workers")
    if f.kind == "silent-corruption" and (case.channels or case.postcopy
                                          or case.workload != "none"):
        problems.append("silent-corruption needs precopy on the main channel with a "
                        "still guest (its pages must be comparable byte for byte)")
    if problems:
        raise ConfigError("invalid stress case: " + "; ".join(problems))


def sample(seed: int, count: int, kinds: Sequence[str] = FAULT_KINDS) -> list[Case]:
    """``count`` cases drawn from ``seed`` (deterministic), faults from ``kinds``."""
    if count < 0:
        raise ConfigError(f"--cases must be >= 0, not {count}")
    kinds = list(dict.fromkeys(kinds))
    for k in kinds:
        if k not in VARIANTS:
            raise ConfigError(f"unknown fault kind {k!r} (known: {', '.join(VARIANTS)})")
    if not kinds:
        raise ConfigError("no fault kinds to sample from")
    rng = random.Random(seed)
    rounds: list[str] = []
    variants: dict[str, list[tuple[str, str | None]]] = {k: [] for k in kinds}
    cases = []
    for index in range(count):
        if not rounds:
            rounds = kinds[:]
            rng.shuffle(rounds)
        kind = rounds.pop()
        queue = variants[kind]
        if not queue:
            queue.extend(VARIANTS[kind])
            rng.shuffle(queue)
        moment, side = queue.pop()
        cases.append(_draw(rng, seed, index, kind, moment, side))
    return cases


def _draw(rng: random.Random, seed: int, index: int, kind: str, moment: str,
          side: str | None) -> Case:
    """The rest of a case, uniformly among what the fault allows."""
    if kind == "silent-corruption":
        mode, channels, workload = "precopy", 0, "none"
    else:
        # Half the cases that may be precopy are: a postcopy case is a precopy
        # one up to the switch anyway.
        mode = rng.choice(MODES[1:] if moment == "postcopy" else
                          ("precopy", "precopy") + MODES[1:])
        channels = rng.choice(CHANNELS[1:] if kind == "worker-killed" else CHANNELS)
        workload = "ab" if mode != "precopy" else rng.choice(WORKLOADS)
    codec = rng.choice(CODECS) if channels else "none"
    transport = rng.choice(TRANSPORTS)
    at = None
    if kind != "none" and moment not in STATUS_MOMENTS:
        at = round(rng.uniform(*AT_RANGE), 2)
    target = rng.randrange(channels) if kind == "worker-killed" else 0
    postcopy_after = None
    if mode != "precopy":
        # A fault in postcopy wants all of RAM still to send; one in the first
        # pass wants that pass to happen; the others take either.
        if moment == "postcopy":
            postcopy_after = 0
        elif moment == "active":
            postcopy_after = 1
        else:
            postcopy_after = rng.choice((0, 1))
    return Case(seed=seed, index=index, transport=transport, channels=channels,
                codec=codec, mode=mode, workload=workload,
                fault=Fault(kind, moment, side, at, target), postcopy_after=postcopy_after)
