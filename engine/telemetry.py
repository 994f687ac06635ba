"""A migration over time: ``query-migrate`` sampled from a thread of its own.

:class:`MigrationSampler` polls a migration's ``info()`` (anything returning
a :class:`~engine.stats.MigrationInfo`: ``SourceMigration.info``, a QMP
client's ``query-migrate`` read with ``MigrationInfo.from_qmp``) every
:data:`SAMPLE_PERIOD` seconds and keeps what it saw as :class:`Sample` rows.
It does no work per page and never touches the migration's data path: one
snapshot per period, which costs the migration a lock taken for a few
microseconds.

:meth:`MigrationSampler.timeline` turns the rows into a :class:`Timeline`:
the samples plus the :class:`Event` marks a reader of the run wants to see,

* ``pass``: a dirty-bitmap sync began a new pass (QEMU's MIGRATION_PASS);
* ``status``: every status entered (QEMU's MIGRATION event);
* ``switchover``: the source stopped its vCPUs (``pre-switchover`` or
  ``device``);
* ``postcopy``: the destination was told to run the guest
  (``postcopy-device`` or ``postcopy-active``);
* ``end``: ``completed``, ``failed`` or ``cancelled``.

Exact times come from two hooks when the caller can install them:
:meth:`MigrationSampler.note_status` (fit for ``SourceMigration``'s
``on_status``) and :meth:`MigrationSampler.note_pass` (its ``on_pass``).
Both only note the time and wake the sampling thread, which then takes a
sample at once, so every status and pass has a row of its own next to the
periodic ones.  Without the hooks the events are read off the samples and
are as exact as the period; a ``device`` status shorter than a period is
then never seen.

Units: times in seconds from the start of the migration (its entry into
``setup`` when noted, else the sampler's creation), sizes in
bytes, rates in bytes/s unless a name says pages.  Time comes from an
injected clock, so the whole module runs under a fake one in tests.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

from engine.state import MigrationStatus as S
from engine.stats import MigrationInfo

__all__ = [
    "SAMPLE_PERIOD",
    "THROUGHPUT_WINDOW",
    "Sample",
    "Event",
    "Timeline",
    "MigrationSampler",
    "derive_events",
]

SAMPLE_PERIOD = 0.1
"""Seconds between two ``info()`` polls."""

MIN_THROUGHPUT_SPAN = 0.05
"""Seconds of history below which no new throughput is computed (the
previous one stands): the first milliseconds of a migration are a burst
that would read as a rate it never sustains."""

MIN_SAMPLE_GAP = 0.005
"""Seconds the thread waits after a sample before a hook may wake it again
(a burst of quick passes must not turn the sampler into a busy loop)."""

THROUGHPUT_WINDOW = 0.5
"""Seconds of samples that :attr:`Sample.throughput` is measured over.

Long enough to smooth the steps of a rate limiter's 100 ms windows and of
batched multifd acknowledgements, short enough to follow a pass."""

#: statuses at which the source's vCPUs have stopped for the switchover
_SWITCHOVER = frozenset({S.PRE_SWITCHOVER, S.DEVICE})
#: statuses in which the destination runs (or is about to run) the guest
_POSTCOPY_START = frozenset({S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE})
#: statuses a migration only reaches after its switchover
_AFTER_SWITCHOVER = _SWITCHOVER | frozenset({
    S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP,
    S.POSTCOPY_RECOVER, S.COMPLETED, S.COLO})
_END = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})


@dataclass(frozen=True)
class Sample:
    """One ``query-migrate`` as seen at time ``t`` (seconds)."""

    t: float
    status: str
    """QEMU's status name (``active``, ``postcopy-active``...)."""
    passes: int
    """``dirty-sync-count``: bitmap syncs so far."""
    transferred: int
    """Bytes sent so far (all channels)."""
    remaining: int
    """Bytes still dirty."""
    total: int
    """Bytes of guest RAM."""
    dirty_pages_rate: int
    """QEMU's ``dirty-pages-rate``, pages/s."""
    page_size: int
    """Bytes per page."""
    mbps: float
    """QEMU's ``mbps`` (megabits/s of its last 100 ms window)."""
    throughput: float
    """Bytes/s sent over the last :data:`THROUGHPUT_WINDOW`, from the
    ``transferred`` deltas: unlike ``mbps`` it goes on being measured in
    postcopy and falls to 0 once nothing moves."""
    throttle: int = 0
    """``cpu-throttle-percentage`` (auto-converge), 0 while not throttling."""

    @property
    def dirty_rate(self) -> float:
        """``dirty-pages-rate`` in bytes/s."""
        return float(self.dirty_pages_rate * self.page_size)

    @property
    def guest_running_here(self) -> bool:
        """Whether the source's vCPUs may still be dirtying memory."""
        return S(self.status) not in _AFTER_SWITCHOVER | _END


