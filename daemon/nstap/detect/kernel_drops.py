"""Packets the kernel dropped in the namespace, by drop reason (the eBPF collector's counts).

The reasons a healthy host produces all the time are off by default (a socket closed with data
still queued, IPv6 disabled on an interface, the generic "not specified"...); every other reason
trips at ``min_increase`` drops since the last sample, or at its own threshold from ``reasons``.

A fault that drops only a few packets a second never reaches a per-sample threshold, so a reason
is also news when it *starts*, against the namespace's own baseline: it had not moved for
``baseline`` seconds and now moves in every interval for ``steady_seconds`` at ``steady_rate``
drops a second or more (3/s for 2 s); or it starts within ``firewall_seconds`` of a change of
the namespace's own firewall (its nftables generation) and reaches ``steady_rate`` drops at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .. import labels as nstap_labels
from ..samples import NamespaceSample
from .base import Finding, Param, increase
from .steady import NewSteadyCounter, SteadyRun

KIND = "kernel_drops"
PARAMS = {
    "min_increase": Param(10.0, 1.0, 1e12, help="drops of one reason since the last sample"),
    "steady_rate": Param(3.0, 0.0, 1e12, low_open=True, help="drops/s of a reason that was still for `baseline` s"),
    "steady_seconds": Param(2.0, 1.0, 3600.0, help="seconds such a reason keeps moving, every interval"),
    "baseline": Param(30.0, 2.0, 86400.0, help="seconds a reason must have been still before it starts"),
    "firewall_seconds": Param(10.0, 0.0, 3600.0, help="a reason starting this soon after the namespace's firewall changed trips at `steady_rate` drops"),
}
SLACK = 0.25  # share of an interval a sample may come early (sampling jitter)
# Share of ``steady_rate`` a run's measured rate may fall short by: whole drops counted over one or
# two intervals of jittered length (3/s reads 2.9 over a long interval; a sender paced by sleeps
# sends 2.9/s): 3/s is still news at 2.25/s, and 2/s is not.
RATE_SLACK = 0.25
# Reasons a healthy host and container produce all the time (measured here under plain HTTP
# traffic: QUEUE_PURGE on every closed connection, IPV6DISABLED on the host), or that nstap's own
# captures cause: off unless the config turns them on.
QUIET_REASONS = frozenset({
    "NOT_SPECIFIED", "QUEUE_PURGE", "IPV6DISABLED", "SOCKET_CLOSE", "SOCKET_FILTER", "UNIX_DISCONNECT",
    "UNIX_SKIP_OOB", "OTHERHOST", "TCP_CLOSE", "UNHANDLED_PROTO",
})
_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
MAX_REASONS = 256


def check_reasons(value: object) -> dict[str, float | None]:
    """``reasons:`` of the config: reason name -> ``off``, ``on`` (at the detector's min_increase) or
    its own min_increase.

    Returned as None, -1 and the number."""
    if not isinstance(value, Mapping):
        raise ValueError("kernel_drops.reasons must map reason names to off, on or a number")
    if len(value) > MAX_REASONS:
        raise ValueError(f"kernel_drops.reasons: at most {MAX_REASONS} reasons")
    out: dict[str, float | None] = {}
    for reason, setting in value.items():
        if not isinstance(reason, str) or not _REASON.match(reason):
            raise ValueError(f"kernel_drops.reasons: {reason!r} is not a drop reason name (like NO_SOCKET)")
        switch = nstap_labels.switch(setting) if isinstance(setting, str) else (setting if isinstance(setting, bool) else None)
        if switch is False:
            out[reason] = None
        elif switch is True:
            out[reason] = -1.0
        else:
            out[reason] = PARAMS["min_increase"].check(f"kernel_drops.reasons.{reason}", setting)  # type: ignore[arg-type]
    return out


class KernelDropDetector:
    """Trips when a reason that is not off grew by its threshold since the last sample; the onset
    is that last sample."""

    kind = KIND

    def __init__(
        self,
        min_increase: float,
        reasons: Mapping[str, float | None] | None = None,
        steady_rate: float = 3.0,
        steady_seconds: float = 2.0,
        baseline: float = 30.0,
        firewall_seconds: float = 10.0,
    ) -> None:
        self.min_increase = min_increase
        self.steady_rate = steady_rate
        self.steady_seconds = steady_seconds
        self.baseline = baseline
        self.firewall_seconds = firewall_seconds
        self.thresholds: dict[str, float | None] = {r: None for r in QUIET_REASONS}
        for reason, value in (reasons or {}).items():
            self.thresholds[reason] = min_increase if value is not None and value < 0 else value
        self._before: Mapping[str, int] | None = None
        self._before_at = 0.0
        self._watched_since: float | None = None
        self._runs: dict[str, NewSteadyCounter] = {}  # one per reason seen (a fixed list of the kernel's; capped)
        self._firewall: tuple[int, float] | None = None  # (generation, when it was last seen to change)

    def observe(self, sample: NamespaceSample) -> Finding | None:
        now = sample.kernel_drops
        if now is None:
            return None
        at = sample.kernel_drops_at or sample.taken_at
        fw_changed = self._firewall_changed(sample)
        if self._before is not None and at == self._before_at:
            # The counts of the read before (the read was late, behind a loaded round): no new
            # interval. Taken as one without drops, it broke a run that had just started, and the
            # run that went on was no longer a start against a still baseline: hidden for good.
            return None
        before, self._before = self._before, now
        before_at, self._before_at = self._before_at, at
        if self._watched_since is None:
            self._watched_since = at
        if before is None:
            return None
        tripped: dict[str, int] = {}
        started_at = before_at
        steady: list[str] = []
        for reason, count in now.items():
            threshold = self.thresholds.get(reason, self.min_increase)
            if threshold is None:
                continue
            grew = increase(count, before.get(reason, 0))
            run = self._steady(reason, at, before_at, grew)
            if not grew:
                continue
            if grew >= threshold:
                tripped[reason] = grew
            if run is not None and self._news(run, fw_changed, at - before_at):
                tripped[reason] = max(tripped.get(reason, 0), run.events)
                steady.append(f"{reason} {run.rate:.1f}/s for {run.seconds:.0f}s, still before")
                started_at = min(started_at, run.since)
        if not tripped:
            return None
        words = ", ".join(f"{r} {n}" for r, n in sorted(tripped.items(), key=lambda x: -x[1]))
        if steady:
            words += f" (new: {'; '.join(steady)}{', right after a firewall change' if fw_changed is not None else ''})"
        return Finding(KIND, f"the kernel dropped packets: {words}", tripped, started_at=started_at)

    def _steady(self, reason: str, at: float, before_at: float, grew: int) -> SteadyRun | None:
        counter = self._runs.get(reason)
        if counter is None:
            if not grew or len(self._runs) >= MAX_REASONS:
                return None
            counter = self._runs[reason] = NewSteadyCounter(self.baseline, self._watched_since, before_at)
        counter.observe(at, grew)
        return counter.run()

    def _news(self, run: SteadyRun, fw_changed: float | None, interval: float) -> bool:
        """A reason that started against a still baseline: steadily, or right after a firewall change."""
        # The change was seen at a sample: it happened in the interval before it, up to one
        # interval after the run's start (the rule and its first drops in the same interval).
        if fw_changed is not None and run.since - self.firewall_seconds <= fw_changed <= run.since + (1 + SLACK) * interval:
            return run.events >= self.steady_rate
        return run.seconds >= self.steady_seconds - SLACK * interval and run.rate >= self.steady_rate * (1 - RATE_SLACK)

    def _firewall_changed(self, sample: NamespaceSample) -> float | None:
        """When the namespace's own firewall was last seen to change, if within ``firewall_seconds``."""
        fw = sample.firewall
        if fw is None:
            return None
        last = self._firewall
        if last is None:
            self._firewall = (fw.generation, float("-inf"))
        elif fw.generation != last[0]:
            self._firewall = (fw.generation, sample.taken_at)
        changed = self._firewall[1]
        return changed if sample.taken_at - changed <= self.firewall_seconds else None
