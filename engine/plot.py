"""``--plot FILE.png``: a migration's :class:`~engine.telemetry.Timeline` as a picture.

Three stacked panels on one time axis (seconds from the start of the
migration): throughput, the guest's dirty-page rate, and the RAM still to
send.  Pass boundaries are thin dotted lines through all three; the
switchover, the start of postcopy and the end are labelled lines, and the
stretches between them are shaded (the source's vCPUs stopped; the guest
running on the destination).  The dirty rate is drawn only while the
source's vCPUs run: after the switchover they dirty nothing here, and
QEMU's figure is just the last one it measured.

matplotlib is the optional ``bench`` extra and is imported only here, when
a plot is asked for, through its object API (no pyplot: no global figure
state, no display needed).
"""
from __future__ import annotations

import os

from engine.errors import ConfigError
from engine.telemetry import Timeline

__all__ = ["require_matplotlib", "plot_timeline", "default_title"]

MIB = 1 << 20

#: colours (matplotlib's tab palette) and the alpha of the shaded phases
_THROUGHPUT, _DIRTY, _REMAINING = "tab:blue", "tab:orange", "tab:green"
_SWITCHOVER, _POSTCOPY, _PASS = "tab:red", "tab:purple", "0.55"
_END = {"completed": "tab:green", "failed": "black", "cancelled": "black"}
_THROTTLE = "tab:brown"
_SHADE = 0.10
#: pass numbers closer than this fraction of the time axis are not all printed
#: (the lines all stay)
_PASS_LABEL_GAP = 0.03


def require_matplotlib() -> None:
    """Raise :class:`ConfigError` now, before anything starts, if matplotlib
    is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--plot needs matplotlib, which is not installed: "
                          "pip install 'engine[bench]'") from None


def default_title(timeline: Timeline) -> str:
    """``<size> guest: <status> in <total> s, downtime <ms> ms, <MiB> sent``."""
    final, last = timeline.final, (timeline.samples[-1] if timeline.samples else None)
    if last is None:
        return "migration: nothing recorded"
    parts = [f"{_size(last.total)} guest: {last.status}"]
    if final is not None and final.total_time is not None:
        parts[0] += f" in {final.total_time / 1000:.2f} s"
    if final is not None and final.downtime is not None:
        parts.append(f"downtime {final.downtime} ms")
    parts.append(f"{last.transferred / MIB:.1f} MiB sent")
    return ", ".join(parts)


def plot_timeline(timeline: Timeline, path: str | os.PathLike, *,
                  title: str | None = None, subtitle: str | None = None,
                  dpi: int = 110) -> None:
    """Write ``timeline`` to ``path`` as a PNG.

    ``title`` (default :func:`default_title`) and ``subtitle`` (say, the
    guest and the capabilities) head the figure; the final status and its
    error, if any, are always in it.  An empty timeline still gives a
    picture, saying nothing was recorded.
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7.6), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    ax_tp, ax_dirty, ax_rem = axes
    head = title or default_title(timeline)
    fig.suptitle(head + (f"\n{subtitle}" if subtitle else ""), fontsize=11)

    samples = timeline.samples
    t = [s.t for s in samples]
    end_t = max(timeline.duration, 0.1)

    ax_tp.plot(t, [s.throughput / MIB for s in samples], color=_THROUGHPUT, lw=1.6)
    ax_tp.fill_between(t, [s.throughput / MIB for s in samples], color=_THROUGHPUT,
                       alpha=0.12, lw=0)
    ax_tp.set_ylabel("throughput\nMiB/s")
    _plot_throttle(ax_tp, t, samples)

    nan = float("nan")
    dirty = [s.dirty_rate / MIB if s.guest_running_here else nan for s in samples]
    ax_dirty.plot(t, dirty, color=_DIRTY, lw=1.6, drawstyle="steps-post")
    ax_dirty.set_ylabel("dirty-page rate\nMiB/s")
    if samples and not any(d > 0 for d in dirty if d == d):
        ax_dirty.text(0.5, 0.5, "no dirty-page rate measured: QEMU's figure is first computed "
                      "at a sync more than 1 s after the first", transform=ax_dirty.transAxes,
                      ha="center", va="center", fontsize=8, color="0.4")
    page_size = samples[-1].page_size if samples else 4096
    pages = ax_dirty.secondary_yaxis(
        "right", functions=(lambda m: m * MIB / page_size, lambda p: p * page_size / MIB))
    pages.set_ylabel("pages/s")

    remaining = [s.remaining / MIB for s in samples]
    ax_rem.plot(t, remaining, color=_REMAINING, lw=1.6)
    ax_rem.fill_between(t, remaining, color=_REMAINING, alpha=0.12, lw=0)
    ax_rem.set_ylabel("remaining\nMiB")
    ax_rem.set_xlabel("seconds since the migration started")

    for ax in axes:
        ax.set_xlim(0, end_t * 1.02)
        ax.set_ylim(bottom=0)
        ax.grid(True, axis="y", color="0.9", lw=0.8)
        ax.spines[["top"]].set_visible(False)
    # One scale for both rates: the migration converges where the
    # throughput stands above the dirty rate, and this shows it.
    rate_top = max([s.throughput / MIB for s in samples] + [d for d in dirty if d == d]
                   + [1.0]) * 1.12
    ax_tp.set_ylim(0, rate_top)
    ax_dirty.set_ylim(0, rate_top)
    ax_rem.set_ylim(0, (ax_rem.get_ylim()[1] or 1.0) * 1.12)

    _mark_events(timeline, axes, end_t)
    if not samples:
        ax_tp.text(0.5, 0.5, "no samples recorded", transform=ax_tp.transAxes,
                   ha="center", va="center", color="0.4")
    final = timeline.final
    if final is not None and final.error_desc:
        ax_rem.text(0.99, 0.95, f"{final.status}: {final.error_desc}",
                    transform=ax_rem.transAxes, ha="right", va="top", fontsize=8,
                    color="darkred", wrap=True)
    fig.savefig(os.fspath(path), dpi=dpi, format="png")