@dataclass(frozen=True)
class Event:
    """A moment worth marking: ``kind`` is one of ``pass``, ``status``,
    ``switchover``, ``postcopy``, ``end``; ``label`` is what to print
    (``pass 2``, a status name)."""

    t: float
    kind: str
    label: str


@dataclass(frozen=True)
class Timeline:
    """What a sampler recorded: samples in time order, events in time order,
    and the last ``info()`` it read (``None`` if it never read one)."""

    samples: tuple[Sample, ...]
    events: tuple[Event, ...]
    final: MigrationInfo | None = None

    def of_kind(self, kind: str) -> tuple[Event, ...]:
        """The events of one kind, in time order."""
        return tuple(e for e in self.events if e.kind == kind)

    def first(self, kind: str) -> Event | None:
        """The first event of ``kind``, or ``None``."""
        return next((e for e in self.events if e.kind == kind), None)

    @property
    def duration(self) -> float:
        """Seconds from 0 to the last sample or event (0 when empty)."""
        times = [s.t for s in self.samples[-1:]] + [e.t for e in self.events]
        return max(times, default=0.0)


def derive_events(samples: Sequence[Sample],
                  statuses: Iterable[tuple[float, str]] | None = None,
                  passes: Iterable[tuple[float, int]] | None = None) -> list[Event]:
    """The events of a run, from its samples and whatever exact marks exist.

    ``statuses``: ``(t, status)`` entries in time order (statuses noted as
    they were entered); when ``None`` they are the samples' status changes.
    ``passes``: ``(t, n)`` noted as pass ``n`` began; passes the notes do not
    cover are read off the samples' ``dirty-sync-count`` (at the first sample
    showing them).  A sync seen only after the switchover is not marked: it
    is the switchover's own final sync, and the switchover line says so.
    """
    if statuses is None:
        statuses, last = [], None
        for s in samples:
            if s.status != last:
                statuses.append((s.t, s.status))
                last = s.status
    marks = [(t, S(st)) for t, st in statuses if S(st) is not S.NONE]

    events: list[Event] = [Event(t, "status", st.value) for t, st in marks]
    switch = next(((t, st) for t, st in marks if st in _SWITCHOVER), None)
    if switch is None:
        # Only samples: a status past the switchover says it happened, at
        # the latest then.  'failed' or 'cancelled' say nothing either way.
        switch = next(((t, st) for t, st in marks
                       if st in _AFTER_SWITCHOVER and st is not S.COLO), None)
    if switch is not None:
        events.append(Event(switch[0], "switchover", "switchover"))
    post = next(((t, st) for t, st in marks if st in _POSTCOPY_START), None)
    if post is not None:
        events.append(Event(post[0], "postcopy", "postcopy"))
    end = next(((t, st) for t, st in marks if st in _END), None)
    if end is not None:
        events.append(Event(end[0], "end", end[1].value))

    noted = sorted(passes or ())
    for t, n in noted:
        events.append(Event(t, "pass", f"pass {n}"))
    covered = max((n for _, n in noted), default=0)
    switch_t = switch[0] if switch is not None else float("inf")
    previous = 0
    for s in samples:
        if s.passes > previous:
            for n in range(max(previous, covered) + 1, s.passes + 1):
                if s.t < switch_t and S(s.status) not in _AFTER_SWITCHOVER:
                    events.append(Event(s.t, "pass", f"pass {n}"))
            previous = s.passes
    events.sort(key=lambda e: e.t)
    return events


