"""A counter that was still and now moves steadily: news, even at a few events a second.

Per-sample thresholds miss a fault that makes a few drops or retransmissions a second (3/s never
reaches 10 in one sample), and a ratio cannot rise while the traffic it divides by collapses. What
such a fault does that a healthy namespace does not is *start*: a counter that did not move for
``baseline`` seconds moves in every interval from one sample on, at ``rate`` a second or more.
:class:`NewSteadyCounter` follows one counter and says when that happened, and since when.
"""

from __future__ import annotations

from typing import NamedTuple

class SteadyRun(NamedTuple):
    """A run of intervals in each of which the counter moved."""

    since: float  # the last sample before the run: the counter's departure from its baseline
    seconds: float  # from ``since`` to now
    events: int  # the counter's increase over the run
    rate: float  # per second, over the run without its first interval (the fault may have begun half-way into it)


class NewSteadyCounter:
    """One counter: the current run of intervals in which it moved, and whether it was still before.

    ``observe(t, increase)`` is fed every interval's increase; ``run()`` is the current run if the
    counter had not moved for ``baseline`` seconds before it (or not since it was first seen,
    ``baseline`` seconds before at least), else None.
    """

    __slots__ = ("baseline", "last_moved", "first_seen", "before", "since", "quiet_before", "first", "events", "intervals")

    def __init__(self, baseline: float, watched_since: float | None = None, before: float | None = None) -> None:
        """``watched_since``: when the counter's namespace was first sampled (a counter that
        appears later, like a new drop reason, was 0 since then); ``before``: the previous sample."""
        self.baseline = baseline
        self.last_moved: float | None = None
        self.first_seen = watched_since
        self.before = before  # the previous sample's time
        self.since: float | None = None  # the sample before the current run; None: no run
        self.quiet_before = False
        self.first: tuple[float, int] = (0.0, 0)  # the run's first interval: (end, increase)
        self.events = 0  # over the run
        self.intervals = 0  # in the run

    def observe(self, at: float, increase: int) -> None:
        """The counter grew by ``increase`` in the interval ending at ``at``."""
        before, self.before = self.before, at
        if self.first_seen is None:
            self.first_seen = at
        if before is None:
            return
        if increase <= 0:
            self.since = None
            return
        if self.since is None:
            last = self.last_moved
            # Still before: not moved for ``baseline`` s, or never moved while watched for ``baseline``
            # s (a daemon that just started, or a namespace just attached, knows no baseline yet:
            # one still interval of a bursty counter is not one).
            self.quiet_before = (last is None and before - self.first_seen >= self.baseline) or (last is not None and before - last >= self.baseline)
            self.since = before
            self.first, self.events, self.intervals = (at, increase), 0, 0
        self.last_moved = at
        self.events += increase
        self.intervals += 1

    def run(self) -> SteadyRun | None:
        """The current run of a counter that was still before it; None otherwise."""
        if self.since is None or not self.quiet_before or self.last_moved is None:
            return None
        at, (first_at, first_n) = self.last_moved, self.first
        if self.intervals >= 2:
            rate = (self.events - first_n) / max(at - first_at, 1e-9)
        else:
            rate = self.events / max(at - self.since, 1e-9)
        return SteadyRun(self.since, at - self.since, self.events, rate)