def _plot_throttle(ax, t, samples) -> None:
    """auto-converge's cpu-throttle-percentage, on its own 0-100 % scale at
    the right of the throughput panel, when the migration throttled at all."""
    if not any(s.throttle for s in samples):
        return
    ax_pct = ax.twinx()
    ax_pct.plot(t, [s.throttle for s in samples], color=_THROTTLE, lw=1.4,
                drawstyle="steps-post", label="cpu throttle %")
    ax_pct.set_ylim(0, 100)
    ax_pct.set_ylabel("cpu throttle\n%", color=_THROTTLE)
    ax_pct.spines[["top"]].set_visible(False)


def _mark_events(timeline: Timeline, axes, end_t: float) -> None:
    from matplotlib.lines import Line2D
    top = axes[0]
    passes = timeline.of_kind("pass")
    labelled: float | None = None
    for e in passes:
        for ax in axes:
            ax.axvline(e.t, color=_PASS, lw=0.8, ls=(0, (2, 2)), zorder=0)
        # Numbered above the top panel ("pass 1", "2", "3"...), skipping a
        # number that would overprint the previous one.
        if labelled is None or e.t - labelled >= _PASS_LABEL_GAP * end_t:
            text = e.label if labelled is None else e.label.split()[-1]
            top.text(e.t, 1.0, text, transform=top.get_xaxis_transform(),
                     fontsize=7, color="0.35", ha="center", va="bottom")
            labelled = e.t

    switch, post, end = (timeline.first(k) for k in ("switchover", "postcopy", "end"))
    # The source's vCPUs are stopped from the switchover until the
    # destination runs the guest (postcopy) or the migration ends.
    if switch is not None:
        stop_end = post.t if post is not None else (end.t if end is not None else end_t)
        for ax in axes:
            ax.axvspan(switch.t, max(stop_end, switch.t), color=_SWITCHOVER, alpha=_SHADE, lw=0)
    if post is not None:
        for ax in axes:
            ax.axvspan(post.t, end.t if end is not None else end_t, color=_POSTCOPY,
                       alpha=_SHADE * 0.8, lw=0)
    marks = [(switch, _SWITCHOVER, "switchover", "right"),
             (post, _POSTCOPY, "postcopy start", "left"),
             (end, _END.get(end.label if end else "", "black"), end.label if end else "",
              "left")]
    legend = [Line2D([], [], color=_PASS, lw=0.8, ls=(0, (2, 2)),
                     label="pass boundary (dirty-bitmap sync)")] if passes else []
    for ev, colour, label, side in marks:
        if ev is None:
            continue
        legend.append(Line2D([], [], color=colour, lw=1.4, label={
            "switchover": "switchover (source vCPUs stop)",
            "postcopy start": "postcopy start (destination runs)"}.get(label, label)))
        for ax in axes:
            ax.axvline(ev.t, color=colour, lw=1.4)
        # Switchover and postcopy start are milliseconds apart: one label
        # goes left of its line, the other right.
        pad = " " if side == "left" else ""
        top.text(ev.t, 0.97, f"{pad}{label}{'' if pad else ' '}",
                 transform=top.get_xaxis_transform(), rotation=90, fontsize=8,
                 color=colour, ha=side, va="top")
    if legend:
        # Below the axes, where it can hide no data.
        top.figure.legend(handles=legend, loc="outside lower center", ncols=len(legend),
                          fontsize=8, frameon=False)


def _size(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    return f"{n / MIB:g} MiB"