class MigrationSampler:
    """Polls ``info()`` every ``period`` seconds on a daemon thread.

    Use as a context manager (or :meth:`start` / :meth:`stop`) around the
    migration; :meth:`stop` takes one last sample so the final status is
    always recorded, completed or failed.  ``on_sample(sample)`` is called on
    the sampling thread after each sample (a progress display); it must not
    block for long.

    :meth:`sample` takes one sample on the calling thread: tests drive the
    sampler with it and a fake clock, without a thread.  Thread-safe.
    """

    def __init__(self, info: Callable[[], MigrationInfo], *,
                 period: float = SAMPLE_PERIOD,
                 window: float = THROUGHPUT_WINDOW,
                 clock: Callable[[], float] = time.monotonic,
                 on_sample: Callable[[Sample], None] | None = None):
        self._info = info
        self.period = period
        self.window = window
        self._clock = clock
        self.on_sample = on_sample
        self.t0 = clock()
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._passes: list[tuple[float, int]] = []
        self._statuses: list[tuple[float, str]] = []
        self._poke = threading.Event()
        self._final: MigrationInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- recording -------------------------------------------------------------

    def sample(self) -> Sample:
        """Read ``info()`` once, record it and return the row."""
        info = self._info()
        now = self._clock() - self.t0
        ram = info.ram
        transferred = ram.transferred if ram else 0
        last: Sample | None
        with self._lock:
            if self._samples and ram is None:
                # setup/failed/cancelled show no ram: the counters stand still.
                last = self._samples[-1]
                transferred = last.transferred
            recent = self._recent
            recent.append((now, transferred))
            while len(recent) > 2 and recent[1][0] <= now - self.window:
                recent.popleft()
            t_old, b_old = recent[0]
            last = self._samples[-1] if self._samples else None
            if now - t_old >= MIN_THROUGHPUT_SPAN:
                throughput = (transferred - b_old) / (now - t_old)
            else:
                throughput = last.throughput if last else 0.0
            row = Sample(
                t=now, status=info.status, passes=ram.dirty_sync_count if ram else
                (last.passes if last else 0),
                transferred=transferred,
                remaining=ram.remaining if ram else (last.remaining if last else 0),
                total=ram.total if ram else (last.total if last else 0),
                dirty_pages_rate=ram.dirty_pages_rate if ram else 0,
                page_size=ram.page_size if ram else (last.page_size if last else 4096),
                mbps=ram.mbps if ram else 0.0,
                throughput=max(throughput, 0.0),
                throttle=int(info.extra.get("cpu-throttle-percentage", 0)))
            self._samples.append(row)
            self._final = info
        if self.on_sample is not None:
            self.on_sample(row)
        return row

    def note_pass(self, n: int) -> None:
        """Pass ``n`` just began (a dirty-bitmap sync): an exact mark.

        Signature of ``SourceMigration.on_pass``.  O(1), takes no lock but
        the sampler's own and never calls ``info()``: safe from any thread.
        """
        t = self._clock() - self.t0
        with self._lock:
            self._passes.append((t, int(n)))
        self._poke.set()

    def note_status(self, old, new) -> None:
        """The migration just entered ``new``: an exact mark.

        Signature of ``MigrationState``'s ``on_change`` (``SourceMigration``'s
        ``on_status``), which runs under the state's lock: this only notes the
        time and wakes the sampling thread, it never calls ``info()`` (which
        takes the migration's locks).
        """
        t = self._clock() - self.t0
        with self._lock:
            self._statuses.append((t, getattr(new, "value", str(new))))
        self._poke.set()

    # -- the thread ------------------------------------------------------------

    def start(self) -> MigrationSampler:
        """Sample now and then every ``period`` seconds until :meth:`stop`."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="engine-sampler",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and take the last sample (the final status)."""
        self._stop.set()
        self._poke.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.sample()

    def __enter__(self) -> MigrationSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._poke.clear()
            self.sample()
            if self._stop.wait(MIN_SAMPLE_GAP):
                return
            # Either the period passes or a hook wakes the thread early.
            self._poke.wait(self.period - MIN_SAMPLE_GAP)

    # -- reading ---------------------------------------------------------------

    @property
    def latest(self) -> Sample | None:
        """The last sample, or ``None`` before the first."""
        with self._lock:
            return self._samples[-1] if self._samples else None

    @property
    def samples(self) -> list[Sample]:
        """A copy of the samples so far."""
        with self._lock:
            return list(self._samples)

    def timeline(self) -> Timeline:
        """Samples and events so far, times from the migration's start.

        Samples from before the start (status ``none``) are left out, and so
        are those after the end but the first: a caller that goes on
        sampling (verifying memory, tearing down) adds nothing to the run.
        """
        with self._lock:
            samples = list(self._samples)
            passes = list(self._passes)
            statuses = list(self._statuses) or None
            final = self._final
        if statuses is not None:
            setup = [t for t, st in statuses if st == S.SETUP.value]
            # The last entry into setup: a source migrated before (and then
            # failed or was cancelled) starts over from there.
            origin = setup[-1] if setup else 0.0
            samples = [_shifted(s, origin) for s in samples if s.t >= origin]
            passes = [(t - origin, n) for t, n in passes if t >= origin]
            statuses = [(t - origin, st) for t, st in statuses if t >= origin]
        else:
            samples = [s for s in samples if s.status != S.NONE.value]
        events = derive_events(samples, statuses, passes)
        end = next((e.t for e in events if e.kind == "end"), None)
        if end is not None:
            after = [i for i, s in enumerate(samples) if s.t >= end]
            if after:
                del samples[after[0] + 1:]
        return Timeline(tuple(samples), tuple(events), final)


def _shifted(s: Sample, origin: float) -> Sample:
    return replace(s, t=s.t - origin)
